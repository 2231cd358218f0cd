"""The three criteria of ``pretrain.py --loss``, each computed over the global batch.

* MUSIC: :class:`music_loss.MUSICLoss` with ``gather_distributed=True`` under torchrun
  (entropy on the all-gathered batch, invariance on the local batch).
* Barlow Twins, global-batch form (not the official multi-GPU code): the cross-correlation of
  batch-normalised views, divided by the global batch and summed over ranks through an
  autograd-aware all-reduce, with global normalisation statistics. Its gradients equal
  single-process training on the global batch. The official code
  (facebookresearch/barlowtwins) all-reduces the cross-correlation with
  ``torch.distributed.all_reduce``, which autograd does not see: each rank back-propagates
  only its own rows' part, and after DDP's averaging the gradient is 1/W of the
  single-process one (W ranks), a rescaling LARS mostly absorbs but plain SGD would not.
* VICReg (facebookresearch/vicreg): both views all-gathered with gradient
  (``FullGatherLayer``), then the single-process formula, as in the official code.

On one process each equals its single-process formula (``benchmarks/baselines.py``).
Every criterion returns ``(loss, terms)`` with named float parts for the logs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from music_loss import MUSICLoss
from music_loss.distributed import gather_rows

LOSSES = ("music", "barlow-twins", "vicreg")


def _at_least_float32(z: Tensor) -> Tensor:
    """The peers' statistics in float32 under autocast (float64 inputs stay float64)."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward pass sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    """Autograd-aware sum of ``x`` over ranks (identity on one process).

    Each rank's loss is the same global number, so summing gradients over ranks and then
    DDP's averaging give exactly the single-process gradient.
    """
    return _AllReduceSum.apply(x) if _world() > 1 else x


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather rows with gradient (VICReg's ``FullGatherLayer``; identity on one process)."""
    return gather_rows(x)[0] if _world() > 1 else x


def global_batch_norm(z: Tensor, eps: float = 1e-5) -> Tensor:
    """``BatchNorm1d(affine=False)`` in training mode with statistics over all ranks' rows.

    Example:
        >>> z = torch.randn(8, 3)
        >>> ref = F.batch_norm(z, None, None, training=True, eps=1e-5)
        >>> torch.allclose(global_batch_norm(z), ref, atol=1e-6)
        True
    """
    count = all_reduce_sum(torch.tensor(float(z.shape[0]), device=z.device, dtype=z.dtype))
    mean = all_reduce_sum(z.sum(0)) / count
    var = all_reduce_sum((z - mean).pow(2).sum(0)) / count  # biased, as BatchNorm normalises
    return (z - mean) * torch.rsqrt(var + eps)


def barlow_twins_loss_distributed(z1: Tensor, z2: Tensor,
                                  lambd: float = 0.0051) -> tuple[Tensor, dict[str, Tensor]]:
    """Barlow Twins ``sum_i (1 - C_ii)^2 + lambd sum_{i!=j} C_ij^2`` over the global batch.

    The all-reduce of ``C`` carries gradient (single-process gradients on any number of
    ranks), unlike the official code's (1/W of that after DDP averaging; module docstring).

    Example:
        >>> z = torch.randn(16, 8)
        >>> loss, terms = barlow_twins_loss_distributed(z, z)
        >>> sorted(terms)
        ['off_diag', 'on_diag']
    """
    z1, z2 = _at_least_float32(z1), _at_least_float32(z2)
    global_n = z1.shape[0] * _world()
    c = all_reduce_sum(global_batch_norm(z1).T @ global_batch_norm(z2) / global_n)
    diag = torch.diagonal(c)
    on_diag = (diag - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag, {"on_diag": on_diag, "off_diag": lambd * off_diag}


def vicreg_loss_distributed(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0,
                            std_coeff: float = 25.0,
                            cov_coeff: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg: invariance on the local batch, variance and covariance on the gathered one.

    As in the official code, the invariance (MSE) term uses the local views and the others the
    all-gathered ones.

    Example:
        >>> z = torch.randn(16, 8)
        >>> loss, terms = vicreg_loss_distributed(z, z + 0.1)
        >>> sorted(terms)
        ['covariance', 'invariance', 'variance']
    """
    z1, z2 = _at_least_float32(z1), _at_least_float32(z2)
    repr_loss = F.mse_loss(z1, z2)
    x, y = gather_with_grad(z1), gather_with_grad(z2)
    n, d = x.shape
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
    cov_x = x.T @ x / (n - 1)
    cov_y = y.T @ y / (n - 1)
    cov_loss = ((cov_x.pow(2).sum() - torch.diagonal(cov_x).pow(2).sum()) / d
                + (cov_y.pow(2).sum() - torch.diagonal(cov_y).pow(2).sum()) / d)
    terms = {"invariance": sim_coeff * repr_loss, "variance": std_coeff * std_loss,
             "covariance": cov_coeff * cov_loss}
    return terms["invariance"] + terms["variance"] + terms["covariance"], terms


class Criterion:
    """``(z1, z2) -> (loss, terms)`` for ``--loss music|barlow-twins|vicreg``.

    Example:
        >>> crit = Criterion("music", segment_dim=4, backend="reference")
        >>> loss, terms = crit(torch.randn(8, 12), torch.randn(8, 12))
        >>> sorted(terms)
        ['diag', 'invariance', 'off']
    """

    def __init__(self, name: str, *, segment_dim: int = 80, backend: str = "auto",
                 precision: str = "auto", normalization: str = "blocks",
                 invariance_weight: float = 1.0, temperature: float = 1.0,
                 shard: bool = True) -> None:
        if name not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {name!r}")
        self.name = name
        self.music = None
        if name == "music":
            self.music = MUSICLoss(segment_dim, temperature=temperature,
                                   invariance_weight=invariance_weight,
                                   normalization=normalization, gather_distributed=_world() > 1,
                                   backend=backend, precision=precision, shard=shard)

    def __call__(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.music is not None:
            terms = self.music(z1, z2, return_terms=True)
            return terms.loss, {"diag": terms.diag, "off": terms.off,
                                "invariance": terms.invariance}
        if self.name == "barlow-twins":
            return barlow_twins_loss_distributed(z1, z2)
        return vicreg_loss_distributed(z1, z2)
