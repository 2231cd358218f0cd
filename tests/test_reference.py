"""The reference against an independent float64 NumPy transcription of the definition (docs/math.md), with loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from music_loss import music_loss
from tests.tolerances import DTYPE_TOL

TINY = float(np.finfo(np.float32).tiny)


def numpy_music(z1, z2, k, t=1.0, eps=1e-8, wd=1.0, wo=1.0, wi=1.0, norm="blocks"):
    """The definition written out entry by entry, nothing shared with the package."""
    n, d = z1.shape
    s = d // k

    def probs(z):
        p = np.empty_like(z)
        for i in range(n):
            for seg in range(s):
                x = z[i, seg * k:(seg + 1) * k] / t
                e = np.exp(x - x.max())
                p[i, seg * k:(seg + 1) * k] = np.maximum(e / e.sum(), eps) if eps > 0 else e / e.sum()
        return p

    p1, p2 = probs(z1), probs(z2)
    h_diag = h_off = 0.0
    for a in range(d):
        for b in range(d):
            pab = sum(p1[i, a] * p2[i, b] for i in range(n)) / n
            term = pab * math.log(max(pab, TINY))
            if a == b:
                h_diag += term
            elif a // k != b // k:
                h_off += term
    l_inv = 0.0
    for i in range(n):
        for seg in range(s):
            dot = sum(p1[i, seg * k + j] * p2[i, seg * k + j] for j in range(k))
            l_inv -= math.log(max(dot, TINY))
    l_inv /= n * s
    if norm == "blocks":
        ent = wd * h_diag / s + (wo * h_off / (s * (s - 1)) if s > 1 else 0.0)
    else:
        ent = (wd * h_diag + wo * h_off) / s**2
    return ent + wi * l_inv


CASES = [
    # n, d, k, kwargs
    (2, 6, 3, {}),
    (5, 12, 4, {"normalization": "joint"}),
    (4, 10, 5, {"eps": 0.0, "temperature": 0.5}),
    (3, 9, 9, {}),  # S = 1: no off-diagonal blocks
    (6, 8, 1, {}),  # K = 1: every probability is 1
    (5, 12, 3, {"diag_weight": 0.7, "off_weight": 1.9, "invariance_weight": 0.3, "eps": 1e-3}),
]


@pytest.mark.parametrize("n,d,k,kwargs", CASES, ids=[f"N{c[0]}-D{c[1]}-K{c[2]}-{c[3]}" for c in CASES])
def test_reference_matches_independent_numpy(n, d, k, kwargs):
    rng = np.random.default_rng(n * 100 + d)
    z1, z2 = rng.normal(size=(n, d)) * 2, rng.normal(size=(n, d)) * 2
    args = {"t": kwargs.get("temperature", 1.0), "eps": kwargs.get("eps", 1e-8),
            "wd": kwargs.get("diag_weight", 1.0), "wo": kwargs.get("off_weight", 1.0),
            "wi": kwargs.get("invariance_weight", 1.0), "norm": kwargs.get("normalization", "blocks")}
    want = numpy_music(z1, z2, k, **args)
    got = music_loss(torch.from_numpy(z1), torch.from_numpy(z2), k, backend="reference", **kwargs)
    assert got.dtype == torch.float64
    assert abs(float(got) - want) <= DTYPE_TOL[torch.float64].loss * max(1.0, abs(want))


def test_saturated_softmax_with_eps_zero_stays_finite():
    # One-hot logits of 1e4: probabilities underflow to exactly 0, P has exact zeros.
    z = torch.zeros(4, 6, dtype=torch.float64)
    z[:, 0] = 1e4
    z[:, 3] = 1e4
    z.requires_grad_(True)
    for backend in ("reference", "torch"):
        loss = music_loss(z, z.detach() * 1.0, 3, eps=0.0, backend=backend)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), backend
