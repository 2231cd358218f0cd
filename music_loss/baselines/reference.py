"""Plain materialising Barlow Twins and VICReg: the formulas as written, the ``D x D`` matrix
whole, differentiated by autograd. The oracles of the memory-light losses (any dtype, double
backward, ``torch.func``), at ``O(D^2)`` memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _off_diagonal_square_sum(c: Tensor) -> Tensor:
    """``sum_{i != j} c_ij^2``, the diagonal masked out (no cancellation against it)."""
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    return c.masked_fill(eye, 0.0).pow(2).sum()


def barlow_twins_reference(z1: Tensor, z2: Tensor, lambd: float = 0.0051,
                           eps: float = 1e-5) -> Tensor:
    """Barlow Twins, materialising: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.

    ``C = bn(z1)^T bn(z2) / N``, with ``bn`` the batch normalisation of each feature without
    affine parameters, as ``nn.BatchNorm1d(D, affine=False)`` in training mode (biased
    variance, ``eps`` added to it).

    Args:
        z1: ``(N, D)`` embeddings of the first view.
        z2: ``(N, D)`` embeddings of the second view.
        lambd: Weight of the off-diagonal (redundancy reduction) term.
        eps: Added to the batch variance before the square root.

    Returns:
        The scalar loss, in the inputs' dtype.

    Example:
        >>> import torch
        >>> z = torch.randn(16, 32)
        >>> float(barlow_twins_reference(z, z)) >= 0
        True
    """
    n = z1.shape[0]
    zn1 = F.batch_norm(z1, None, None, training=True, momentum=0.0, eps=eps)
    zn2 = F.batch_norm(z2, None, None, training=True, momentum=0.0, eps=eps)
    c = zn1.T @ zn2 / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    return on_diag + lambd * _off_diagonal_square_sum(c)


def vicreg_reference(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                     cov_coeff: float = 1.0, eps: float = 1e-4) -> Tensor:
    """VICReg, materialising: ``sim * s + std * (v1 + v2) / 2 + cov * (c1 + c2)``.

    ``s = mean((z1 - z2)^2)``; per view, with ``x = z - mean(z)`` over the batch:
    ``v = mean_j relu(1 - sqrt(var_j + eps))`` (unbiased variance) and
    ``c = sum_{i != j} Cov_ij^2 / D`` with ``Cov = x^T x / (N - 1)``.

    Args:
        z1: ``(N, D)`` embeddings of the first view.
        z2: ``(N, D)`` embeddings of the second view.
        sim_coeff: Weight of the invariance (mean squared error) term.
        std_coeff: Weight of the variance (hinge on the standard deviation) term.
        cov_coeff: Weight of the covariance term.
        eps: Added to the variance before the square root.

    Returns:
        The scalar loss, in the inputs' dtype.

    Example:
        >>> import torch
        >>> z = torch.randn(16, 32)
        >>> float(vicreg_reference(z, z)) >= 0
        True
    """
    n, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    x = z1 - z1.mean(dim=0)
    y = z2 - z2.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_loss = (_off_diagonal_square_sum(x.T @ x / (n - 1)) / d
                + _off_diagonal_square_sum(y.T @ y / (n - 1)) / d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
