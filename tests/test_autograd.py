"""Autograd contract of every backend: double backward, one view without grad,
the gradient rule of ``return_terms``, float32 gradients under a loss scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from music_loss import MUSICLoss, music_loss
from tests.tolerances import DTYPE_TOL, relative_error

FAST_BACKENDS = ["torch", "triton"]  # triton: Triton's interpreter on CPU (tests/conftest.py)
ALL_BACKENDS = ["reference", *FAST_BACKENDS]


def _gradient_penalty_setup(dtype=torch.float64):
    """Linear-Tanh-Linear projector and a gradient penalty d||dL/dx1||^2 / dW2."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 24)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    x1 = torch.randn(10, 6, generator=gen, dtype=dtype)
    x2 = x1 + 0.3 * torch.randn(10, 6, generator=gen, dtype=dtype)
    return model, x1, x2


def _penalty(model, x1, x2, backend):
    x1 = x1.clone().requires_grad_(True)
    loss = music_loss(model(x1), model(x2), 4, backend=backend)
    (g,) = torch.autograd.grad(loss, x1, create_graph=True)
    return g.pow(2).sum()


def test_double_backward_is_exact_on_the_reference():
    model, x1, x2 = _gradient_penalty_setup()
    w2 = model[2].weight
    (got,) = torch.autograd.grad(_penalty(model, x1, x2, "reference"), w2)
    # Central differences of the penalty in float64 along a random direction.
    direction = torch.randn(w2.shape, generator=torch.Generator().manual_seed(1),
                            dtype=w2.dtype)
    h = 1e-5
    with torch.no_grad():
        w2 += h * direction
    plus = float(_penalty(model, x1, x2, "reference").detach())
    with torch.no_grad():
        w2 -= 2 * h * direction
    minus = float(_penalty(model, x1, x2, "reference").detach())
    with torch.no_grad():
        w2 += h * direction
    numeric = (plus - minus) / (2 * h)
    analytic = float((got * direction).sum())
    assert abs(analytic - numeric) <= 1e-6 * abs(numeric)


