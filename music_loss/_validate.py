"""Input validation of the public API (SPEC 2): every check names the argument and the fix.

Nothing here reads a tensor's values (no host sync) except :func:`check_finite`, which runs
only when the caller asks for it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from music_loss._config import (
    BACKENDS,
    NORMALIZATIONS,
    PRECISIONS,
    Backend,
    LossConfig,
    Normalization,
    Precision,
)


def check_segment_dim(segment_dim: Any) -> int:
    if isinstance(segment_dim, bool) or not isinstance(segment_dim, int):
        raise TypeError(f"segment_dim must be a positive int, got {type(segment_dim).__name__} "
                        f"{segment_dim!r}; pass e.g. segment_dim=80")
    if segment_dim < 1:
        raise ValueError(f"segment_dim must be >= 1, got {segment_dim}; pass e.g. segment_dim=80")
    return segment_dim


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def check_backend(backend: Any) -> Backend:
    check_choice("backend", backend, BACKENDS)
    chosen: Backend = backend
    return chosen


def check_precision(precision: Any) -> Precision:
    check_choice("precision", precision, PRECISIONS)
    chosen: Precision = precision
    return chosen


def check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def make_config(
    segment_dim: int,
    temperature: float = 1.0,
    eps: float = 1e-8,
    diag_weight: float = 1.0,
    off_weight: float = 1.0,
    invariance_weight: float = 1.0,
    normalization: Normalization = "blocks",
) -> LossConfig:
    """Validate hyperparameters into a :class:`~music_loss._config.LossConfig`.

    Example:
        >>> make_config(80, temperature=0.5).temperature
        0.5
    """
    segment_dim = check_segment_dim(segment_dim)
    temperature = check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; the paper uses 1.0")
    eps = check_real("eps", eps)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}; use the default 1e-8, or 0 for "
                         "no clamp")
    check_choice("normalization", normalization, NORMALIZATIONS)
    return LossConfig(
        segment_dim=segment_dim,
        temperature=temperature,
        eps=eps,
        diag_weight=check_real("diag_weight", diag_weight),
        off_weight=check_real("off_weight", off_weight),
        invariance_weight=check_real("invariance_weight", invariance_weight),
        normalization=normalization,
    )


def check_view(name: str, z: Any, segment_dim: int) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got "
                        f"{type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {z.dtype}; convert it with {name}.float()")
    if z.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got {tuple(z.shape)}; flatten "
                         f"the features first, e.g. {name}.flatten(1)")
    if z.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(z.shape)}); the loss needs "
                         f"D = S * segment_dim >= segment_dim = {segment_dim} columns")
    if z.shape[1] % segment_dim != 0:
        raise ValueError(f"{name}.shape[1] = {z.shape[1]} is not a multiple of segment_dim = "
                         f"{segment_dim}; choose a projector output size D = S * segment_dim "
                         f"(e.g. {max(1, z.shape[1] // segment_dim) * segment_dim}) or a "
                         "segment_dim that divides D")


def check_pair(z1: Any, z2: Any, segment_dim: int, *, min_rows: int = 2) -> None:
    check_view("z1", z1, segment_dim)
    check_view("z2", z2, segment_dim)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}; pass the two views of the same batch")
    if z1.dtype != z2.dtype:
        raise TypeError(f"z1 and z2 must have the same dtype, got {z1.dtype} and {z2.dtype}; "
                        f"convert one, e.g. z2.to(z1.dtype)")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and "
                         f"{z2.device}; move both with .to(device)")
    if z1.shape[0] < min_rows:
        raise ValueError(f"the batch must hold at least {min_rows} samples, got "
                         f"{z1.shape[0]}; the loss is a statistic of the batch")


def check_not_under_functorch(backend: str, *tensors: Tensor) -> None:
    """``torch.func`` transforms (vmap, grad, jacrev, ...) need autograd.Functions with
    ``setup_context`` and batching rules, which the fast backends do not have."""
    if backend == "reference" or torch.compiler.is_compiling():
        return
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise NotImplementedError(
            f"torch.func transforms (vmap, grad, jacrev, functional_call + grad) are not "
            f"supported by backend={backend!r}; use backend='reference' (plain PyTorch ops, "
            "which torch.func handles) or call the loss outside the transform")


def check_finite(z1: Tensor, z2: Tensor) -> None:
    # Host sync: only when the caller asks for it (check_finite=True).
    if not bool(torch.isfinite(z1).all()) or not bool(torch.isfinite(z2).all()):
        raise ValueError("z1 or z2 contains NaN or inf; check the encoder's output (learning "
                         "rate, mixed-precision overflow) before the loss")
