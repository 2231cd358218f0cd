"""Fused Triton kernels of music-loss (installed as ``music_loss.kernels``)."""
