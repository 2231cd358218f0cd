"""Fused Triton kernels of music-loss (installed as ``music_loss.kernels``).

One file per fused op, each with its launcher and autograd wrapper beside the kernels:

- :mod:`~music_loss.kernels.segment_softmax`: segment softmax forward (invariance fused)
  and backward (every elementwise gradient of the loss fused);
- :mod:`~music_loss.kernels.joint_entropy`: ``P = p1^T p2 / N`` tile by tile with the masked
  ``P lg P`` reduction in the epilogue, and the two gradient products, never storing ``P``;
- :mod:`~music_loss.kernels.ops`: custom-op registration (``torch.compile``) and
  :func:`music_loss_triton`, the ``backend="triton"`` entry point;
- :mod:`~music_loss.kernels.aot`: ahead-of-time compile check for sm_80/sm_90 without a GPU.
"""

from music_loss.kernels.ops import music_loss_triton

__all__ = ["music_loss_triton"]
