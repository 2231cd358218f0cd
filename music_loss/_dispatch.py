"""Choosing a backend and a matmul precision (SPEC 2): one place, no host syncs."""

from __future__ import annotations

import os

import torch
from torch import Tensor

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def triton_unavailable_reason(z: Tensor) -> str | None:
    """Why the Triton backend cannot run on ``z`` (``None`` when it can)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if z.device.type != "cuda" and not (interpret and z.device.type == "cpu"):
        return (f"the Triton backend needs CUDA tensors (got device {z.device.type!r}); "
                "use backend='torch', or set TRITON_INTERPRET=1 to run the kernels on CPU "
                "tensors in Triton's interpreter (slow; for testing)")
    if z.device.type == "cuda" and torch.version.hip is not None:
        return "the Triton backend is not yet tested on ROCm; use backend='torch'"
    if z.dtype == torch.float64:
        return "the Triton backend computes in float32; use backend='torch' for float64 inputs"
    try:
        import triton  # noqa: F401
    except ImportError as err:  # pragma: no cover - triton ships with Linux torch wheels
        return f"Triton does not import ({err}); install triton or use backend='torch'"
    return None


def resolve_backend(backend: str, z: Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA tensors on NVIDIA GPUs with Triton, else ``torch``."""
    if backend == "auto":
        if z.device.type == "cuda" and triton_unavailable_reason(z) is None:
            return "triton"
        return "torch"
    if backend == "triton":
        reason = triton_unavailable_reason(z)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
    return backend


def resolve_precision(precision: str, z: Tensor) -> str:
    """``auto``: 16-bit inputs or autocast -> ``bf16``; float32 follows PyTorch's matmul setting.

    fp16 inputs also map to bf16 operands: fp16 cannot hold probabilities below 6e-8, and the
    clamp puts them at 1e-8.
    """
    if precision != "auto":
        return precision
    if z.dtype == torch.float64:
        return "ieee"
    if z.dtype in _SIXTEEN_BIT or torch.is_autocast_enabled(z.device.type):
        return "bf16"
    return "ieee" if _float32_matmul_precision() == "highest" else "tf32"


@torch.compiler.assume_constant_result
def _float32_matmul_precision() -> str:
    # A global setting, read once per compiled graph (dynamo cannot trace the getter).
    return torch.get_float32_matmul_precision()
