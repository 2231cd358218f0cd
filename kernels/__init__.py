"""Fused Triton kernels of music-loss (installed as ``music_loss.kernels``).

One job per module:

- :mod:`~music_loss.kernels.segment_softmax`: the segment softmax forward (invariance term
  fused) and the loss's backward (every elementwise gradient fused), as JIT kernels;
- :mod:`~music_loss.kernels.joint_entropy`: ``P = p1^T p2 / N`` tile by tile with the masked
  ``P lg P`` reduction in the epilogue, and the two gradient products, as JIT kernels;
- :mod:`~music_loss.kernels.configs`: autotune configs, the shared-memory model that filters
  them, and the chunk size of the joint pass;
- :mod:`~music_loss.kernels.launchers`: the launchers (autotuning, TMA, chunking);
- :mod:`~music_loss.kernels.triton_backend`: custom-op registration (``torch.compile``) and
  :func:`music_loss_triton`, the ``backend="triton"`` entry point;
- :mod:`~music_loss.kernels._common`: helpers shared by the kernels and launchers.
"""

from music_loss.kernels.triton_backend import music_loss_triton

__all__ = ["music_loss_triton"]
