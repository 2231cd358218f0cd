"""Helpers shared by the Triton kernels: interpreter detection, the precision-switched dot,
launch bookkeeping and the int64-offset rule.

The interpreter flag is read once, at import: ``@triton.jit`` returns an interpreted
function when ``TRITON_INTERPRET=1`` is set at decoration time (SPEC 5), so the launchers
must agree with what the decorators saw.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

#: True when the kernels were decorated under ``TRITON_INTERPRET=1`` (CPU tensors, numpy).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Matmul operand modes (SPEC 2 ``precision``); the accumulator and the epilogue are fp32.
PRECISION_MODES: tuple[str, ...] = ("ieee", "tf32", "bf16")

#: Smallest normal float32: the floor inside every log (``music_loss._config.TINY``).
TINY_F32: float = float(torch.finfo(torch.float32).tiny)

#: Offsets past this need 64-bit arithmetic (``N * D >= 2**31``, SPEC 2).
INT32_LIMIT: int = 2**31


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is a kernel mode, else raise a ValueError naming the fix."""
    if precision not in PRECISION_MODES:
        raise ValueError(f"precision must be one of {PRECISION_MODES} for the Triton kernels, "
                         f"got {precision!r}; resolve 'auto' with "
                         "music_loss._dispatch.resolve_precision first")
    return precision


def needs_int64(*tensors: Tensor) -> bool:
    """True when the largest element offset of any tensor reaches ``2**31``."""
    for t in tensors:
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if t.numel() > 0 and extent >= INT32_LIMIT:
            return True
    return False


def emulate_bf16() -> bool:
    """bf16 ``tl.dot`` is wrong in the interpreter (Triton #11584): round, then fp32 dot.

    The interpreter also converts fp32 to bf16 by truncation, where GPUs round to nearest
    even, so emulation rounds with :func:`round_to_bf16` and keeps the values in fp32.
    """
    return INTERPRET


def operand_dtype(precision: str) -> torch.dtype:
    """Storage dtype of the matmul operands: bf16 halves traffic in bf16 mode, else fp32
    (and fp32 holding bf16-rounded values when bf16 is emulated)."""
    return torch.bfloat16 if precision == "bf16" and not emulate_bf16() else torch.float32


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= ``max(x, 1)``."""
    return 1 << max(0, (max(x, 1) - 1).bit_length())


def launch(autotuned: Any, raw: Any, grid: Any, fixed: dict[str, Any] | None,
           *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Launch ``autotuned`` on a GPU, or ``raw`` with ``fixed`` meta-parameters.

    The interpreter benchmarks nothing usefully (each config would run at numpy speed), so
    under it, or when the caller pins a config (tests), the raw kernel runs with ``fixed``.

    Returns:
        The meta-parameters the launch used (the launcher needs them to size partial sums).
    """
    if fixed is None and INTERPRET:
        raise ValueError("a fixed config is required under TRITON_INTERPRET=1")
    if fixed is not None:
        meta = dict(fixed)
        num_warps = meta.pop("num_warps", 4)
        num_stages = meta.pop("num_stages", 2)
        raw[grid](*args, **kwargs, **meta, num_warps=num_warps, num_stages=num_stages)
        return meta
    autotuned[grid](*args, **kwargs)
    return dict(autotuned.best_config.kwargs)


@triton.jit
def lg(x):
    """``log(max(x, tiny))`` with NaN propagated (a NaN input must give a NaN loss, and
    ``tl.maximum`` alone may return the non-NaN operand)."""
    return tl.log(tl.maximum(x, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32 (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; operands as the precision mode says.

    ``ieee``: exact fp32 products (FMA units). ``tf32``: tensor cores on fp32 operands.
    ``bf16``: bf16 operands on tensor cores, or (``EMULATE_BF16``, the interpreter) the same
    bf16 rounding followed by an exact fp32 dot.
    """
    if PRECISION == "bf16":
        if EMULATE_BF16:
            acc = tl.dot(round_to_bf16(a.to(tl.float32)), round_to_bf16(b.to(tl.float32)),
                         acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "tf32":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc
