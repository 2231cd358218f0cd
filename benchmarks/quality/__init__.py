"""Does MUSIC learn? A small, honest study on scikit-learn's digits (project issue 6).

Run ``python -m benchmarks.quality.digits`` (about 14 minutes on 2 quiet CPU cores, 51 runs); see
:mod:`benchmarks.quality.digits` for the options and ``benchmarks/results/quality-digits.md``
for the last committed results.
"""
