"""Properties of the loss that hold for any input (hypothesis), and the known optimum."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from music_loss import music_loss
from tests.tolerances import DTYPE_TOL, relative_error

TOL64 = DTYPE_TOL[torch.float64]


@st.composite
def problems(draw):
    n = draw(st.integers(2, 9))
    k = draw(st.integers(1, 6))
    s = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, s * k, generator=gen, dtype=torch.float64) * scale
    z2 = torch.randn(n, s * k, generator=gen, dtype=torch.float64) * scale
    kwargs = {
        "normalization": draw(st.sampled_from(["blocks", "joint"])),
        "eps": draw(st.sampled_from([0.0, 1e-8, 1e-3])),
        "temperature": draw(st.sampled_from([0.5, 1.0, 3.0])),
        "invariance_weight": draw(st.sampled_from([0.0, 1.0, 2.5])),
    }
    return z1, z2, k, kwargs, gen


def _close(a, b):
    return abs(float(a) - float(b)) <= TOL64.loss * max(1.0, abs(float(b)))


@given(problems(), st.sampled_from(["reference", "torch"]))
def test_symmetric_in_the_two_views(problem, backend):
    z1, z2, k, kwargs, _ = problem
    assert _close(music_loss(z1, z2, k, backend=backend, **kwargs),
                  music_loss(z2, z1, k, backend=backend, **kwargs))


@given(problems(), st.sampled_from(["reference", "torch"]))
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


@given(problems())
def test_torch_backend_equals_reference_in_float64(problem):
    z1, z2, k, kwargs, gen = problem
    chunk = int(torch.randint(1, z1.shape[1] + 2, (1,), generator=gen))
    z1.requires_grad_(True)
    want = music_loss(z1, z2, k, backend="reference", **kwargs)
    (w1,) = torch.autograd.grad(want, z1)
    got = music_loss(z1, z2, k, backend="torch", chunk_size=chunk, **kwargs)
    (g1,) = torch.autograd.grad(got, z1)
    assert _close(got, want)
    assert relative_error(g1, w1) <= TOL64.grad or (w1 - g1).abs().max() < 1e-12


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
