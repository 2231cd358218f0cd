"""What the memory-light baselines share: block sizes, input checks, the global-batch gather."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Elements per ``chunk x D`` block: large enough for efficient matmuls, small next to D^2.
_MIN_BLOCK = 1 << 20
_MAX_BLOCK = 1 << 23


def default_chunk_size(n: int, d: int) -> int:
    """Rows of the ``D x D`` matrix per block: about ``N D / 2`` elements, in [1 Mi, 8 Mi].

    A block then stays within the ``O(N D)`` arrays held anyway (at most 32 MiB in float32),
    and stays large enough that the per-block passes over the ``N x D`` gradient buffers do
    not dominate when ``N`` is large.

    Example:
        >>> default_chunk_size(512, 8160)
        256
    """
    budget = min(max(n * d // 2, _MIN_BLOCK), _MAX_BLOCK)
    return max(1, min(d, budget // d))


def accumulator(device: torch.device) -> torch.dtype:
    """Sums of the ``D x D`` entries run in float64 (float32 on MPS, which has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got "
                         f"{chunk_size!r}")
    return chunk_size


def check_views(z1: Any, z2: Any, *, min_rows: int) -> None:
    """Two ``(batch, dim)`` floating tensors of the same shape, dtype and device."""
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got "
                            f"{type(z).__name__}")
        if not z.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}; convert "
                            f"it with {name}.float()")
        if z.dim() != 2 or z.shape[1] == 0:
            raise ValueError(f"{name} must have shape (batch, dim) with dim >= 1, got "
                             f"{tuple(z.shape)}; flatten the features first, e.g. "
                             f"{name}.flatten(1)")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}; pass the two views of the same batch")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}; "
                        "convert one, e.g. z2.to(z1.dtype)")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and "
                         f"{z2.device}; move both with .to(device)")
    if z1.shape[0] < min_rows:
        raise ValueError(f"the batch must hold at least {min_rows} samples, got "
                         f"{z1.shape[0]}; the loss is a statistic of the batch")


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
