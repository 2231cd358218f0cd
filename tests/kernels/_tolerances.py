"""Tolerances of the kernel tests that ``tests/tolerances.py`` does not (yet) hold.

``ieee`` and ``tf32`` (the interpreter computes tf32 as exact fp32, SPEC 5) use
``tests.tolerances.DTYPE_TOL`` / ``PRECISION_TOL["ieee"]`` against float64 autograd of the
reference. ``bf16`` in the interpreter (operands rounded to bf16, fp32 dot) is checked
against a float64 oracle that rounds the same operands the same way
(:func:`tests.kernels._oracle.rounded_oracle`); what remains is fp32 accumulation and rare
one-ulp differences in where a value rounds.
"""

from __future__ import annotations

from tests.tolerances import Tol

#: bf16 operands (emulated) vs the float64 oracle rounding the same operands.
BF16_EMULATED_VS_ROUNDED_ORACLE = Tol(loss=1e-5, grad=1e-4)
