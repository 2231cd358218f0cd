"""The benchmark peers (Barlow Twins, VICReg) against independent float64 implementations.

The independent forms are written from the papers' definitions with the conventions of the
authors' released code (facebookresearch/barlowtwins ``main.py``: BatchNorm1d without affine,
biased variance, eps 1e-5, ``C / N``; facebookresearch/vicreg ``main_vicreg.py``: MSE before
centring, unbiased variance, std hinge with 1e-4 halved per view, covariance over ``N - 1``,
off-diagonal sums over ``D``), as explicit loops over features in numpy float64: no torch,
no matrix products, so they share no code path with the implementations under test.
Gradients are checked by finite differences (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.baselines import barlow_twins_loss, vicreg_loss


def barlow_twins_loop(z1: np.ndarray, z2: np.ndarray, lambd: float = 0.0051) -> float:
    """``sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2``, ``C_ij = mean_b zn1[b,i] zn2[b,j]``."""
    n, d = z1.shape

    def standardise(z: np.ndarray, j: int) -> list[float]:
        col = [float(z[b, j]) for b in range(n)]
        mean = sum(col) / n
        var = sum((x - mean) ** 2 for x in col) / n  # biased, as BatchNorm1d in training
        return [(x - mean) / math.sqrt(var + 1e-5) for x in col]

    zn1 = [standardise(z1, j) for j in range(d)]
    zn2 = [standardise(z2, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(zn1[i][b] * zn2[j][b] for b in range(n)) / n
            loss += (1.0 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return loss


def vicreg_loop(z1: np.ndarray, z2: np.ndarray, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0) -> float:
    """``sim * s(Z, Z') + std * (v(Z) + v(Z')) / 2 + cov * (c(Z) + c(Z'))``."""
    n, d = z1.shape
    invariance = sum((float(z1[b, j]) - float(z2[b, j])) ** 2
                     for b in range(n) for j in range(d)) / (n * d)

    def variance_and_covariance(z: np.ndarray) -> tuple[float, float]:
        cols = [[float(z[b, j]) for b in range(n)] for j in range(d)]
        centred = [[x - sum(col) / n for x in col] for col in cols]
        cov = [[sum(centred[i][b] * centred[j][b] for b in range(n)) / (n - 1)
                for j in range(d)] for i in range(d)]
        hinge = sum(max(0.0, 1.0 - math.sqrt(cov[j][j] + 1e-4)) for j in range(d)) / d
        off = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return hinge, off

    v1, c1 = variance_and_covariance(z1)
    v2, c2 = variance_and_covariance(z2)
    return sim_coeff * invariance + std_coeff * (v1 + v2) / 2 + cov_coeff * (c1 + c2)


def _views(n: int, d: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z1 = scale * (shared + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64))
    z2 = scale * (shared + 0.3 * torch.randn(n, d, generator=gen, dtype=torch.float64))
    return z1, z2


@given(n=st.integers(3, 12), d=st.integers(2, 9), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.05, 1.0, 7.0]))
def test_barlow_twins_matches_independent_loop(n: int, d: int, seed: int, scale: float) -> None:
    z1, z2 = _views(n, d, seed, scale)
    got = float(barlow_twins_loss(z1, z2))
    want = barlow_twins_loop(z1.numpy(), z2.numpy())
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


@given(n=st.integers(3, 12), d=st.integers(2, 9), seed=st.integers(0, 2**16),
       scale=st.sampled_from([0.05, 1.0, 7.0]))
def test_vicreg_matches_independent_loop(n: int, d: int, seed: int, scale: float) -> None:
    # scale 0.05 puts the std hinge in play, 7.0 switches it off: both branches of the relu.
    z1, z2 = _views(n, d, seed, scale)
    got = float(vicreg_loss(z1, z2))
    want = vicreg_loop(z1.numpy(), z2.numpy())
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_non_default_coefficients_reach_the_formula() -> None:
    z1, z2 = _views(7, 5, seed=3, scale=0.2)
    assert float(barlow_twins_loss(z1, z2, lambd=0.3)) == pytest.approx(
        barlow_twins_loop(z1.numpy(), z2.numpy(), lambd=0.3), rel=1e-10)
    assert float(vicreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=5.0)) == \
        pytest.approx(vicreg_loop(z1.numpy(), z2.numpy(), 2.0, 3.0, 5.0), rel=1e-10)


def test_known_optimum_of_whitened_identical_views() -> None:
    # Orthogonal +-1 columns (Hadamard): mean 0, biased variance 1, zero cross-correlation.
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]],
                     dtype=torch.float64)
    z = h[:, 1:]  # 4 samples, 3 features
    # Barlow Twins: C = I / (1 + 1e-5) (BatchNorm's eps), so only the diagonal deficit remains.
    expected_bt = 3 * (1 - 1 / (1 + 1e-5)) ** 2
    assert float(barlow_twins_loss(z, z.clone())) == pytest.approx(expected_bt, rel=1e-9)
    # VICReg: same views, std sqrt(4/3 + 1e-4) > 1, no covariance: exactly zero.
    assert float(vicreg_loss(z, z.clone())) == pytest.approx(0.0, abs=1e-15)


def test_gradients_match_finite_differences() -> None:
    z1, z2 = _views(6, 4, seed=11, scale=0.3)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins_loss(a, b), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b), (z1, z2))


@pytest.mark.parametrize("loss_fn", [barlow_twins_loss, vicreg_loss])
def test_float32_close_to_float64(loss_fn) -> None:  # type: ignore[no-untyped-def]
    z1, z2 = _views(128, 96, seed=5)
    x1, x2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    y1, y2 = z1.float().requires_grad_(True), z2.float().requires_grad_(True)
    want, got = loss_fn(x1, x2), loss_fn(y1, y2)
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) / abs(want.item()) < 1e-5
    for g, w in ((y1.grad, x1.grad), (y2.grad, x2.grad)):
        assert g is not None and w is not None
        rel = float(torch.linalg.vector_norm(g.double() - w) / torch.linalg.vector_norm(w))
        assert rel < 1e-4
