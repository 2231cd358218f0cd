"""Does MUSIC learn? Small, honest studies on two real datasets (8x8 digits, MNIST 5k).

Run ``python -m benchmarks.quality.study --dataset digits`` (or ``--dataset mnist5k``); see
:mod:`benchmarks.quality.study` for the stages and options, and
``benchmarks/results/quality-<dataset>.md`` for the last committed results and their wall
times.
"""
