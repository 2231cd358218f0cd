"""Input validation of the public API: every check names the argument and the fix.

Nothing here reads a tensor's values (no host sync) except :func:`check_finite`, which runs
only when the caller asks for it.
"""

from __future__ import annotations

import math
import numbers
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


def _scalar(value: Any) -> Any:
    """A 0-dim (or one-element) tensor as a Python number; anything else unchanged."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise TypeError(f"expected a number, got a tensor of shape {tuple(value.shape)}; "
                            "pass a Python number or a 0-dim tensor")
        return value.item()
    return value


def check_int(name: str, value: Any, example: str) -> int:
    """An integer (Python, numpy or a 0-dim integer tensor) as a Python ``int``."""
    try:
        value = _scalar(value)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}; "
                        f"pass e.g. {name}={example}")
    return int(value)


def check_segment_dim(segment_dim: Any) -> int:
    segment_dim = check_int("segment_dim", segment_dim, "80")
    if segment_dim < 1:
        raise ValueError(f"segment_dim must be >= 1, got {segment_dim}; pass e.g. segment_dim=80")
    return segment_dim


def check_real(name: str, value: Any) -> float:
    """A real number (Python, numpy scalar or 0-dim tensor) as a finite Python ``float``."""
    try:
        value = _scalar(value)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_temperature(temperature: Any) -> float:
    temperature = check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; the paper uses 1.0")
    return temperature


def check_eps(eps: Any) -> float:
    eps = check_real("eps", eps)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}; use the default 1e-8, or 0 for "
                         "no clamp")
    return eps


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
    if chunk_size is None:
        return None
    try:
        value = check_int("chunk_size", chunk_size, "256")
    except TypeError:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}"
                         ) from None
    if value < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}; "
                         "pass None to choose it from the shapes")
    return value


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
    temperature = check_temperature(temperature)
    eps = check_eps(eps)
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
        samples = "sample" if min_rows == 1 else "samples"
        raise ValueError(f"the batch must hold at least {min_rows} {samples}, got "
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
    """Raise if ``z1`` or ``z2`` holds NaN or inf.

    Eager: a host sync, only when the caller asks for it (``check_finite=True``). Under
    ``torch.compile``: a device-side assertion (``torch._assert_async``), no host read; on
    CUDA a failed device assertion stops the process (the CUDA context cannot continue).
    """
    if torch.compiler.is_compiling():
        finite = torch.isfinite(z1).all() & torch.isfinite(z2).all()
        torch._assert_async(finite, "z1 or z2 contains NaN or inf")
        return
    if not bool(torch.isfinite(z1).all()) or not bool(torch.isfinite(z2).all()):
        raise ValueError("z1 or z2 contains NaN or inf; check the encoder's output (learning "
                         "rate, mixed-precision overflow) before the loss")
