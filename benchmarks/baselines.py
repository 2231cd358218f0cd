"""Barlow Twins and VICReg losses in their official single-process form, as benchmark peers.

Both follow the authors' released code (facebookresearch/barlowtwins ``main.py``,
facebookresearch/vicreg ``main_vicreg.py``) without the distributed reductions; the
off-diagonal sums are written as ``total - diagonal`` instead of the flatten/view trick,
which is the same number without copying the ``D x D`` matrix once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _batch_norm(z: Tensor) -> Tensor:
    """``nn.BatchNorm1d(D, affine=False)`` in training mode: biased variance, eps 1e-5."""
    return F.batch_norm(z, None, None, training=True, momentum=0.0, eps=1e-5)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051) -> Tensor:
    """Barlow Twins: ``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.

    ``C = bn(z1)^T bn(z2) / N`` is the cross-correlation of the batch-normalised views.

    Example:
        >>> import torch
        >>> z = torch.randn(16, 32)
        >>> float(barlow_twins_loss(z, z)) >= 0
        True
    """
    n = z1.shape[0]
    c = _batch_norm(z1).T @ _batch_norm(z2) / n
    diag = torch.diagonal(c)
    on_diag = (diag - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
) -> Tensor:
    """VICReg: invariance (MSE) + variance hinge (std with 1e-4) + covariance (over N - 1).

    Example:
        >>> import torch
        >>> z = torch.randn(16, 32)
        >>> float(vicreg_loss(z, z)) >= 0
        True
    """
    n, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    x = z1 - z1.mean(dim=0)
    y = z2 - z2.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x = x.T @ x / (n - 1)
    cov_y = y.T @ y / (n - 1)
    cov_loss = ((cov_x.pow(2).sum() - torch.diagonal(cov_x).pow(2).sum()) / d
                + (cov_y.pow(2).sum() - torch.diagonal(cov_y).pow(2).sum()) / d)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
