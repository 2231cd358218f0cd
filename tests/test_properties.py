"""Properties of the loss that hold for any input (hypothesis), and the known optimum."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from music_loss import music_loss
from tests.tolerances import DTYPE_TOL, FLOAT32_NO_CLAMP_TOL, loss_error


@st.composite
def problems(draw, dtypes=(torch.float64, torch.float32)):
    """Any shape up to N=64, D=512, any option, float32 or float64, logits up to scale 50."""
    n = draw(st.integers(2, 64))
    k = draw(st.integers(1, 80))
    s = draw(st.integers(1, max(1, min(16, 512 // k))))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 50.0]))
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, s * k, generator=gen, dtype=torch.float64) * scale
    z2 = (z1 * draw(st.sampled_from([0.0, 0.5, 1.0]))
          + torch.randn(n, s * k, generator=gen, dtype=torch.float64) * scale)
    kwargs = {
        "normalization": draw(st.sampled_from(["blocks", "joint"])),
        "eps": draw(st.sampled_from([0.0, 1e-8, 1e-3])),
        "temperature": draw(st.sampled_from([0.05, 0.5, 1.0, 3.0])),
        "diag_weight": draw(st.sampled_from([0.0, 1.0, 0.3])),
        "off_weight": draw(st.sampled_from([0.0, 1.0, 2.0])),
        "invariance_weight": draw(st.sampled_from([0.0, 1.0, 2.5])),
    }
    return z1.to(dtype), z2.to(dtype), k, kwargs, gen


def _close(a, b, dtype=torch.float64):
    return abs(float(a) - float(b)) <= DTYPE_TOL[dtype].loss * max(1.0, abs(float(b)))


@given(problems(dtypes=(torch.float64,)), st.sampled_from(["reference", "torch"]))
def test_symmetric_in_the_two_views(problem, backend):
    z1, z2, k, kwargs, _ = problem
    assert _close(music_loss(z1, z2, k, backend=backend, **kwargs),
                  music_loss(z2, z1, k, backend=backend, **kwargs))


@given(problems(dtypes=(torch.float64,)), st.sampled_from(["reference", "torch"]))
def test_invariant_to_permuting_rows_segments_and_bins(problem, backend):
    z1, z2, k, kwargs, gen = problem
    n, d = z1.shape
    s = d // k
    rows = torch.randperm(n, generator=gen)
    segments = torch.randperm(s, generator=gen)
    bins = torch.randperm(k, generator=gen)  # the same bin permutation in every segment
    cols = (segments[:, None] * k + bins[None, :]).reshape(-1)
    want = music_loss(z1, z2, k, backend=backend, **kwargs)
    got = music_loss(z1[rows][:, cols], z2[rows][:, cols], k, backend=backend, **kwargs)
    assert _close(got, want)


@given(problems(), st.sampled_from(["reference", "torch"]), st.data())
def test_every_backend_matches_float64_on_any_problem(problem, backend, data):
    """float32 or float64 inputs against the float64 reference, loss and both gradients."""
    z1, z2, k, kwargs, gen = problem
    chunk = data.draw(st.one_of(st.none(), st.integers(1, z1.shape[1] + 2)))
    options = {"chunk_size": chunk} if backend == "torch" else {}
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    got = music_loss(a, b, k, backend=backend, return_terms=True, **options, **kwargs)
    g1, g2 = torch.autograd.grad(got.loss, (a, b))
    a64, b64 = z1.double().requires_grad_(True), z2.double().requires_grad_(True)
    want = music_loss(a64, b64, k, backend="reference", return_terms=True, **kwargs)
    w1, w2 = torch.autograd.grad(want.loss, (a64, b64))
    tol = DTYPE_TOL[z1.dtype]
    if z1.dtype == torch.float32 and kwargs["eps"] == 0.0:
        # No clamp: probabilities down to exp(-|z|/t) ~ 1e-16 enter the gradient, each with the
        # float32 rounding of its exponent (6e-8 |z| / t), amplified by |lg P|: a float32
        # limit, not a defect (measured up to ~3e-5 at N=2, t=0.05). With eps > 0 (the
        # default) the documented target holds.
        tol = FLOAT32_NO_CLAMP_TOL
    weights = sum(abs(kwargs[w]) for w in ("diag_weight", "off_weight", "invariance_weight"))
    assert loss_error(got.loss, want, floor=weights) <= tol.loss
    conditioning = _pre_cancellation_scale(z1, z2, k, kwargs)
    for g, w, pre in zip((g1, g2), (w1, w2), conditioning):
        # Frobenius-relative, with a floor at 0.1 x the tolerance of the softmax backward's
        # input size ||q * dL/dp|| / t: the backward subtracts the segment mean of dL/dp, so
        # where that is nearly constant (near-uniform softmax, a saturated one) the result is
        # a cancellation whose float32 error is ~eps of the input, not of the output. The
        # floor is 1e-6 of that input in float32 (8 eps).
        err = float((g.double() - w).norm())
        assert err <= tol.grad * max(float(w.norm()), 0.1 * pre), (err, float(w.norm()), pre)


def _pre_cancellation_scale(z1, z2, k, kwargs):
    """``||q * dL/dp|| / t`` per view in float64: the size of the softmax backward's input."""
    from music_loss._config import LossConfig
    from music_loss.reference import (
        invariance_term_reference,
        joint_entropy_terms_reference,
        segment_softmax_reference,
    )

    config = LossConfig(segment_dim=k, **kwargs)
    t = config.temperature
    q1 = segment_softmax_reference(z1.double(), k, t, 0.0)
    q2 = segment_softmax_reference(z2.double(), k, t, 0.0)
    p1 = q1.clamp_min(config.eps).requires_grad_(True)
    p2 = q2.clamp_min(config.eps).requires_grad_(True)
    h_diag, h_off = joint_entropy_terms_reference(p1, p2, k)
    c_diag, c_off = config.coefficients(z1.shape[1])
    loss = c_diag * h_diag + c_off * h_off + config.invariance_weight * (
        invariance_term_reference(p1, p2, k))
    d1, d2 = torch.autograd.grad(loss, (p1, p2))
    return float((q1 * d1).norm()) / t, float((q2 * d2).norm()) / t


