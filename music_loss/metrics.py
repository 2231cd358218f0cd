r"""Training diagnostics for MUSIC: is the code healthy, or collapsing?

Five cheap statistics of a batch of projector outputs, each computed from the per-segment
softmax ``p = softmax(z.view(N, S, K) / t)`` in ``O(N D)`` (the mutual information in
``O(N K^2)`` per sampled segment pair); none builds the ``D x D`` joint matrix, and none
carries gradient. Log them every few hundred steps next to the loss.

=======================  =========================================  ========================
statistic                what it measures                           range
=======================  =========================================  ========================
``usage_entropy``        how evenly the batch's samples spread over  0 (all samples in one
                         the ``K`` bins of a segment (entropy of the  bin) .. 1 (uniform)
                         argmax histogram, as a fraction of
                         ``log K``); mean over segments
``confidence``           mean over samples and segments of           ``1/K`` (uniform
                         ``max_k p[i, s, k]``                        softmax) .. 1 (one-hot)
``segment_mi``           mean mutual information between pairs of    0 (independent
                         segments (soft joint over the batch), as a  segments) .. 1 (one
                         fraction of ``log K``; grows with           segment copies another,
                         confidence as well as redundancy            one-hot)
``segment_redundancy``   mean normalised mutual information of the   0 (independent) .. 1
                         segments' argmax assignments, over pairs    (a copy, at any
                                                                     confidence)
``agreement``            fraction of (sample, segment) pairs whose   ``~1/K`` (chance) .. 1
                         argmax bin is the same in both views
=======================  =========================================  ========================

What healthy and collapsed look like -- measured, not guessed. The digits study
(``python -m benchmarks.quality.digits``; ``benchmarks/results/quality-digits.md`` and
``quality-digits-curves.png``; ``D = 512``, ``K = 16``, 60 epochs, two augmented views of
held-out images, mean of 3 seeds) and ``tests/test_metrics.py`` give:

==============================  =======  ==========  ======  =========  ===========
code                            usage    confidence  MI      agreement  k-NN acc.
==============================  =======  ==========  ======  =========  ===========
MUSIC "blocks", trained         0.98     0.79        0.45    0.84       98.5 %
MUSIC "joint", trained          0.94     0.61        0.19    0.85       98.0 %
invariance only (collapsing)    0.16     0.99        0.06    0.98       91.5 %
untrained network               0.02     0.065       0.00    0.95       --
constant features (test)        0        any         0       1          --
optimal code (test)             1        1           0       1          --
random logits (test)            > 0.99   ~0.25       < 0.01  1/K        --
==============================  =======  ==========  ======  =========  ===========

How to read them:

* **Healthy**: usage entropy high (above ~0.9) and stable, confidence climbing well above
  ``1/K``, agreement climbing. During warm-up usage may dip (to 0.3 at epoch 3 in the
  study's "blocks" run) and recover; a dip that does not recover is collapse.
* **Collapse** (all samples into a few bins): usage entropy falls towards 0 while
  confidence and agreement go to 1 -- the views "agree" because nothing varies. Agreement
  alone is therefore not a health signal; always read it with usage.
* **Flat softmax** (an untrained network, or too small a logit scale): confidence
  ``~ 1/K`` (1/16 = 0.0625); the argmax statistics then follow ties and biases, not the
  data (usage 0.02 and agreement 0.95 above), and mean nothing until confidence rises.
* **Redundant segments**: usage and confidence look healthy, but segment redundancy rises
  towards 1 (every segment a relabelled copy of another); the MUSIC optimum reads 0. The
  soft segment MI of the table grows with confidence too (exact copies read 0.01 at
  confidence 0.25 and 0.84 at 0.95), so read redundancy for this.
* **Non-finite inputs** read NaN in every statistic.

Example:
    >>> import torch
    >>> from music_loss.metrics import diagnostics
    >>> z1, z2 = torch.randn(256, 64), torch.randn(256, 64)
    >>> d = diagnostics(z1, z2, segment_dim=16)
    >>> 0.9 < d.usage_entropy <= 1.0           # random codes spread over all bins
    True
    >>> collapsed = torch.zeros(256, 64)
    >>> diagnostics(collapsed, collapsed, segment_dim=16).usage_entropy
    0.0
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from music_loss._config import TINY, compute_dtype
from music_loss._validate import check_pair as _check_pair
from music_loss._validate import check_real as _check_real
from music_loss._validate import check_segment_dim as _check_segment_dim
from music_loss._validate import check_view as _check_view

__all__ = [
    "MUSICDiagnostics",
    "diagnostics",
    "invariance_agreement",
    "mean_confidence",
    "segment_mutual_information",
    "segment_probabilities",
    "segment_redundancy",
    "usage_entropy",
]


class MUSICDiagnostics(NamedTuple):
    """The four statistics of :func:`diagnostics`, as Python floats (ready to log).

    Attributes:
        usage_entropy: Mean over segments of the argmax-histogram entropy / ``log K``.
        min_usage_entropy: The least used segment's usage entropy / ``log K``.
        confidence: Mean ``max_k p[i, s, k]``.
        segment_mi: Mean soft mutual information between segment pairs / ``log K``
            (grows with confidence as well as with redundancy).
        agreement: Fraction of (sample, segment) pairs with the same argmax in both views.
        segment_redundancy: Mean normalised mutual information of the segments' argmax
            assignments (:func:`segment_redundancy`): the redundancy reading, independent of
            confidence.
    """

    usage_entropy: float
    min_usage_entropy: float
    confidence: float
    segment_mi: float
    agreement: float
    segment_redundancy: float


def _check_metric_segment_dim(segment_dim: int) -> int:
    segment_dim = _check_segment_dim(segment_dim)
    if segment_dim < 2:
        raise ValueError("segment_dim must be >= 2 for the diagnostics (they are fractions of "
                         f"log K, and log 1 = 0), got {segment_dim}")
    return segment_dim


@torch.no_grad()
def segment_probabilities(
    z: Tensor, segment_dim: int, temperature: float = 1.0, *, probabilities: bool = False
) -> Tensor:
    """Per-segment softmax as an ``(N, S, K)`` tensor, without gradient.

    Args:
        z: ``(N, D)`` projector outputs (logits), ``D`` a multiple of ``segment_dim``.
        segment_dim: Bins per segment ``K``.
        temperature: Softmax temperature ``t > 0`` (use the loss's).
        probabilities: ``z`` already holds per-segment probabilities (e.g. the output of
            :class:`music_loss.SegmentSoftmax`): skip the softmax.

    Returns:
        ``(N, S, K)`` probabilities in float32 (float64 for float64 inputs).

    Example:
        >>> import torch
        >>> segment_probabilities(torch.zeros(2, 8), segment_dim=4)[0, 0]
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    segment_dim = _check_metric_segment_dim(segment_dim)
    _check_view("z", z, segment_dim)
    temperature = _check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use the loss's (1.0)")
    n, d = z.shape
    zc = z.detach().to(compute_dtype(z.dtype)).view(n, d // segment_dim, segment_dim)
    if probabilities:
        _check_probabilities(zc, z.dtype)
        return zc
    return torch.softmax(zc / temperature, dim=-1)


def _check_probabilities(p: Tensor, dtype: torch.dtype) -> None:
    """``probabilities=True``: every finite segment must be a distribution (one host sync).

    Non-finite rows pass (they make the statistics NaN); the sum tolerance covers 16-bit
    inputs and the loss's clamp at ``eps``.
    """
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3
    finite = torch.isfinite(p).all(dim=-1)
    bad_value = ((p < 0) | (p > 1 + tol)).any(dim=-1) & finite
    bad_sum = ((p.sum(-1) - 1).abs() > tol) & finite
    if bool((bad_value | bad_sum).any()):
        raise ValueError("probabilities=True, but z is not a per-segment probability (values "
                         "outside [0, 1], or segments of segment_dim values that do not sum "
                         "to 1); pass the projector's logits with probabilities=False, or "
                         "the output of segment_softmax / SegmentSoftmax")


def _nan_unless_finite(value: Tensor, p: Tensor) -> Tensor:
    """``value``, or NaN where the inputs held NaN or inf (argmax would hide them)."""
    return torch.where(torch.isfinite(p).all(), value, torch.full_like(value, math.nan))


def _entropy(dist: Tensor, dim: int = -1) -> Tensor:
    # "+ 0.0" turns the -0.0 of a one-hot histogram into 0.0.
    return (-(dist * torch.log(torch.clamp_min(dist, TINY))).sum(dim)).clamp_min(0.0) + 0.0


@torch.no_grad()
def usage_entropy(
    z: Tensor,
    segment_dim: int,
    temperature: float = 1.0,
    *,
    probabilities: bool = False,
    soft: bool = False,
) -> Tensor:
    """Per-segment usage entropy of the batch, as a fraction of ``log K``.

    For segment ``s``, the histogram ``u[s, k]`` = fraction of samples whose argmax bin is
    ``k``; the result is ``H(u[s]) / log K``: 1 when the batch spreads evenly over the bins,
    0 when every sample lands in the same bin (collapse). With ``soft=True`` the histogram is
    the mean probability ``mean_i p[i, s, :]`` instead (which a flat softmax also makes
    uniform: read it together with :func:`mean_confidence`). A batch of ``N < K`` samples
    cannot reach 1 (the most it can reach is ``log N / log K``).

    Args:
        z: ``(N, D)`` projector outputs (logits).
        segment_dim: Bins per segment ``K >= 2``.
        temperature: Softmax temperature (only matters with ``soft=True``).
        probabilities: ``z`` already holds per-segment probabilities.
        soft: Use mean probabilities instead of argmax counts.

    Returns:
        ``(S,)`` tensor of values in ``[0, 1]``.

    Example:
        >>> import torch
        >>> z = torch.eye(4).repeat(1, 2)          # 4 samples, each in its own bin
        >>> usage_entropy(z, segment_dim=4)
        tensor([1., 1.])
    """
    p = segment_probabilities(z, segment_dim, temperature, probabilities=probabilities)
    n, s, k = p.shape
    if soft:
        hist = p.mean(dim=0)
    else:
        bins = p.argmax(dim=-1) + torch.arange(s, device=p.device) * k  # (N, S) global bin ids
        hist = torch.bincount(bins.reshape(-1), minlength=s * k).view(s, k).to(p.dtype) / n
    return _nan_unless_finite(_entropy(hist) / math.log(k), p)


@torch.no_grad()
def mean_confidence(
    z: Tensor, segment_dim: int, temperature: float = 1.0, *, probabilities: bool = False
) -> Tensor:
    """Mean over samples and segments of the largest bin probability ``max_k p[i, s, k]``.

    ``1/K`` for a flat softmax (no decision), 1 for one-hot codes (the MUSIC optimum).

    Args:
        z: ``(N, D)`` projector outputs (logits).
        segment_dim: Bins per segment ``K >= 2``.
        temperature: Softmax temperature ``t > 0`` (use the loss's).
        probabilities: ``z`` already holds per-segment probabilities.

    Returns:
        A scalar tensor in ``[1/K, 1]``.

    Example:
        >>> import torch
        >>> float(mean_confidence(torch.zeros(3, 8), segment_dim=4))
        0.25
    """
    p = segment_probabilities(z, segment_dim, temperature, probabilities=probabilities)
    return _nan_unless_finite(p.amax(dim=-1).mean(), p)


def _segment_pairs(num_segments: int, max_pairs: int, seed: int, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    first, second = torch.triu_indices(num_segments, num_segments, offset=1)
    if first.numel() > max_pairs:
        # A fixed seed picks the same pairs at every call, so a logged curve is comparable.
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(first.numel(), generator=generator)[:max_pairs]
        first, second = first[keep], second[keep]
    return first.to(device), second.to(device)


@torch.no_grad()
def segment_mutual_information(
    z: Tensor,
    segment_dim: int,
    temperature: float = 1.0,
    *,
    probabilities: bool = False,
    max_pairs: int = 64,
    seed: int = 0,
) -> Tensor:
    """Mean mutual information between pairs of segments, as a fraction of ``log K``.

    For segments ``s != r`` the soft joint over the batch is ``J = p[:, s]^T p[:, r] / N``
    (``K x K``; the same quantity the loss's off-diagonal blocks use, within one view), and
    ``I(s; r) = sum J log(J / (J 1  1^T J))``. Low values mean the segments partition the
    samples in different ways (what the off-block entropy term rewards). The soft joint
    grows with the softmax's confidence as much as with redundancy (exact copies of a
    segment read 0.01 at confidence 0.25, 0.84 at 0.95): for redundancy read
    :func:`segment_redundancy`, which does not depend on confidence. When
    ``S (S-1) / 2 > max_pairs`` a fixed random subset of ``max_pairs`` pairs is used
    (``seed`` picks it), so the cost stays ``O(max_pairs N K^2)``. Finite-batch estimates
    are biased upwards by roughly ``(K-1)^2 / (2 N log K)`` for confident codes.

    Args:
        z: ``(N, D)`` projector outputs (logits).
        segment_dim: Bins per segment ``K >= 2``.
        temperature: Softmax temperature ``t > 0`` (use the loss's).
        probabilities: ``z`` already holds per-segment probabilities.
        max_pairs: Most segment pairs to evaluate (>= 1).
        seed: Seed of the pair subset.

    Returns:
        A scalar tensor in ``[0, 1]`` (0 when there is a single segment).

    Example:
        >>> import torch
        >>> z = torch.randn(512, 8)
        >>> copies = torch.cat([z, z], dim=1)       # segment 2 copies segment 1
        >>> float(segment_mutual_information(copies, 8, temperature=0.01)) > 0.9
        True
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive int, got {max_pairs!r}")
    p = segment_probabilities(z, segment_dim, temperature, probabilities=probabilities)
    n, s, k = p.shape
    if s < 2:
        return torch.zeros((), dtype=p.dtype, device=p.device)
    first, second = _segment_pairs(s, max_pairs, seed, p.device)
    joint = torch.einsum("npk,npl->pkl", p[:, first], p[:, second]) / n  # (pairs, K, K)
    outer = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)
    log_ratio = torch.log(torch.clamp_min(joint, TINY)) - torch.log(torch.clamp_min(outer, TINY))
    mi = (joint * log_ratio).sum(dim=(1, 2))
    return _nan_unless_finite(mi.mean().clamp_min(0) / math.log(k), p)


@torch.no_grad()
def segment_redundancy(
    z: Tensor,
    segment_dim: int,
    temperature: float = 1.0,
    *,
    probabilities: bool = False,
    max_pairs: int = 64,
    seed: int = 0,
) -> Tensor:
    r"""Mean normalised mutual information of the segments' hard assignments, over pairs.

    Each sample's bin in segment ``s`` is ``a_s = argmax_k p[i, s, k]``. For segments
    ``s != r``, ``NMI(s, r) = I(a_s; a_r) / sqrt(H(a_s) H(a_r))`` from the ``K x K`` histogram
    of ``(a_s, a_r)`` over the batch (pairs in which a segment uses a single bin count 0:
    they share nothing, and :func:`usage_entropy` flags them). 1 when one segment's bins are
    a relabelling of another's (a copy: redundant), 0 when the segments' assignments are
    independent.

    Why hard assignments: the soft mutual information (:func:`segment_mutual_information`)
    of two exact copies is bounded by the entropy of the softmax's own noise: at confidence
    0.25 it reads ~0.01, at 0.95 ~0.8, so it measures confidence as much as redundancy. The
    argmax does not depend on the temperature or the logit scale, and dividing by the
    entropies removes the dependence on how evenly the bins are used, so this reads the
    same for the same partitions at any confidence. It reads what the code's decisions
    share, which is what the off-block entropy term of the loss drives apart. Finite batches
    bias it upwards by about ``(K-1)^2 / (2 N H)`` (``H`` in nats) for independent segments:
    use ``N >> K^2``. When ``S (S-1) / 2 > max_pairs`` a fixed random subset of ``max_pairs``
    pairs is used (``seed`` picks it): ``O(max_pairs (N + K^2))``.

    Args:
        z: ``(N, D)`` projector outputs (logits).
        segment_dim: Bins per segment ``K >= 2``.
        temperature: Softmax temperature (no effect on the argmax; kept for symmetry).
        probabilities: ``z`` already holds per-segment probabilities (checked).
        max_pairs: Most segment pairs to evaluate (>= 1).
        seed: Seed of the pair subset.

    Returns:
        A scalar tensor in ``[0, 1]`` (0 with a single segment; NaN if ``z`` holds NaN or
        inf).

    Example:
        >>> import torch
        >>> z = torch.randn(4096, 8)
        >>> copies = torch.cat([z, 0.01 * z], dim=1)   # a low-confidence copy of segment 1
        >>> round(float(segment_redundancy(copies, 8)), 3)
        1.0
        >>> independent = torch.randn(4096, 16)
        >>> float(segment_redundancy(independent, 8)) < 0.02
        True
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive int, got {max_pairs!r}")
    p = segment_probabilities(z, segment_dim, temperature, probabilities=probabilities)
    n, s, k = p.shape
    if s < 2:
        return _nan_unless_finite(torch.zeros((), dtype=p.dtype, device=p.device), p)
    first, second = _segment_pairs(s, max_pairs, seed, p.device)
    bins = p.argmax(dim=-1)  # (N, S)
    pairs = first.numel()
    cell = (torch.arange(pairs, device=p.device) * k * k
            + bins[:, first] * k + bins[:, second])  # (N, pairs) joint cell ids
    joint = torch.bincount(cell.reshape(-1), minlength=pairs * k * k)
    joint = joint.view(pairs, k, k).to(p.dtype) / n
    h_first, h_second = _entropy(joint.sum(2)), _entropy(joint.sum(1))
    mutual = (h_first + h_second - _entropy(joint.flatten(1))).clamp_min(0)
    scale = torch.sqrt(h_first * h_second)
    nmi = torch.where(scale > 0, mutual / scale.clamp_min(TINY), torch.zeros_like(scale))
    return _nan_unless_finite(nmi.clamp(0, 1).mean(), p)


@torch.no_grad()
def invariance_agreement(
    z1: Tensor,
    z2: Tensor,
    segment_dim: int,
    temperature: float = 1.0,
    *,
    probabilities: bool = False,
) -> Tensor:
    """Fraction of (sample, segment) pairs whose argmax bin is the same in both views.

    1 for perfectly invariant codes -- and also for a collapsed code (every sample in one
    bin), so read it with :func:`usage_entropy`. Chance level for independent, evenly used
    codes is ``1/K``.

    Args:
        z1: ``(N, D)`` projector outputs of the first view.
        z2: ``(N, D)`` projector outputs of the second view.
        segment_dim: Bins per segment ``K >= 2``.
        temperature: Softmax temperature (no effect on the argmax; kept for symmetry).
        probabilities: The inputs already hold per-segment probabilities.

    Returns:
        A scalar tensor in ``[0, 1]``.

    Example:
        >>> import torch
        >>> z = torch.randn(10, 8)
        >>> float(invariance_agreement(z, z, segment_dim=4))
        1.0
    """
    segment_dim = _check_metric_segment_dim(segment_dim)
    _check_pair(z1, z2, segment_dim, min_rows=1)
    p1 = segment_probabilities(z1, segment_dim, temperature, probabilities=probabilities)
    p2 = segment_probabilities(z2, segment_dim, temperature, probabilities=probabilities)
    agreement = (p1.argmax(-1) == p2.argmax(-1)).to(p1.dtype).mean()
    return _nan_unless_finite(_nan_unless_finite(agreement, p1), p2)


@torch.no_grad()
def diagnostics(
    z1: Tensor,
    z2: Tensor,
    segment_dim: int,
    temperature: float = 1.0,
    *,
    probabilities: bool = False,
    max_pairs: int = 64,
    seed: int = 0,
) -> MUSICDiagnostics:
    """All the statistics of two views of a batch, as floats (one host sync).

    Usage entropy, confidence, segment MI and redundancy are computed on both views pooled
    (``2N`` samples); agreement compares the views. See the module docstring for what
    healthy and collapsed runs show.

    Args:
        z1: ``(N, D)`` projector outputs of the first view (the loss's input).
        z2: ``(N, D)`` projector outputs of the second view.
        segment_dim: Bins per segment ``K >= 2`` (the loss's).
        temperature: Softmax temperature ``t > 0`` (the loss's).
        probabilities: The inputs already hold per-segment probabilities.
        max_pairs: Most segment pairs for the mutual information.
        seed: Seed of the segment-pair subset.

    Returns:
        :class:`MUSICDiagnostics`.

    Example:
        >>> import torch
        >>> from music_loss.metrics import diagnostics
        >>> d = diagnostics(torch.randn(64, 32), torch.randn(64, 32), segment_dim=8)
        >>> sorted(d._asdict())  # doctest: +NORMALIZE_WHITESPACE
        ['agreement', 'confidence', 'min_usage_entropy', 'segment_mi', 'segment_redundancy',
         'usage_entropy']
    """
    segment_dim = _check_metric_segment_dim(segment_dim)
    _check_pair(z1, z2, segment_dim, min_rows=1)
    both = torch.cat([z1.detach(), z2.detach()], dim=0)
    usage = usage_entropy(both, segment_dim, temperature, probabilities=probabilities)
    values = torch.stack([
        usage.mean(),
        usage.min(),
        mean_confidence(both, segment_dim, temperature, probabilities=probabilities),
        segment_mutual_information(both, segment_dim, temperature, probabilities=probabilities,
                                   max_pairs=max_pairs, seed=seed),
        invariance_agreement(z1, z2, segment_dim, temperature, probabilities=probabilities),
        segment_redundancy(both, segment_dim, temperature, probabilities=probabilities,
                           max_pairs=max_pairs, seed=seed),
    ]).tolist()
    return MUSICDiagnostics(*values)
