"""``music_loss.baselines``: memory-light Barlow Twins and VICReg against the plain formulas.

Three independent sides: the official formulas as the benchmark peers write them
(``benchmarks.baselines``), the library's materialising references, and explicit float64
loops over features in numpy (``tests.test_baselines``, no torch, no matrix products). The
memory-light losses must equal all of them in float64 (values and autograd gradients of the
official formulas, at block sizes that split the diagonal every way), and float32 within
the table of ``tests/tolerances.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.baselines import barlow_twins_loss as official_barlow_twins
from benchmarks.baselines import vicreg_loss as official_vicreg
from music_loss.baselines import (
    BarlowTwinsLoss,
    VICRegLoss,
    barlow_twins_loss,
    barlow_twins_reference,
    vicreg_loss,
    vicreg_reference,
)
from tests.test_baselines import barlow_twins_loop, vicreg_loop
from tests.tolerances import BASELINES_FLOAT32_TOL, DTYPE_TOL, WorstErrors, relative_error

WORST = WorstErrors("music_loss.baselines: worst errors against the official formulas")
F64 = DTYPE_TOL[torch.float64]


@pytest.fixture(scope="module", autouse=True)
def _report_worst():  # type: ignore[no-untyped-def]
    yield
    WORST.report()


def _views(n: int, d: int, seed: int, scale: float = 1.0,
           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z1 = scale * (shared + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64))
    z2 = scale * (0.7 * shared + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64))
    return z1.to(dtype), z2.to(dtype)


def _value_and_grads(fn, z1: torch.Tensor, z2: torch.Tensor):  # type: ignore[no-untyped-def]
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = fn(a, b)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b)))


LOSSES: dict[str, tuple[Any, Any, Any]] = {
    "barlow_twins": (lambda c: (lambda a, b: barlow_twins_loss(a, b, chunk_size=c)),
                     official_barlow_twins, barlow_twins_reference),
    "vicreg": (lambda c: (lambda a, b: vicreg_loss(a, b, chunk_size=c)),
               official_vicreg, vicreg_reference),
}


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _loss_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error, against at least 1e-3: a Barlow Twins loss near 0 is a sum of
    ``(1 - C_ii)^2`` where ``C_ii`` is near 1 (two samples give ``C_ii = 1 / (1 + eps)``), and
    the float64 rounding of ``C_ii`` is relative to 1, not to the loss."""
    return abs(float(got) - float(want)) / max(abs(float(want)), 1e-3)


def _check_float64(name: str, n: int, d: int, chunk: int | None, seed: int,
                   scale: float) -> None:
    light, official, reference = LOSSES[name]
    z1, z2 = _views(n, d, seed, scale)
    got = _value_and_grads(light(chunk), z1, z2)
    for label, want in (("official", _value_and_grads(official, z1, z2)),
                        ("reference", _value_and_grads(reference, z1, z2))):
        assert WORST.record(f"{name} float64 loss vs {label}",
                            _loss_error(got[0], want[0])) <= F64.loss
        for g, w in zip(got[1:], want[1:]):
            assert WORST.record(f"{name} float64 grad vs {label}",
                                relative_error(g, w)) <= F64.grad


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("n,d,chunk", [(13, 37, 5), (8, 10, 3), (64, 200, None), (5, 7, 100),
                                       (2, 1, None), (9, 16, 1), (33, 48, 48)])
@pytest.mark.parametrize("scale", [0.05, 1.0, 7.0])  # 0.05: VICReg's std hinge active
def test_float64_equals_official_formulas(name: str, n: int, d: int, chunk: int | None,
                                          scale: float) -> None:
    _check_float64(name, n, d, chunk, seed=n * 1000 + d, scale=scale)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), d=st.integers(1, 20), chunk=st.integers(1, 21),
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.05, 0.5, 3.0]),
       name=st.sampled_from(list(LOSSES)))
def test_float64_any_block_size(name: str, n: int, d: int, chunk: int, seed: int,
                                scale: float) -> None:
    _check_float64(name, n, d, chunk, seed, scale)


@given(n=st.integers(3, 10), d=st.integers(2, 8), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.05, 1.0, 7.0]))
@settings(max_examples=25, deadline=None)
def test_values_equal_independent_loops(n: int, d: int, seed: int, scale: float) -> None:
    # Expected values from numpy loops over features: no torch, no matrix products.
    z1, z2 = _views(n, d, seed, scale)
    assert _loss_error(BarlowTwinsLoss(chunk_size=3)(z1, z2),
                       _f64(barlow_twins_loop(z1.numpy(), z2.numpy()))) <= 1e-10
    assert _loss_error(VICRegLoss(chunk_size=3)(z1, z2),
                       _f64(vicreg_loop(z1.numpy(), z2.numpy()))) <= 1e-10


def test_hyperparameters_reach_the_formulas() -> None:
    z1, z2 = _views(7, 5, seed=3, scale=0.2)
    assert _loss_error(BarlowTwinsLoss(lambd=0.3)(z1, z2),
                       _f64(barlow_twins_loop(z1.numpy(), z2.numpy(), lambd=0.3))) <= 1e-10
    assert _loss_error(VICRegLoss(sim_coeff=2.0, std_coeff=3.0, cov_coeff=5.0)(z1, z2),
                       _f64(vicreg_loop(z1.numpy(), z2.numpy(), 2.0, 3.0, 5.0))) <= 1e-10
    # eps: the BatchNorm eps and VICReg's variance eps.
    for eps in (1e-3, 0.5):
        assert relative_error(BarlowTwinsLoss(eps=eps)(z1, z2),
                              barlow_twins_reference(z1, z2, eps=eps)) <= F64.loss
        assert relative_error(VICRegLoss(eps=eps)(z1, z2),
                              vicreg_reference(z1, z2, eps=eps)) <= F64.loss


