"""Benchmarks of music-loss against Barlow Twins and VICReg (run: ``python -m benchmarks.run``)."""
