"""Every PyTorch backend against the float64 reference, forward and backward.

The float64 reference is itself checked against an independent transcription of the math
in ``test_reference.py``. Errors are norm-wise (``tests/tolerances.py``); the worst ones over
the matrix are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from music_loss import MUSICLoss, music_loss
from tests.tolerances import DTYPE_TOL, PRECISION_TOL, WorstErrors, relative_error

BACKENDS = ["reference", "torch"]
SHAPES = [  # (N, D, K): K not a power of two, S = 1, N = 2, nothing a multiple of a block size
    (2, 6, 3),
    (7, 21, 3),
    (5, 12, 12),
    (33, 50, 5),
    (16, 240, 80),
    (9, 35, 7),
]
OPTIONS = [  # (normalization, eps, temperature, weights)
    ("blocks", 1e-8, 1.0, (1.0, 1.0, 1.0)),
    ("joint", 1e-8, 1.0, (1.0, 1.0, 1.0)),
    ("blocks", 0.0, 0.5, (1.0, 1.0, 1.0)),
    ("joint", 1e-3, 2.0, (0.5, 2.0, 0.3)),
    ("blocks", 1e-8, 1.0, (0.0, 1.0, 0.0)),
]
WORST = WorstErrors("worst errors vs float64 over the matrix")


def _views(n, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed + 7 * n + d)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2
    z2 = z1 + torch.randn(n, d, generator=gen, dtype=torch.float64)  # correlated views
    return z1.to(dtype), z2.to(dtype)


def _loss_and_grads(z1, z2, k, backend, grad_scale=1.0, autocast=False, **kwargs):
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    # Forward under autocast, backward outside it, as PyTorch recommends.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = music_loss(z1, z2, k, backend=backend, return_terms=True, **kwargs)
    # grad_scale != 1: the loss is not the last layer (Liger's "not last layer" test).
    g1, g2 = torch.autograd.grad(terms.loss * grad_scale, (z1, z2))
    return terms, g1, g2


def _float64_truth(z1, z2, k, grad_scale=1.0, **kwargs):
    return _loss_and_grads(z1.double(), z2.double(), k, "reference", grad_scale, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors():
    yield
    WORST.report()


CASES = list(itertools.product(BACKENDS, SHAPES, OPTIONS))


@pytest.mark.parametrize(
    "backend,shape,options", CASES,
    ids=[f"{b}-N{s[0]}xD{s[1]}xK{s[2]}-{o[0]}-eps{o[1]:g}-t{o[2]:g}-w{'/'.join(map(str, o[3]))}"
         for b, s, o in CASES])
def test_float32_matches_float64(backend, shape, options):
    n, d, k = shape
    normalization, eps, temperature, (wd, wo, wi) = options
    kwargs = dict(normalization=normalization, eps=eps, temperature=temperature,
                  diag_weight=wd, off_weight=wo, invariance_weight=wi)
    z1, z2 = _views(n, d)
    want, w1, w2 = _float64_truth(z1, z2, k, grad_scale=0.37, **kwargs)
    got, g1, g2 = _loss_and_grads(z1, z2, k, backend, grad_scale=0.37, **kwargs)
    tol = DTYPE_TOL[torch.float32]
    assert got.loss.dtype == torch.float32
    for name in ("loss", "diag", "off", "invariance"):
        err = relative_error(getattr(got, name), getattr(want, name))
        WORST.record(f"{backend} float32 {name}", err)
        assert err <= tol.loss, (name, err)
    grad_err = max(relative_error(g1, w1), relative_error(g2, w2))
    WORST.record(f"{backend} float32 grad", grad_err)
    assert grad_err <= tol.grad


@pytest.mark.parametrize("chunk_size", [1, 4, 25, 80, 1000])
def test_torch_backend_any_chunk_size(chunk_size):
    # Chunks that cut through segments, single rows, and one chunk for everything.
    z1, z2 = _views(6, 240, torch.float64)
    want, w1, w2 = _float64_truth(z1, z2, 80)
    got, g1, g2 = _loss_and_grads(z1, z2, 80, "torch", chunk_size=chunk_size)
    tol = DTYPE_TOL[torch.float64]
    assert relative_error(got.loss, want.loss) <= tol.loss
    assert max(relative_error(g1, w1), relative_error(g2, w2)) <= tol.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_inputs(backend, dtype):
    z1, z2 = _views(12, 60, dtype)
    # The truth sees the same rounded inputs; the ieee products keep the float32 target.
    want, w1, w2 = _float64_truth(z1, z2, 6)
    got, g1, g2 = _loss_and_grads(z1, z2, 6, backend, precision="ieee")
    tol = DTYPE_TOL[dtype]
    assert got.loss.dtype == torch.float32 and g1.dtype == dtype
    assert relative_error(got.loss, want.loss) <= tol.loss
    assert max(relative_error(g1, w1), relative_error(g2, w2)) <= tol.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast(backend):
    z1, z2 = _views(12, 60)
    want, w1, w2 = _float64_truth(z1, z2, 6)
    got, g1, g2 = _loss_and_grads(z1, z2, 6, backend, autocast=True)
    assert got.loss.dtype == torch.float32
    # The reference never lowers precision; the fast path takes bf16 operands under autocast.
    tol = DTYPE_TOL[torch.float32] if backend == "reference" else PRECISION_TOL["bf16"]
    assert relative_error(got.loss, want.loss) <= tol.loss
    assert max(relative_error(g1, w1), relative_error(g2, w2)) <= tol.grad


def test_torch_backend_bf16_precision_matches_rounded_operands():
    # bf16 mode = operands rounded to bf16, exact products, fp32 accumulation. Rounding the
    # probabilities ourselves and running ieee on them is not the same function (the
    # invariance term uses unrounded p), so compare with the float64 truth by tolerance.
    z1, z2 = _views(16, 240)
    want, w1, w2 = _float64_truth(z1, z2, 80)
    got, g1, g2 = _loss_and_grads(z1, z2, 80, "torch", precision="bf16")
    tol = PRECISION_TOL["bf16"]
    assert relative_error(got.loss, want.loss) <= tol.loss
    assert max(relative_error(g1, w1), relative_error(g2, w2)) <= tol.grad
    ieee, _, _ = _loss_and_grads(z1, z2, 80, "torch", precision="ieee")
    assert float(got.loss.detach()) != float(ieee.loss.detach())  # the mode really changed the products


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base1, base2 = _views(10, 120)
    z1, z2 = base1.t().contiguous().t(), base2[:, :].repeat(1, 2)[:, ::2]
    assert not z1.is_contiguous() and not z2.is_contiguous()
    want, w1, w2 = _float64_truth(z1.contiguous(), z2.contiguous(), 8, grad_scale=1.7)
    a, b = z1.detach().requires_grad_(True), z2.detach().requires_grad_(True)
    got = music_loss(a, b, 8, backend=backend)
    g1, g2 = torch.autograd.grad(got * 1.7, (a, b))
    assert g1.shape == z1.shape and g2.shape == z2.shape
    tol = DTYPE_TOL[torch.float32]
    assert relative_error(got, want.loss) <= tol.loss
    assert max(relative_error(g1, w1), relative_error(g2, w2)) <= tol.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    z1, z2 = _views(4, 12, torch.float64)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    fn = lambda a, b: music_loss(a, b, 3, eps=1e-3, temperature=0.8, backend=backend)
    assert torch.autograd.gradcheck(fn, (z1, z2), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_terms_add_up_and_module_matches_functional(backend):
    z1, z2 = _views(8, 40)
    terms = MUSICLoss(8, backend=backend, normalization="joint")(z1, z2, return_terms=True)
    assert torch.allclose(terms.loss, terms.diag + terms.off + terms.invariance)
    assert torch.equal(terms.loss, music_loss(z1, z2, 8, backend=backend, normalization="joint"))


def test_no_gradient_work_without_grad():
    z1, z2 = _views(16, 240)
    with torch.profiler.profile() as prof, torch.no_grad():
        value = music_loss(z1.requires_grad_(), z2, 80, backend="torch")
    ops = {event.key for event in prof.key_averages()}
    assert "aten::addmm_" not in ops  # the two gradient products never ran
    assert relative_error(value, music_loss(z1.double(), z2.double(), 80)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_view_requires_grad(backend):
    z1, z2 = _views(8, 40, torch.float64)
    z1.requires_grad_(True)
    (g,) = torch.autograd.grad(music_loss(z1, z2, 8, backend=backend), (z1,))
    z1r = z1.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(music_loss(z1r, z2, 8, backend="reference"), (z1r,))
    assert relative_error(g, want) <= DTYPE_TOL[torch.float64].grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_loss_not_a_wrong_number(backend):
    z1, z2 = _views(6, 24)
    z1[2, 5] = float("nan")
    assert torch.isnan(music_loss(z1, z2, 6, backend=backend))
    z1[2, 5] = float("inf")
    assert torch.isnan(music_loss(z1, z2, 6, backend=backend))
