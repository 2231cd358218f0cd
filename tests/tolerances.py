"""The one tolerance table of the test suite, and the error measure it applies to.

Errors are relative and norm-wise: ``||got - want||_F / ||want||_F`` against a float64
computation on the same (already rounded) inputs. Loss values are scalars, so the same
measure is a relative error there.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
from torch import Tensor


class Tol(NamedTuple):
    loss: float
    grad: float


#: By input dtype. 16-bit inputs upcast exactly and the math runs in float32, so their
#: loss meets the float32 target; their gradients come back rounded to the input dtype.
#: float32: the documented target for every backend in ieee mode (measured: ~6e-8 / ~1e-6 at
#: N=512, D=8160).
DTYPE_TOL: dict[torch.dtype, Tol] = {
    torch.float64: Tol(loss=1e-12, grad=1e-10),
    torch.float32: Tol(loss=1e-6, grad=1e-5),
    torch.float16: Tol(loss=1e-6, grad=2e-3),
    torch.bfloat16: Tol(loss=1e-6, grad=1.6e-2),
}

#: float32 with ``eps = 0`` (no clamp) at low temperature: see ``test_properties``.
FLOAT32_NO_CLAMP_TOL = Tol(loss=1e-6, grad=1e-4)

#: By matmul precision, float32 inputs, against float64 with unrounded operands. bf16
#: operands carry 8 significant bits (relative rounding 2^-9 per operand).
PRECISION_TOL: dict[str, Tol] = {
    "ieee": DTYPE_TOL[torch.float32],
    "tf32": Tol(loss=2e-3, grad=2e-2),
    "bf16": Tol(loss=5e-3, grad=3e-2),
}

#: bf16 mode under Triton's interpreter (operands rounded to bf16 round-to-nearest-even, fp32
#: dot) against a float64 oracle that rounds the same operands the same way: what remains is
#: fp32 accumulation and rare one-ulp differences in where a value rounds.
BF16_EMULATED_VS_ROUNDED_ORACLE = Tol(loss=1e-5, grad=1e-4)

#: tf32 mode under the interpreter (operands rounded to tf32 where stored, then truncated as
#: tensor cores read them, fp32 dot) against the float64 oracle rounding the same operands:
#: fp32 accumulation and one-ulp differences in where a value rounds, as for bf16.
TF32_EMULATED_VS_ROUNDED_ORACLE = BF16_EMULATED_VS_ROUNDED_ORACLE


class LogBound(NamedTuple):
    absolute: float
    relative: float


#: The error assumed for the epilogue's fast log in tf32/bf16 mode (``lg2.approx.f32`` times
#: ln 2): ``|fast - log x| <= absolute + relative * |log x|``, twice what NVIDIA states for
#: ``__log2f`` (2^-22 absolute on [0.5, 2], 2 ulps elsewhere). The CPU test evaluates the
#: loss error this allows; the GPU test measures the device against it.
FAST_LOG_BOUND = LogBound(absolute=2.0**-21, relative=2.0**-21)


def relative_error(got: Tensor, want: Tensor) -> float:
    """``||got - want||_F / ||want||_F`` in float64 (absolute when ``want`` is zero)."""
    got64, want64 = got.detach().double(), want.detach().double()
    scale = want64.norm()
    diff = (got64 - want64).norm()
    return float(diff / scale) if scale > 0 else float(diff)


def loss_error(got: Tensor, want_terms: tuple[Tensor, ...], floor: float = 0.0) -> float:
    """Loss error relative to the size of the parts it sums: ``|got - want| / max(|want|,
    |diag| + |off| + |invariance|)`` (float64 parts).

    A float32 part carries a relative rounding error near 1e-7 of itself however it is
    computed; when the parts nearly cancel (a loss of -0.075 from parts -1.8, -4.0 and +5.7,
    seen at logit scale 50) that error, relative to the loss alone, is ~100x larger without
    anything being wrong. The parts themselves are compared with :func:`relative_error`.

    ``floor``: a lower bound of the scale, for losses whose parts are all near 0. Each
    normalised part is a mean of O(1) values per unit weight (entropies over log K, logs of
    agreements), so its float32 error is ~1e-7 x its weight even when it is 0.001: pass the
    sum of the absolute weights (the invariance term of views that agree is
    ``-log(1 - 1e-3)``, whose float32 error is 1e-7 absolute).
    """
    loss, *parts = (float(t.detach()) for t in want_terms)
    scale = max(abs(loss), sum(abs(p) for p in parts), floor)
    return abs(float(got.detach()) - loss) / scale if scale > 0 else abs(float(got.detach()))


class WorstErrors:
    """The worst error seen per key over a test module, printed at its end (``pytest -s``).

    Example:
        >>> worst = WorstErrors("worst errors")
        >>> worst.record("torch grad", 2e-6) == 2e-6 and worst.record("torch grad", 1e-6) == 1e-6
        True
        >>> worst.report()
        <BLANKLINE>
        worst errors:
          torch grad 2.00e-06
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.worst: dict[str, float] = defaultdict(float)

    def record(self, key: str, value: float) -> float:
        """Keep the largest ``value`` seen for ``key``; return ``value`` (to assert on it)."""
        self.worst[key] = max(self.worst[key], value)
        return value

    def report(self) -> None:
        if self.worst:
            width = max(map(len, self.worst))
            print(f"\n{self.title}:")
            for key, value in sorted(self.worst.items()):
                print(f"  {key:{width}s} {value:.2e}")

#: The memory-light Barlow Twins and VICReg on float32 inputs against the official formulas
#: in float64 (N=256, D=640). Their terms are sums of D^2 squares of correlations computed
#: in float32 (accumulated in float64).
BASELINES_FLOAT32_TOL = Tol(loss=1e-6, grad=1e-5)
