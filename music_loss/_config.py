"""Loss hyperparameters and the small pure helpers every backend shares.

One frozen :class:`LossConfig` travels from the public API through the dispatch into a
backend, so the math has exactly one place that turns the user's weights and
normalisation into the per-entry coefficients ``c`` of the diagonal and off-block entries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Normalization = Literal["blocks", "joint"]
Backend = Literal["auto", "triton", "torch", "reference"]
Precision = Literal["auto", "ieee", "tf32", "bf16"]

#: Resolved matmul modes a backend receives (``"auto"`` is resolved by the dispatch).
ResolvedPrecision = Literal["ieee", "tf32", "bf16"]

NORMALIZATIONS: tuple[str, ...] = ("blocks", "joint")
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "reference")
PRECISIONS: tuple[str, ...] = ("auto", "ieee", "tf32", "bf16")

#: Floor inside every log: ``lg(x) = log(max(x, TINY))`` (smallest normal float32).
TINY: float = torch.finfo(torch.float32).tiny


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast off for this device type (the backends choose their operand precision
    themselves); nothing to turn off on device types autocast does not know (``meta``)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def round_to_tf32(x: Tensor) -> Tensor:
    """fp32 -> nearest tf32 value (10 mantissa bits, ties to even), kept in fp32 (finite x)."""
    bits = x.view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def matmul_operand(p: Tensor, precision: str) -> Tensor:
    """A product's operand as the precision says (fp32 accumulation always).

    ``bf16``: rounded to bf16 values, multiplied exactly. ``tf32``: on CUDA, rounded to tf32
    values (nearest-even, as cuBLAS does), which makes the product tf32 whatever PyTorch's
    global setting (CPU has no tf32: it computes fp32 there). ``ieee``: unchanged.
    """
    if precision == "bf16":
        return p.to(torch.bfloat16).to(p.dtype)
    if precision == "tf32" and p.device.type == "cuda" and p.dtype == torch.float32:
        return round_to_tf32(p)
    return p


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class MUSICTerms(NamedTuple):
    """The loss and its three weighted, normalised parts (``loss = diag + off + invariance``).

    Gradient rule, the same on every backend: only ``loss`` carries a gradient; ``diag``,
    ``off`` and ``invariance`` are detached values for logging.

    Attributes:
        loss: The scalar MUSIC loss.
        diag: ``w_diag * H_diag`` after normalisation (``/ S`` or ``/ S**2``).
        off: ``w_off * H_off`` after normalisation (``/ (S (S-1))`` or ``/ S**2``).
        invariance: ``w_inv * L_inv``.
    """

    loss: Tensor
    diag: Tensor
    off: Tensor
    invariance: Tensor


@dataclass(frozen=True)
class LossConfig:
    """Validated hyperparameters of the MUSIC loss (:func:`music_loss.functional.music_loss`)."""

    segment_dim: int
    temperature: float = 1.0
    eps: float = 1e-8
    diag_weight: float = 1.0
    off_weight: float = 1.0
    invariance_weight: float = 1.0
    normalization: Normalization = "blocks"

    def num_segments(self, dim: int) -> int:
        return dim // self.segment_dim

    def coefficients(self, dim: int) -> tuple[float, float]:
        """Multipliers ``(c_diag, c_off)`` of the raw sums ``H_diag`` and ``H_off``."""
        s = self.num_segments(dim)
        if self.normalization == "blocks":
            c_off = self.off_weight / (s * (s - 1)) if s > 1 else 0.0
            return self.diag_weight / s, c_off
        return self.diag_weight / s**2, self.off_weight / s**2