def orthogonal_array_codes(k: int, s: int) -> torch.Tensor:
    """``(K^2, S)`` bin indices, pairwise independent across segments (K prime, S <= K + 1).

    Sample ``(x, y)`` takes bin ``(x + j y) mod K`` in segment ``j < K`` and ``y`` in segment
    ``K``: every pair of segments sees every pair of bins exactly once.
    """
    x, y = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    columns = [(x + j * y) % k for j in range(min(s, k))] + ([y] if s == k + 1 else [])
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("k,s", [(3, 4), (5, 3), (7, 2), (2, 3)])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_known_optimum(k, s, backend):
    codes = orthogonal_array_codes(k, s)
    one_hot = torch.nn.functional.one_hot(codes, k).reshape(k * k, s * k).double()
    z = 60.0 * one_hot  # saturated softmax: the other bins fall below eps and are clamped
    terms = music_loss(z, z.clone(), k, backend=backend, return_terms=True)
    log_k = math.log(k)
    assert terms.diag.item() == pytest.approx(-log_k, abs=1e-6)
    assert terms.off.item() == pytest.approx(-2 * log_k, abs=1e-6)
    assert terms.invariance.item() == pytest.approx(0.0, abs=1e-6)
    assert terms.loss.item() == pytest.approx(-3 * log_k, abs=1e-6)
    joint = music_loss(z, z.clone(), k, backend=backend, normalization="joint")
    assert joint.item() == pytest.approx(-(2 * s - 1) * log_k / s, abs=1e-6)
    # Any other batch scores higher (a sanity bound, not a proof of optimality).
    gen = torch.Generator().manual_seed(k * 10 + s)
    noisy = z / 20 + torch.randn(z.shape, generator=gen, dtype=torch.float64)
    assert music_loss(noisy, noisy + torch.randn(z.shape, generator=gen, dtype=torch.float64),
                      k, backend=backend) > terms.loss
