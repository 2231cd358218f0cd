"""Memory-light Barlow Twins: the ``D x D`` cross-correlation a block of rows at a time."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from music_loss.baselines._common import (
    accumulator,
    check_chunk_size,
    check_flag,
    check_real,
    check_views,
    compute_dtype,
    default_chunk_size,
    gather_views,
    refuse_double_backward,
)


def _batch_norm(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Each feature standardised over the batch (biased variance + eps), and ``1 / sigma``."""
    mean = x.mean(0)
    inv_std = torch.rsqrt(x.var(0, unbiased=False).add_(eps))
    return (x - mean).mul_(inv_std), inv_std


def _batch_norm_backward_(dzn: Tensor, zn: Tensor, inv_std: Tensor) -> Tensor:
    """``dz = (dzn - mean(dzn) - zn * mean(dzn * zn)) / sigma``, in ``dzn``'s buffer."""
    proj = (dzn * zn).mean(0)
    return dzn.sub_(dzn.mean(0)).sub_(zn * proj).mul_(inv_std)


class _BlockedBarlowTwins(torch.autograd.Function):
    """Loss and both gradients in one pass over row blocks of ``C`` (the gradients are
    finished in the forward pass; backward only scales them by ``grad_output``).

    With ``G = dL/dC`` (``2 lambd C_ij`` off the diagonal, ``-2 (1 - C_ii)`` on it), block
    ``A`` of rows gives ``dzn1[:, A] = zn2 G[A, :]^T / N`` and ``dzn2 += zn1[:, A] G[A, :] / N``:
    three ``N x D x D`` products in all, the ones autograd runs on the materialised ``C``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z1: Tensor, z2: Tensor, lambd: float, eps: float, chunk: int,
        need_grads: tuple[bool, bool],
    ) -> Tensor:
        n, d = z1.shape
        dtype = compute_dtype(z1.dtype)
        acc = accumulator(z1.device)
        need1, need2 = need_grads
        zn1, inv1 = _batch_norm(z1.to(dtype), eps)
        zn2, inv2 = _batch_norm(z2.to(dtype), eps)
        dzn1 = torch.zeros_like(zn1) if need1 else None
        dzn2 = torch.zeros_like(zn2) if need2 else None
        on_diag = torch.zeros((), dtype=acc, device=z1.device)
        off_diag = torch.zeros((), dtype=acc, device=z1.device)
        for a0 in range(0, d, chunk):
            a1 = min(a0 + chunk, d)
            rows = zn1[:, a0:a1]  # a strided view: BLAS reads it in place
            block = torch.mm(rows.t(), zn2).div_(n)  # C[a0:a1, :]
            diag = block.diagonal(a0)  # C_ii for i in [a0, a1): entries (i - a0, i)
            on_diag += (1 - diag).square().sum(dtype=acc)
            grad_diag = (diag - 1).mul_(2.0)  # dL/dC_ii, before diag is overwritten
            square = block.square()
            square.diagonal(a0).zero_()
            off_diag += square.sum(dtype=acc)
            del square
            if need1 or need2:
                grad = block.mul_(2.0 * lambd)  # dL/dC off the diagonal, in place
                grad.diagonal(a0).copy_(grad_diag)
                if dzn1 is not None:
                    dzn1[:, a0:a1].addmm_(zn2, grad.t(), alpha=1.0 / n)
                if dzn2 is not None:
                    dzn2.addmm_(rows, grad, alpha=1.0 / n)
            del block
        loss = (on_diag + lambd * off_diag).to(dtype)
        dz1 = _batch_norm_backward_(dzn1, zn1, inv1) if dzn1 is not None else None
        dz2 = _batch_norm_backward_(dzn2, zn2, inv2) if dzn2 is not None else None
        ctx.save_for_backward(dz1, dz2)
        ctx.input_dtypes = (z1.dtype, z2.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_double_backward()
        dz1, dz2 = ctx.saved_tensors
        grads = [None if dz is None else (dz * grad_loss.to(dz.dtype)).to(dtype)
                 for dz, dtype in zip((dz1, dz2), ctx.input_dtypes)]
        return grads[0], grads[1], None, None, None, None


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051, eps: float = 1e-5,
                      chunk_size: int | None = None) -> Tensor:
    """Barlow Twins at ``O(N D)`` extra memory: ``sum_i (1 - C_ii)^2 + lambd sum_{i!=j} C_ij^2``.

    ``C = bn(z1)^T bn(z2) / N`` (``bn``: ``nn.BatchNorm1d(D, affine=False)`` in training mode,
    biased variance plus ``eps``) is built ``chunk_size`` rows at a time; each block adds its
    share of the loss and of both gradients, which are finished here. The value and gradients
    are those of :func:`~music_loss.baselines.barlow_twins_reference`. A view that does not
    require grad costs no gradient product. Inputs of 16 bits compute in float32.

    Args:
        z1: ``(N, D)`` embeddings of the first view.
        z2: ``(N, D)`` embeddings of the second view.
        lambd: Weight of the off-diagonal term.
        eps: Added to the batch variance before the square root.
        chunk_size: Rows of ``C`` per block (``None``: about ``N D / 2`` elements).

    Returns:
        The scalar loss (float64 for float64 inputs, else float32).

    Raises:
        RuntimeError: In a double backward (``create_graph=True``) through the loss.

    Example:
        >>> import torch
        >>> z1 = torch.randn(32, 64, requires_grad=True)
        >>> loss = barlow_twins_loss(z1, torch.randn(32, 64))
        >>> loss.backward()
        >>> z1.grad.shape
        torch.Size([32, 64])
    """
    check_views(z1, z2, min_rows=2)
    n, d = z1.shape
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, d)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and z1.requires_grad, grad_on and z2.requires_grad)
    # Autocast would lower every product, gradient products included, to 16 bits.
    with torch.autocast(z1.device.type, enabled=False):
        loss: Tensor = _BlockedBarlowTwins.apply(z1, z2, float(lambd), float(eps), chunk, need)
    return loss


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins loss with ``O(N D)`` extra memory, and exact global-batch distribution.

    ``loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``, ``C = bn(z1)^T bn(z2) / N``,
    with ``bn`` the official normalisation (``BatchNorm1d(affine=False)``, training mode: mean
    and biased variance over the batch, ``eps`` added to the variance). The official code
    materialises the ``D x D`` matrix ``C`` several times (about 6 buffers of ``D^2`` at the
    peak of forward+backward); here it is built a block of rows at a time, with the same
    ``6 N D^2`` FLOPs, and the gradients are finished in the forward pass.

    ``gather_distributed=True`` all-gathers both views with an autograd-aware gather, so the
    batch statistics and ``C`` are those of the global batch: every rank returns the loss of
    the concatenated batch, and under DDP's gradient averaging the parameters receive exactly
    the gradient of one process on it. (The official code all-reduces ``C``, an operation
    without gradient: each rank back-propagates only its own share, and the DDP-averaged
    gradient is ``1 / W`` of the single-process one for ``W`` ranks.) Ranks must hold equal
    batch sizes, as DDP with ``drop_last=True`` gives.

    Args:
        lambd: Weight of the off-diagonal term (0.0051 in the paper, 0.005 in lightly).
        eps: Added to the batch variance (BatchNorm1d's default 1e-5).
        gather_distributed: Compute over the global batch of all ranks (with gradient).
        process_group: Group for the gather (the default group when ``None``).
        chunk_size: Rows of ``C`` per block (``None``: about ``N D / 2`` elements).

    Raises:
        TypeError, ValueError: At construction, for a hyperparameter of the wrong type or
            range; at a call, for views of the wrong shape, dtype or device.

    Example:
        >>> import torch
        >>> loss_fn = BarlowTwinsLoss()
        >>> z1 = torch.randn(32, 64, requires_grad=True)
        >>> loss = loss_fn(z1, z1.detach() + 0.1 * torch.randn(32, 64))
        >>> loss.backward()
        >>> bool(loss > 0)
        True
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5,
                 gather_distributed: bool = False, process_group: Any = None,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        self.lambd = check_real("lambd", lambd, minimum=0.0,
                                hint="; the paper uses lambd=0.0051")
        self.eps = check_real("eps", eps, positive=True,
                              hint="; BatchNorm1d's default is eps=1e-5")
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.process_group = process_group
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The loss of the two views (of the global batch under ``gather_distributed``)."""
        check_views(z1, z2, min_rows=1 if self.gather_distributed else 2)
        if self.gather_distributed:
            z1, z2, _ = gather_views(z1, z2, self.process_group)
        return barlow_twins_loss(z1, z2, self.lambd, self.eps, self.chunk_size)

    def extra_repr(self) -> str:
        parts = [f"lambd={self.lambd}", f"eps={self.eps}"]
        if self.gather_distributed:
            parts.append("gather_distributed=True")
        return ", ".join(parts)
