"""What the memory-light baselines share: block sizes, input checks, the global-batch gather."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from music_loss._config import compute_dtype
from music_loss._validate import check_chunk_size, check_flag, check_pair
from music_loss.torch_backend import default_chunk_size

__all__ = ["accumulator", "check_chunk_size", "check_flag", "check_real", "check_views",
           "compute_dtype", "default_chunk_size", "gather_views"]


def accumulator(device: torch.device) -> torch.dtype:
    """Sums of the ``D x D`` entries run in float64 (float32 on MPS, which has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def check_real(name: str, value: Any, *, minimum: float | None = None,
               positive: bool = False, hint: str = "") -> float:
    """A finite real hyperparameter, optionally ``>= minimum`` or ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}"
                        f"{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}{hint}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}{hint}")
    return float(value)


def check_views(z1: Any, z2: Any, *, min_rows: int) -> None:
    """Two ``(batch, dim)`` floating tensors of the same shape, dtype and device: the loss's
    own checks, with every feature count allowed."""
    for name, z in (("z1", z1), ("z2", z2)):
        if isinstance(z, Tensor) and z.dim() == 2 and z.shape[1] == 0:
            raise ValueError(f"{name} has no features (shape {tuple(z.shape)}); pass "
                             "(batch, dim) embeddings with dim >= 1")
    check_pair(z1, z2, 1, min_rows=min_rows)


def gather_views(z1: Tensor, z2: Tensor, group: Any) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Both views of every rank, concatenated in rank order, and this rank's rows.

    One all-gather of ``[z1, z2]`` whose backward sums the ranks' gradients and returns this
    rank's rows (a reduce-scatter). Every rank then computes the loss of the global batch;
    under DDP's gradient averaging the ``W`` identical contributions cancel the ``1 / W``,
    and the parameters receive the gradient of one process on the concatenated batch.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather_distributed=True needs an initialised process group; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun), "
                         "or pass gather_distributed=False")
    from music_loss.distributed import gather_rows

    dim = z1.shape[1]
    both, local_rows = gather_rows(torch.cat([z1, z2], dim=1), group)
    return both[:, :dim], both[:, dim:], local_rows


def refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        # create_graph=True: the gradients were finished in the forward pass and are
        # constants; second derivatives through them would be silently wrong.
        raise RuntimeError(
            "the memory-light baselines do not support double backward (create_graph=True "
            "through the loss, e.g. a gradient penalty): their second derivatives would be "
            "wrong. Use barlow_twins_reference / vicreg_reference for that computation.")
