"""music_loss.metrics: each statistic against a plain NumPy count, and on codes whose values
are known by construction (collapsed, flat, optimal, redundant)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from music_loss.metrics import (
    MUSICDiagnostics,
    diagnostics,
    invariance_agreement,
    mean_confidence,
    segment_mutual_information,
    segment_probabilities,
    segment_redundancy,
    usage_entropy,
)


def _optimal_codes(k: int = 5, segments: int = 3) -> torch.Tensor:
    """One-hot codes of N = K^2 samples from the strength-2 orthogonal array (a, b, a+b, ...).

    Every segment uses each bin N/K times and every pair of segments is independent: the
    MUSIC optimum (docs/math.md).
    """
    rows = []
    for a, b in itertools.product(range(k), repeat=2):
        bins = [a, b] + [(a + m * b) % k for m in range(1, segments - 1)]
        rows.append(torch.cat([torch.nn.functional.one_hot(torch.tensor(x), k) for x in bins]))
    return torch.stack(rows).double()


def _numpy_usage(p: np.ndarray) -> np.ndarray:
    n, s, k = p.shape
    out = []
    for seg in range(s):
        hist = np.bincount(p[:, seg].argmax(-1), minlength=k) / n
        nz = hist[hist > 0]
        out.append(-(nz * np.log(nz)).sum() / math.log(k))
    return np.array(out)


def _numpy_mi(p: np.ndarray) -> float:
    n, s, k = p.shape
    values = []
    for a, b in itertools.combinations(range(s), 2):
        joint = p[:, a].T @ p[:, b] / n
        outer = np.outer(joint.sum(1), joint.sum(0))
        values.append((joint * np.log(joint / outer)).sum())
    return float(np.mean(values)) / math.log(k)


def test_matches_numpy_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(200, 35, generator=gen, dtype=torch.float64) * 2
    z2 = z1 + 0.7 * torch.randn(200, 35, generator=gen, dtype=torch.float64)
    k = 7
    p1 = torch.softmax(z1.view(200, 5, k) / 0.5, -1).numpy()
    p2 = torch.softmax(z2.view(200, 5, k) / 0.5, -1).numpy()

    np.testing.assert_allclose(usage_entropy(z1, k, 0.5).numpy(), _numpy_usage(p1), rtol=1e-12)
    assert float(mean_confidence(z1, k, 0.5)) == pytest.approx(p1.max(-1).mean(), rel=1e-12)
    assert float(segment_mutual_information(z1, k, 0.5)) == pytest.approx(_numpy_mi(p1),
                                                                          rel=1e-10)
    agreement = (p1.argmax(-1) == p2.argmax(-1)).mean()
    assert float(invariance_agreement(z1, z2, k, 0.5)) == pytest.approx(agreement, rel=1e-12)
    soft = usage_entropy(z1, k, 0.5, soft=True).numpy()
    mean_p = p1.mean(0)
    np.testing.assert_allclose(soft, -(mean_p * np.log(mean_p)).sum(-1) / math.log(k),
                               rtol=1e-12)


def test_diagnostics_pools_views_and_matches_parts() -> None:
    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(64, 48, generator=gen), torch.randn(64, 48, generator=gen)
    d = diagnostics(z1, z2, segment_dim=8)
    both = torch.cat([z1, z2])
    usage = usage_entropy(both, 8)
    assert isinstance(d, MUSICDiagnostics) and all(isinstance(v, float) for v in d)
    assert d.usage_entropy == pytest.approx(float(usage.mean()), rel=1e-6)
    assert d.min_usage_entropy == pytest.approx(float(usage.min()), rel=1e-6)
    assert d.confidence == pytest.approx(float(mean_confidence(both, 8)), rel=1e-6)
    assert d.segment_mi == pytest.approx(float(segment_mutual_information(both, 8)), rel=1e-6)
    assert d.agreement == pytest.approx(float(invariance_agreement(z1, z2, 8)), rel=1e-6)


def test_optimal_code_is_healthy() -> None:
    p = _optimal_codes(k=5, segments=3)
    d = diagnostics(p, p, segment_dim=5, probabilities=True)
    assert d.usage_entropy == pytest.approx(1.0, abs=1e-12)
    assert d.min_usage_entropy == pytest.approx(1.0, abs=1e-12)
    assert d.confidence == 1.0
    assert d.segment_mi == pytest.approx(0.0, abs=1e-12)
    assert d.agreement == 1.0


def test_collapsed_code_has_zero_usage_but_full_agreement() -> None:
    # Complete collapse: every sample has the same embedding.
    z = torch.randn(1, 64).expand(128, 64).contiguous()
    d = diagnostics(z, z, segment_dim=16)
    assert d.usage_entropy == 0.0 and d.min_usage_entropy == 0.0
    assert d.agreement == 1.0  # agreement alone cannot tell collapse from invariance
    assert d.segment_mi == pytest.approx(0.0, abs=1e-6)


def test_flat_softmax_sits_at_one_over_k() -> None:
    z = torch.zeros(32, 64)
    assert float(mean_confidence(z, 16)) == pytest.approx(1 / 16)
    # The soft marginal of a flat softmax is uniform: soft usage reads "healthy" there,
    # which is why the default usage is argmax-based (and reads 0: every tie goes to bin 0).
    assert float(usage_entropy(z, 16, soft=True).mean()) == pytest.approx(1.0)
    assert float(usage_entropy(z, 16).mean()) == 0.0


def test_redundant_segments_have_full_mutual_information() -> None:
    p = _optimal_codes(k=5, segments=2)
    copies = torch.cat([p[:, :5], p[:, :5], p[:, :5]], dim=1)  # 3 identical segments
    assert float(segment_mutual_information(copies, 5, probabilities=True)) == pytest.approx(1.0)
    # Usage still looks perfect: only the MI exposes the redundancy.
    assert float(usage_entropy(copies, 5, probabilities=True).min()) == pytest.approx(1.0)


def test_random_codes_sit_at_chance() -> None:
    gen = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4096, 64, generator=gen), torch.randn(4096, 64, generator=gen)
    d = diagnostics(z1, z2, segment_dim=16)
    assert d.usage_entropy > 0.99
    assert d.agreement == pytest.approx(1 / 16, abs=0.01)
    assert d.segment_mi < 0.01


def test_pair_sampling_is_a_fixed_subset() -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(100, 20 * 4, generator=gen, dtype=torch.float64)  # S = 20: 190 pairs
    p = torch.softmax(z.view(100, 20, 4), -1).numpy()
    full = segment_mutual_information(z, 4, max_pairs=190)
    assert float(full) == pytest.approx(_numpy_mi(p), rel=1e-10)
    a = segment_mutual_information(z, 4, max_pairs=10, seed=5)
    assert float(a) == float(segment_mutual_information(z, 4, max_pairs=10, seed=5))
    # Each pair's MI lies between the smallest and the largest over all pairs.
    pair_mi = []
    for i, j in itertools.combinations(range(20), 2):
        joint = p[:, i].T @ p[:, j] / 100
        pair_mi.append((joint * np.log(joint / np.outer(joint.sum(1), joint.sum(0)))).sum())
    assert min(pair_mi) / math.log(4) <= float(a) <= max(pair_mi) / math.log(4)


def test_no_gradient_and_dtypes() -> None:
    z = torch.randn(16, 32, requires_grad=True)
    for value in (usage_entropy(z, 8), mean_confidence(z, 8),
                  segment_mutual_information(z, 8), invariance_agreement(z, z, 8)):
        assert not value.requires_grad and value.dtype == torch.float32
    assert segment_probabilities(z.double(), 8).dtype == torch.float64
    assert segment_probabilities(z.to(torch.bfloat16), 8).dtype == torch.float32


def test_single_segment_has_zero_mutual_information() -> None:
    assert float(segment_mutual_information(torch.randn(8, 4), 4)) == 0.0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: usage_entropy(torch.randn(4, 8), 1), ValueError, "segment_dim must be >= 2"),
        (lambda: usage_entropy(torch.randn(4, 9), 4), ValueError, "not a multiple"),
        (lambda: usage_entropy([[1.0]], 2), TypeError, "torch.Tensor"),
        (lambda: usage_entropy(torch.ones(4, 8, dtype=torch.long), 4), TypeError,
         "floating-point"),
        (lambda: mean_confidence(torch.randn(4, 8), 4, 0.0), ValueError, "temperature"),
        (lambda: segment_mutual_information(torch.randn(4, 8), 4, max_pairs=0), ValueError,
         "max_pairs"),
        (lambda: invariance_agreement(torch.randn(4, 8), torch.randn(5, 8), 4), ValueError,
         "same shape"),
        (lambda: diagnostics(torch.randn(4, 8), torch.randn(4, 8), 2.5), TypeError,
         "segment_dim"),
    ],
)
def test_bad_input_names_the_argument(call, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


def _scaled_to_confidence(z: torch.Tensor, k: int, target: float) -> torch.Tensor:
    """``z`` times the scale at which its mean confidence is ``target`` (bisection)."""
    lo, hi = 1e-3, 1e3
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if float(mean_confidence(z * mid, k)) < target else (lo, mid)
    return z * mid


@pytest.mark.parametrize("confidence", [0.25, 0.5, 0.75, 0.95])
def test_redundancy_reads_copies_and_independence_at_every_confidence(confidence) -> None:
    """Exact copies read 1 and independent segments ~0 whatever the confidence (the soft MI
    of exact copies reads ~0.01 at confidence 0.25 and ~0.84 at 0.95)."""
    n, k = 4096, 16
    gen = torch.Generator().manual_seed(1)
    base = _scaled_to_confidence(torch.randn(n, k, generator=gen), k, confidence)
    other = _scaled_to_confidence(torch.randn(n, k, generator=gen), k, confidence)
    copies = torch.cat([base, base, base], dim=1)
    independent = torch.cat([base, other], dim=1)
    assert float(mean_confidence(copies, k)) == pytest.approx(confidence, abs=0.01)
    assert float(segment_redundancy(copies, k)) == pytest.approx(1.0, abs=1e-6)
    # Finite-batch bias of independent segments: about (K-1)^2 / (2 N H) = 0.01 here.
    assert float(segment_redundancy(independent, k)) < 0.02
    # A relabelled copy (bins permuted) is as redundant as an exact one.
    relabelled = torch.cat([base, base[:, torch.randperm(k, generator=gen)]], dim=1)
    assert float(segment_redundancy(relabelled, k)) == pytest.approx(1.0, abs=1e-6)


def test_redundancy_matches_numpy_and_diagnostics() -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(300, 20, generator=gen, dtype=torch.float64)
    z[:, 5:10] += 0.8 * z[:, :5]  # segment 2 partly follows segment 1
    bins = z.view(300, 4, 5).argmax(-1).numpy()
    values = []
    for a, b in itertools.combinations(range(4), 2):
        joint = np.zeros((5, 5))
        np.add.at(joint, (bins[:, a], bins[:, b]), 1 / 300)
        ha, hb = (-(m[m > 0] * np.log(m[m > 0])).sum() for m in (joint.sum(1), joint.sum(0)))
        hab = -(joint[joint > 0] * np.log(joint[joint > 0])).sum()
        values.append((ha + hb - hab) / math.sqrt(ha * hb))
    assert float(segment_redundancy(z, 5)) == pytest.approx(float(np.mean(values)), rel=1e-9)
    d = diagnostics(z, z, 5)
    both = torch.cat([z, z])
    assert d.segment_redundancy == pytest.approx(float(segment_redundancy(both, 5)), rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan_diagnostics(bad) -> None:
    """NaN (or inf) in reads NaN out, never a collapse-looking usage 0 / agreement 1."""
    z = torch.randn(64, 16)
    for corrupt in (torch.full_like(z, bad), z.clone().index_fill_(0, torch.tensor([3]), bad)):
        d = diagnostics(corrupt, corrupt, segment_dim=8)
        assert all(math.isnan(v) for v in d), d
        assert math.isnan(float(usage_entropy(corrupt, 8).max()))


def test_probabilities_true_checks_its_input() -> None:
    logits = torch.randn(10, 8) * 3
    with pytest.raises(ValueError, match="probabilities=True"):
        mean_confidence(logits, 4, probabilities=True)
    with pytest.raises(ValueError, match="probabilities=True"):
        diagnostics(logits, logits, 4, probabilities=True)
    p = segment_probabilities(logits, 4).reshape(10, 8)
    assert float(mean_confidence(p, 4, probabilities=True)) <= 1.0
    assert float(mean_confidence(p.to(torch.bfloat16), 4, probabilities=True)) <= 1.0