def test_double_backward_gradgradcheck_reference():
    gen = torch.Generator().manual_seed(2)
    z1 = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: music_loss(a, b, 3, eps=1e-3, backend="reference")
    assert torch.autograd.gradgradcheck(fn, (z1, z2), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_double_backward_is_refused_with_a_clear_error(backend):
    # Before: backend="torch" returned 3.24e-3 where the reference gives 5.78e-3, silently.
    dtype = torch.float32 if backend == "triton" else torch.float64
    model, x1, x2 = _gradient_penalty_setup(dtype)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        _penalty(model, x1, x2, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_double_backward_refused_even_when_grad_output_does_not_require_grad(backend):
    # once_differentiable alone raises only when the incoming gradient requires grad; here
    # it does not (the loss is the root), yet create_graph=True builds a graph through it.
    dtype = torch.float32 if backend == "triton" else torch.float64
    z1 = torch.randn(6, 12, dtype=dtype, requires_grad=True)
    z2 = torch.randn(6, 12, dtype=dtype)
    loss = music_loss(z1, z2, 3, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, z1, create_graph=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_first_derivatives_still_work_after_the_check(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 12, generator=gen, dtype=dtype, requires_grad=True)
    z2 = torch.randn(6, 12, generator=gen, dtype=dtype, requires_grad=True)
    loss = music_loss(z1, z2, 3, backend=backend)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    z1r, z2r = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    w1, w2 = torch.autograd.grad(music_loss(z1r, z2r, 3, backend="reference"), (z1r, z2r))
    tol = DTYPE_TOL[dtype].grad
    assert relative_error(g1, w1) <= tol and relative_error(g2, w2) <= tol


# ---------------------------------------------------------------------------------------
# return_terms: one gradient rule on every backend
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_return_terms_parts_are_detached_on_every_backend(backend):
    z1 = torch.randn(8, 24, requires_grad=True)
    z2 = torch.randn(8, 24, requires_grad=True)
    terms = music_loss(z1, z2, 6, backend=backend, return_terms=True)
    assert terms.loss.requires_grad
    assert not any(t.requires_grad for t in (terms.diag, terms.off, terms.invariance))
    module_terms = MUSICLoss(6, backend=backend)(z1, z2, return_terms=True)
    assert not any(t.requires_grad for t in module_terms[1:])
    assert torch.allclose(terms.loss, terms.diag + terms.off + terms.invariance,
                          rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Only one view requires grad: no work on the other view's gradient product
# ---------------------------------------------------------------------------------------
def _count_mm(fn):
    with torch.profiler.profile() as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return counts.get("aten::addmm_", 0), counts.get("aten::mm", 0)


def test_torch_backend_skips_the_product_of_a_view_without_grad():
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(16, 240, generator=gen)
    z2 = torch.randn(16, 240, generator=gen)
    chunks = 3  # 240 rows of P in blocks of 80

    def run(grad1, grad2):
        a, b = z1.clone().requires_grad_(grad1), z2.clone().requires_grad_(grad2)
        return lambda: music_loss(a, b, 80, backend="torch", chunk_size=80)

    both_addmm, both_mm = _count_mm(run(True, True))
    one_addmm, one_mm = _count_mm(run(True, False))
    other_addmm, _ = _count_mm(run(False, True))
    assert both_mm == one_mm == chunks  # the forward products P
    assert both_addmm == 2 * chunks  # two gradient products per block
    assert one_addmm == other_addmm == chunks  # only the view that needs it


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("which", [0, 1])
def test_one_view_requiring_grad_gets_the_right_gradient(backend, which):
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(4)
    z = [torch.randn(9, 40, generator=gen, dtype=torch.float64) * 2 for _ in range(2)]
    z = [t.to(dtype) for t in z]
    z[which].requires_grad_(True)
    (g,) = torch.autograd.grad(music_loss(z[0], z[1], 8, backend=backend), (z[which],))
    ref = [t.detach().double() for t in z]
    ref[which].requires_grad_(True)
    (want,) = torch.autograd.grad(music_loss(ref[0], ref[1], 8, backend="reference"),
                                  (ref[which],))
    assert relative_error(g, want) <= DTYPE_TOL[dtype].grad


def test_triton_skips_the_product_of_a_view_without_grad():
    pytest.importorskip("music_loss.kernels")
    from music_loss.kernels import launchers

    calls = []
    original = launchers._matmul

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    gen = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(12, 60, generator=gen), torch.randn(12, 60, generator=gen)
    launchers._matmul = counting
    counts = []
    try:
        for grad1, grad2 in ((True, False), (False, True), (True, True)):
            calls.clear()
            music_loss(z1.clone().requires_grad_(grad1), z2.clone().requires_grad_(grad2), 20,
                       backend="triton", precision="ieee")
            counts.append(len(calls))
    finally:
        launchers._matmul = original
    one, other, both = counts
    assert one == other and both == 2 * one and one >= 1


# ---------------------------------------------------------------------------------------
# fp16 inputs under a loss scale: gradients stay float32 until grad_output scales them
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", [65536.0, 1024.0])
def test_fp16_inputs_with_gradscaler_scale(backend, scale):
    # GradScaler starts at 65536, which is inf in fp16: casting the scale (or rounding the
    # unscaled gradient to fp16 before scaling) loses every step.
    gen = torch.Generator().manual_seed(6)
    # At N=512, D=960 the unscaled gradients sit near fp16's smallest normals (before the
    # fix, 12.8% of them underflowed to 0 at scale 1024); the interpreter takes a smaller one.
    n, d, k = (48, 120, 20) if backend == "triton" else (512, 960, 80)
    z1 = (torch.randn(n, d, generator=gen) * 2).half()
    z2 = (z1.float() + torch.randn(n, d, generator=gen)).half()
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = music_loss(a, b, k, backend=backend, precision="ieee")
    g1, g2 = torch.autograd.grad(loss * scale, (a, b))
    assert g1.dtype == torch.float16
    a64, b64 = z1.double().requires_grad_(True), z2.double().requires_grad_(True)
    w1, w2 = torch.autograd.grad(music_loss(a64, b64, k, backend="reference") * scale,
                                 (a64, b64))
    for got, want in ((g1, w1), (g2, w2)):
        assert torch.isfinite(got).all()
        representable = want.abs() >= 2.0**-23  # twice fp16's smallest subnormal: never 0
        assert (got[representable] != 0).all()
        assert relative_error(got, want) <= DTYPE_TOL[torch.float16].grad
