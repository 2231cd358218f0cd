"""Helpers shared by the Triton kernels: interpreter detection, the precision-switched dot,
launch bookkeeping and the int64-offset rule.

The interpreter flag is read once, at import: ``@triton.jit`` returns an interpreted
function when ``TRITON_INTERPRET=1`` is set at decoration time, so the launchers
must agree with what the decorators saw.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

#: True when the kernels were decorated under ``TRITON_INTERPRET=1`` (CPU tensors, numpy).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter_scalar_index() -> bool:
    """Make triton < 3.7's interpreter take a runtime scalar as a loop bound with NumPy >= 2.4.

    The interpreter holds a scalar kernel argument as a 1-element 1-D array and defines
    ``tensor.__index__`` as ``int(array)``; NumPy 2.4 turned that conversion (deprecated since
    1.25) into ``TypeError: only 0-dimensional arrays can be converted to Python scalars``,
    so every ``for k in range(0, K, BLOCK_K)`` fails there. Triton 3.8 squeezes the array
    first; this applies the same one-line change to older interpreters (with NumPy 2.3 the
    unpatched triton 3.6 interpreter passes the same tests). Returns True if it patched.
    """
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 7):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


#: True when triton's interpreter needed :func:`_patch_interpreter_scalar_index`.
INTERPRETER_PATCHED: bool = INTERPRET and _patch_interpreter_scalar_index()

#: Matmul operand modes (the ``precision`` argument); the accumulator and the epilogue are fp32.
PRECISION_MODES: tuple[str, ...] = ("ieee", "tf32", "bf16")

#: Smallest normal float32: the floor inside every log (``music_loss._config.TINY``).
TINY_F32: float = float(torch.finfo(torch.float32).tiny)

#: Offsets past this need 64-bit arithmetic (``N * D >= 2**31``).
INT32_LIMIT: int = 2**31


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is a kernel mode, else raise a ValueError naming the fix."""
    if precision not in PRECISION_MODES:
        raise ValueError(f"precision must be one of {PRECISION_MODES} for the Triton kernels, "
                         f"got {precision!r}; resolve 'auto' with "
                         "music_loss._dispatch.resolve_precision first")
    return precision


def device_of(tensor: Tensor) -> Any:
    """Launch on ``tensor``'s GPU, not the current one (Triton launches on the current device).

    Example:
        >>> import torch
        >>> with device_of(torch.zeros(1)):
        ...     pass
    """
    return (torch.cuda.device(tensor.device) if tensor.device.type == "cuda"
            else contextlib.nullcontext())


def needs_int64(*tensors: Tensor) -> bool:
    """True when the largest element offset of any tensor reaches ``2**31``."""
    for t in tensors:
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if t.numel() > 0 and extent >= INT32_LIMIT:
            return True
    return False


def emulate_tensor_cores() -> bool:
    """True when the kernels emulate the tensor cores' bf16 and tf32 operands (the interpreter).

    The interpreter's bf16 ``tl.dot`` is wrong (Triton #11584) and it converts fp32 to bf16
    by truncation, where GPUs round to nearest even; it computes ``input_precision="tf32"``
    as exact fp32, while tensor cores drop the low 13 mantissa bits of each fp32 operand
    (truncation, no rounding). So under the interpreter the kernels round to bf16
    (:func:`round_to_bf16`, values kept in fp32) or truncate to tf32 themselves and take an
    exact fp32 dot: CPU tests see what a GPU computes, the tf32 truncation bias included.

    Example:
        >>> emulate_tensor_cores() == INTERPRET
        True
    """
    return INTERPRET


def operand_dtype(precision: str) -> torch.dtype:
    """Storage dtype of the matmul operands: bf16 halves traffic in bf16 mode, else fp32
    (and fp32 holding bf16-rounded values when bf16 is emulated)."""
    return torch.bfloat16 if precision == "bf16" and not emulate_tensor_cores() else torch.float32


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
def lg2_fast(x, EMULATE: tl.constexpr):
    """``log2(max(x, tiny))`` by the special-function unit: PTX ``lg2.approx.ftz.f32`` (one
    ``MUFU.LG2``; PTX ISA: maximum relative error 2^-22 over the normal range), where
    libdevice's accurate ``logf`` costs ~50 SASS instructions per entry. For the tf32/bf16
    modes, whose operands already carry 2^-11 / 2^-9 relative rounding. ``EMULATE`` (the
    interpreter, which runs no PTX): the accurate log.

    ``.ftz`` (flush subnormal inputs to zero): the input is clamped to the smallest normal
    float first, so no subnormal ever reaches the instruction and flushing changes no
    result; without ``.ftz`` ptxas wraps each ``MUFU.LG2`` in a subnormal fix-up (a compare,
    a scale and a select per entry) that can never fire here."""
    y = tl.maximum(x, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
    if EMULATE:
        return tl.log2(y)
    else:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [y],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def lg_fast(x, EMULATE: tl.constexpr):
    """:func:`lg` by the special-function unit: :func:`lg2_fast` times ln 2."""
    return lg2_fast(x, EMULATE) * 0.6931471805599453


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32 (finite inputs)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def truncate_to_tf32(x):
    """fp32 -> tf32 the way tensor cores read an fp32 operand: low 13 mantissa bits dropped."""
    bits = x.to(tl.uint32, bitcast=True) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_tf32(x, EMULATE: tl.constexpr):
    """fp32 -> the nearest tf32 value (10 mantissa bits), kept in fp32 (finite inputs).

    On a GPU: PTX ``cvt.rna.tf32.f32`` (what cuBLAS uses; ties away from zero, available
    from sm_80; the ties-to-even ``cvt.rn`` form needs sm_90). ``EMULATE`` (the
    interpreter, which runs no PTX): the same operation on the bits - add half an ulp of
    tf32 to the magnitude, then drop the 13 low bits.
    """
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x1000) & 0xFFFFE000
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
            EMULATE_TF32: tl.constexpr = False):
    """``acc + a @ b`` with fp32 accumulation; operands as the precision mode says.

    ``ieee``: exact fp32 products (FMA units). ``tf32``: tensor cores on fp32 operands, or
    (``EMULATE_TF32``, the interpreter) the operands truncated as tensor cores read them,
    then an exact fp32 dot. ``bf16``: bf16 operands on tensor cores, or (``EMULATE_BF16``,
    the interpreter) the same bf16 rounding followed by an exact fp32 dot.
    """
    if PRECISION == "bf16":
        if EMULATE_BF16:
            acc = tl.dot(round_to_bf16(a.to(tl.float32)), round_to_bf16(b.to(tl.float32)),
                         acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == "tf32":
        if EMULATE_TF32:
            acc = tl.dot(truncate_to_tf32(a.to(tl.float32)), truncate_to_tf32(b.to(tl.float32)),
                         acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc
