"""Choosing a backend and a matmul precision, and calling the backend.

The one place that turns ``backend="auto"`` / ``precision="auto"`` into a concrete choice and
runs it: API -> :mod:`music_loss._validate` -> here -> backend. No host syncs, and no
global setting is ever written: the precision is passed to the backend.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from music_loss import _gpu_policy
from music_loss._config import Backend, LossConfig, MUSICTerms, Precision, ResolvedPrecision

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def triton_unavailable_reason(device_type: str, dtype: torch.dtype) -> str | None:
    """Why the Triton backend cannot run on a tensor of this device and dtype (``None``: it can)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device_type != "cuda" and not (interpret and device_type == "cpu"):
        return (f"the Triton backend needs CUDA tensors (got device {device_type!r}); "
                "use backend='torch', or set TRITON_INTERPRET=1 to run the kernels on CPU "
                "tensors in Triton's interpreter (slow; for testing)")
    if device_type == "cuda" and torch.version.hip is not None:
        return "the Triton backend is not yet tested on ROCm; use backend='torch'"
    if dtype == torch.float64:
        return "the Triton backend computes in float32; use backend='torch' for float64 inputs"
    try:
        import triton  # noqa: F401
    except ImportError as err:  # CPU-only installs: triton is not a hard dependency
        return f"Triton does not import ({err}); install triton or use backend='torch'"
    return None


def resolve_backend(backend: Backend, device_type: str, dtype: torch.dtype) -> str:
    """``auto`` -> ``triton`` for CUDA tensors on NVIDIA GPUs with Triton, else ``torch``.

    Example:
        >>> resolve_backend("auto", "cpu", torch.float32)
        'torch'
    """
    if backend == "auto":
        if device_type == "meta":  # shapes only: nothing is materialised, the reference is free
            return "reference"
        if device_type == "cuda" and triton_unavailable_reason(device_type, dtype) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(device_type, dtype)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
    return backend


def resolve_precision(
    precision: Precision, device_type: str, dtype: torch.dtype
) -> ResolvedPrecision:
    """``auto``: 16-bit inputs or autocast -> ``bf16``; float32 follows PyTorch's matmul setting.

    fp16 inputs also map to bf16 operands: fp16 cannot hold probabilities below 6e-8, and the
    clamp puts them at 1e-8. float64 inputs always compute exactly (``ieee``).

    Example:
        >>> resolve_precision("auto", "cpu", torch.bfloat16)
        'bf16'
    """
    if precision != "auto":
        return precision
    if dtype == torch.float64:
        return "ieee"
    if dtype in _SIXTEEN_BIT or _autocast_enabled(device_type):
        return "bf16"
    return float32_matmul_mode()


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type; ``False`` for device types autocast does
    not know (``meta`` tensors, used to trace shapes, under any autocast context)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


@torch.compiler.assume_constant_result
def float32_matmul_mode() -> ResolvedPrecision:
    """PyTorch's float32 matmul precision on CUDA as ``"ieee"`` or ``"tf32"``, never raising.

    PyTorch 2.9+ has two APIs; with the new one set, the legacy getters
    (``torch.get_float32_matmul_precision()``, ``allow_tf32``) raise "mix of the legacy and
    new APIs". So the new API is read first: ``torch.backends.cuda.matmul.fp32_precision``
    (which already reflects ``torch.backends.fp32_precision`` and legacy settings), then the
    generic ``torch.backends.fp32_precision``; ``"none"`` defers to the legacy setting
    ("highest" -> ieee, "high"/"medium" -> tf32). A global setting, read once per compiled
    graph (dynamo cannot trace the getters).

    Example:
        >>> float32_matmul_mode() in ("ieee", "tf32")
        True
    """
    for read in (_cuda_matmul_fp32_precision, _generic_fp32_precision):
        value = read()
        if value == "tf32":
            return "tf32"
        if value == "ieee":
            return "ieee"
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # a mix of APIs that neither new getter resolved: PyTorch's default
        return "ieee"
    return "ieee" if legacy == "highest" else "tf32"


def _cuda_matmul_fp32_precision() -> str:
    return str(getattr(torch.backends.cuda.matmul, "fp32_precision", "none"))


def _generic_fp32_precision() -> str:
    return str(getattr(torch.backends, "fp32_precision", "none"))


def run_backend(
    z1: Tensor,
    z2: Tensor,
    config: LossConfig,
    local_rows: tuple[int, int] | None,
    backend: Backend,
    precision: Precision,
    chunk_size: int | None,
    p_rows: tuple[int, int] | None = None,
) -> MUSICTerms:
    """Resolve ``backend`` and ``precision`` for these inputs and run the backend.

    ``local_rows``: the batch rows ``(local_start, local_stop)`` whose invariance term this
    rank computes; ``p_rows``: the rows ``(p_row_start, p_row_stop)`` of ``P`` whose entropy
    entries it computes when sharding. ``None``: all of them.

    The parts of the result (``diag``, ``off``, ``invariance``) are detached on every backend:
    only ``loss`` carries a gradient (one rule, whatever the backend).
    """
    device_type, dtype = z1.device.type, z1.dtype
    chosen = resolve_backend(backend, device_type, dtype)
    mode = resolve_precision(precision, device_type, dtype)
    if device_type == "cuda":  # the card's own rules (music_loss._gpu_policy)
        chosen, mode = _gpu_policy.resolve_for_card(z1.device, dtype, backend, precision,
                                                    chosen, mode)
    if chosen == "reference":
        from music_loss.reference import music_loss_reference

        # "auto" keeps the reference exact (the oracle the other backends are tested
        # against, autocast or not); a named precision rounds its operands as they do.
        terms = music_loss_reference(z1, z2, config, local_rows, p_rows,
                                     precision="ieee" if precision == "auto" else mode)
    elif chosen == "torch":
        from music_loss.torch_backend import music_loss_torch

        terms = music_loss_torch(z1, z2, config, local_rows, precision=mode,
                                 chunk_size=chunk_size, p_rows=p_rows)
    else:
        from music_loss.kernels import music_loss_triton

        terms = _gpu_policy.with_torch_fallback(
            z1.device, backend,
            lambda: music_loss_triton(z1, z2, config, local_rows, precision=mode,
                                      chunk_size=chunk_size, p_rows=p_rows),
            lambda: run_backend(z1, z2, config, local_rows, "torch", precision, chunk_size,
                                p_rows))
    return MUSICTerms(terms.loss, terms.diag.detach(), terms.off.detach(),
                      terms.invariance.detach())
