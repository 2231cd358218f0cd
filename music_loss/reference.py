"""The plain, materialising MUSIC loss: the oracle, readable against the paper.

Everything here follows the paper's definitions line by line and lets autograd do the
backward pass. It builds the full ``D x D`` joint distribution, so it is the slowest and
hungriest backend; every other backend is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from music_loss._config import (
    TINY,
    LossConfig,
    MUSICTerms,
    autocast_disabled,
    compute_dtype,
    matmul_operand,
)


def segment_softmax_reference(
    z: Tensor, segment_dim: int, temperature: float = 1.0, eps: float = 0.0
) -> Tensor:
    """``clamp_min(softmax(z.view(N, S, K) / t, -1), eps)`` viewed back as ``(N, D)``.

    The segment's maximum is subtracted before dividing by ``t`` (softmax is shift-invariant,
    so the value and gradient are unchanged): dividing first rounds logits of size ``|z| / t``
    (1000 at ``t = 0.05`` and scale 50) and puts that absolute error into every exponent.
    """
    n, d = z.shape
    logits = z.to(compute_dtype(z.dtype)).view(n, d // segment_dim, segment_dim)
    shifted = logits - logits.detach().amax(dim=-1, keepdim=True)
    q = torch.softmax(shifted / temperature, dim=-1)
    p = torch.clamp_min(q, eps) if eps > 0 else q
    return p.reshape(n, d)


def lg(x: Tensor) -> Tensor:
    """``log(max(x, tiny))``: finite at 0, with ``torch.clamp_min``'s gradient."""
    return torch.log(torch.clamp_min(x, TINY))


def block_masks(dim: int, segment_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Boolean ``(D, D)`` masks of the diagonal entries and of the off-diagonal blocks."""
    seg = torch.arange(dim, device=device) // segment_dim
    off = seg[:, None] != seg[None, :]
    diag = torch.eye(dim, dtype=torch.bool, device=device)
    return diag, off


def joint_entropy_terms_reference(
    p1: Tensor, p2: Tensor, segment_dim: int, p_rows: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Raw sums ``H_diag = sum_a P_aa lg P_aa`` and ``H_off`` over the off-diagonal blocks;
    only over the rows ``a`` in ``p_rows = (p_row_start, p_row_stop)`` of ``P`` when given
    (sharding)."""
    n, d = p1.shape
    joint = p1.T @ p2 / n
    plogp = joint * lg(joint)
    diag, off = block_masks(d, segment_dim, joint.device)
    if p_rows is not None:
        rows = torch.arange(d, device=joint.device)
        owned = ((rows >= p_rows[0]) & (rows < p_rows[1]))[:, None]
        diag, off = diag & owned, off & owned
    # Multiply by the mask rather than index with it: torch.compile of boolean indexing can
    # drift far from float64, and 0 * lg(0) is 0, never NaN, thanks to the floor.
    return (plogp * diag).sum(), (plogp * off).sum()


def invariance_term_reference(p1: Tensor, p2: Tensor, segment_dim: int) -> Tensor:
    """``L_inv = -mean_{i,s} lg(sum_k p1[i,s,k] p2[i,s,k])`` over the rows given."""
    n, d = p1.shape
    agreement = (p1 * p2).view(n, d // segment_dim, segment_dim).sum(-1)
    return -lg(agreement).mean()


def music_loss_reference(
    z1: Tensor, z2: Tensor, config: LossConfig, local_rows: tuple[int, int] | None = None,
    p_rows: tuple[int, int] | None = None, precision: str = "ieee",
) -> MUSICTerms:
    """The MUSIC loss of two views of shape ``(N, D)``, materialising ``P`` (``D x D``).

    Args:
        z1: First view, ``(N, D)``; the global batch when training distributed.
        z2: Second view, same shape.
        config: Hyperparameters.
        local_rows: ``(local_start, local_stop)``: the batch rows that belong to this
            process; the invariance term uses only those. ``None`` means all rows.
        p_rows: ``(p_row_start, p_row_stop)``: the rows of ``P`` whose entropy entries count
            (sharding); ``None`` means all ``D``.
        precision: The joint product's operands: ``"ieee"`` (exact, the oracle), ``"bf16"``
            or ``"tf32"`` (rounded as the other backends round them; the invariance term
            keeps the unrounded probabilities).
    """
    with autocast_disabled(z1.device.type):
        p1 = segment_softmax_reference(z1, config.segment_dim, config.temperature, config.eps)
        p2 = segment_softmax_reference(z2, config.segment_dim, config.temperature, config.eps)
        h_diag, h_off = joint_entropy_terms_reference(
            matmul_operand(p1, precision), matmul_operand(p2, precision), config.segment_dim,
            p_rows)
        local_start, local_stop = local_rows if local_rows is not None else (0, p1.shape[0])
        l_inv = invariance_term_reference(p1[local_start:local_stop], p2[local_start:local_stop],
                                          config.segment_dim)
        c_diag, c_off = config.coefficients(p1.shape[1])
        diag = c_diag * h_diag
        off = c_off * h_off
        inv = config.invariance_weight * l_inv
        return MUSICTerms(diag + off + inv, diag, off, inv)