@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_within_tolerance(name: str) -> None:
    """float32 inputs at a realistic shape against float64 official formulas."""
    light, official, _ = LOSSES[name]
    z1, z2 = _views(256, 640, seed=7)
    want = _value_and_grads(official, z1, z2)
    got = _value_and_grads(light(None), z1.float(), z2.float())
    assert got[0].dtype == torch.float32
    assert WORST.record(f"{name} float32 loss", relative_error(got[0], want[0])) \
        <= BASELINES_FLOAT32_TOL.loss
    for g, w in zip(got[1:], want[1:]):
        assert WORST.record(f"{name} float32 grad", relative_error(g, w)) \
            <= BASELINES_FLOAT32_TOL.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    z1, z2 = _views(32, 24, seed=2, dtype=dtype)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = BarlowTwinsLoss()(a, b)
    loss.backward()
    assert loss.dtype == torch.float32 and a.grad is not None and a.grad.dtype == dtype
    want = barlow_twins_reference(z1.double(), z2.double())
    assert relative_error(loss, want) <= DTYPE_TOL[dtype].loss


class ProductFlops(TorchDispatchMode):
    """FLOPs of the matrix products run under it (``mm``, ``addmm`` and in-place ``addmm_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[:2] if name == "mm" else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


#: Products per loss, in units of N D^2: (both views need grad, one view does).
PRODUCT_FLOPS = {"barlow_twins": (6, 4), "vicreg": (8, 6)}


@pytest.mark.parametrize("name", list(LOSSES))
def test_view_without_grad_costs_no_gradient_product(name: str) -> None:
    light, official, _ = LOSSES[name]
    n, d = 16, 40
    z1, z2 = _views(n, d, seed=4)
    both, one = PRODUCT_FLOPS[name]
    for requires, units in (((True, True), both), ((True, False), one), ((False, True), one)):
        a = z1.clone().requires_grad_(requires[0])
        b = z2.clone().requires_grad_(requires[1])
        with ProductFlops() as counter:
            loss = light(8)(a, b)
        assert counter.flops == units * n * d * d, (requires, counter.flops / (n * d * d))
        loss.backward()
        x, y = z1.clone().requires_grad_(requires[0]), z2.clone().requires_grad_(requires[1])
        official(x, y).backward()
        for got, want in ((a.grad, x.grad), (b.grad, y.grad)):
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                assert relative_error(got, want) <= F64.grad


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_grad_call_returns_the_value(name: str) -> None:
    light, official, _ = LOSSES[name]
    z1, z2 = _views(16, 40, seed=4)
    with torch.no_grad():
        got = light(7)(z1.requires_grad_(), z2)
    assert not got.requires_grad
    assert relative_error(got, official(z1.detach(), z2)) <= F64.loss


def test_double_backward_is_refused() -> None:
    z1, z2 = _views(8, 6, seed=0)
    a = z1.clone().requires_grad_()
    for loss_fn in (BarlowTwinsLoss(), VICRegLoss()):
        loss = loss_fn(a, z2)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, a, create_graph=True)


def test_grad_output_scales_the_gradients() -> None:
    z1, z2 = _views(9, 11, seed=6)
    for loss_fn in (BarlowTwinsLoss(chunk_size=4), VICRegLoss(chunk_size=4)):
        a = z1.clone().requires_grad_()
        (3.5 * loss_fn(a, z2)).backward()
        b = z1.clone().requires_grad_()
        loss_fn(b, z2).backward()
        assert a.grad is not None and b.grad is not None
        assert relative_error(a.grad, 3.5 * b.grad) <= F64.grad


@pytest.mark.parametrize("cls", [BarlowTwinsLoss, VICRegLoss])
@pytest.mark.parametrize("kwargs,error,pattern", [
    ({"eps": 0.0}, ValueError, "eps must be > 0"),
    ({"eps": "1e-5"}, TypeError, "eps must be a real number"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({"gather_distributed": 1}, TypeError, "gather_distributed must be True or False"),
])
def test_bad_constructor_arguments(cls, kwargs, error, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=re.escape(pattern)):
        cls(**kwargs)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"lambd": -1.0}, "lambd must be >= 0.0, got -1.0; the paper uses lambd=0.0051"),
    ({"lambd": float("nan")}, "lambd must be finite"),
])
def test_bad_barlow_twins_arguments(kwargs, pattern) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=re.escape(pattern)):
        BarlowTwinsLoss(**kwargs)


@pytest.mark.parametrize("name", ["sim_coeff", "std_coeff", "cov_coeff"])
def test_bad_vicreg_coefficients(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name} must be >= 0.0, got -2.0; "
                                                   "the paper uses")):
        VICRegLoss(**{name: -2.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        VICRegLoss(**{name: None})  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [BarlowTwinsLoss, VICRegLoss])
def test_bad_views(cls) -> None:  # type: ignore[no-untyped-def]
    loss_fn = cls()
    z = torch.randn(8, 6)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(z, torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"shape \(batch, dim\)"):
        loss_fn(z.flatten(), z.flatten())
    with pytest.raises(TypeError, match="floating-point"):
        loss_fn(z.long(), z.long())
    with pytest.raises(TypeError, match="same dtype"):
        loss_fn(z, z.double())
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss_fn(z[:1], z[:1])
    with pytest.raises(ValueError, match="initialised process group"):
        cls(gather_distributed=True)(z, z)
