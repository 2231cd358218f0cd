"""Memory-light VICReg: each view's ``D x D`` covariance a block of rows at a time."""

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


def _covariance_term(x: Tensor, need_grad: bool, chunk: int, weight: float,
                     acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``sum_{i != j} Cov_ij^2`` of the centred ``x`` (``Cov = x^T x / (N - 1)``), and the
    gradient of ``weight`` times it with respect to ``x`` when ``need_grad``.

    ``Cov`` is symmetric, so ``d/dx = 4 x Cov_off / (N - 1)``: block ``A`` of rows gives the
    columns ``A`` of the gradient, ``x Cov_off[A, :]^T``. Two ``N x D x D`` products per view
    (autograd on the materialised ``x^T x`` runs three).
    """
    n, d = x.shape
    total = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.zeros_like(x) if need_grad else None
    for a0 in range(0, d, chunk):
        a1 = min(a0 + chunk, d)
        block = torch.mm(x[:, a0:a1].t(), x).div_(n - 1)  # Cov[a0:a1, :]
        block.diagonal(a0).zero_()  # off-diagonal entries only
        if dx is not None:
            dx[:, a0:a1].addmm_(x, block.t(), alpha=4.0 * weight / (n - 1))
        total += block.square_().sum(dtype=acc)
        del block
    return total, dx


class _BlockedVICReg(torch.autograd.Function):
    """Loss and both gradients in one pass (finished in the forward pass; backward only
    scales them by ``grad_output``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z1: Tensor, z2: Tensor, coeffs: tuple[float, float, float], eps: float,
        chunk: int, local_rows: tuple[int, int], need_grads: tuple[bool, bool],
    ) -> Tensor:
        sim_coeff, std_coeff, cov_coeff = coeffs
        n, d = z1.shape
        dtype = compute_dtype(z1.dtype)
        acc = accumulator(z1.device)
        x1, x2 = z1.to(dtype), z2.to(dtype)

        # Invariance: mean squared error over this rank's rows (all rows in one process).
        l0, l1 = local_rows
        diff = x1[l0:l1] - x2[l0:l1]
        repr_loss = diff.square().sum(dtype=acc) / ((l1 - l0) * d)

        total = sim_coeff * repr_loss
        grads: list[Tensor | None] = []
        for x, need in ((x1, need_grads[0]), (x2, need_grads[1])):
            xc = x - x.mean(0)
            std = torch.sqrt(xc.square().sum(0).div_(n - 1).add_(eps))
            hinge = (1 - std).clamp_min_(0.0)
            total = total + std_coeff * hinge.sum(dtype=acc) / (2 * d)
            cov_sum, dxc = _covariance_term(xc, need, chunk, cov_coeff / d, acc)
            total = total + cov_coeff * cov_sum / d
            if dxc is not None:
                # d/dx of relu(1 - std_j) / (2 D): -[std_j < 1] x_j / (2 D (N - 1) std_j)
                active = (std < 1).to(dtype)
                dxc.addcmul_(xc, active / std, value=-std_coeff / (2 * d * (n - 1)))
                dxc.sub_(dxc.mean(0))  # through the centring
            grads.append(dxc)
            del xc
        dz1, dz2 = grads
        # The invariance gradient bypasses the centring: it acts on the raw views.
        scale = 2.0 * sim_coeff / ((l1 - l0) * d)
        if dz1 is not None:
            dz1[l0:l1].add_(diff, alpha=scale)
        if dz2 is not None:
            dz2[l0:l1].sub_(diff, alpha=scale)
        ctx.save_for_backward(dz1, dz2)
        ctx.input_dtypes = (z1.dtype, z2.dtype)
        return total.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        refuse_double_backward()
        dz1, dz2 = ctx.saved_tensors
        grads = [None if dz is None else (dz * grad_loss.to(dz.dtype)).to(dtype)
                 for dz, dtype in zip((dz1, dz2), ctx.input_dtypes)]
        return grads[0], grads[1], None, None, None, None, None


def vicreg_loss(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4, chunk_size: int | None = None,
                local_rows: tuple[int, int] | None = None) -> Tensor:
    """VICReg at ``O(N D)`` extra memory: ``sim * s + std * (v1 + v2) / 2 + cov * (c1 + c2)``.

    ``s = mean((z1 - z2)^2)``; per view (``x`` centred over the batch) the hinge
    ``v = mean_j relu(1 - sqrt(var_j + eps))`` on the unbiased variance and
    ``c = sum_{i != j} Cov_ij^2 / D`` with ``Cov = x^T x / (N - 1)``, each ``Cov`` built
    ``chunk_size`` rows at a time with its share of the gradient (finished here). The value
    and gradients are those of :func:`~music_loss.baselines.vicreg_reference`. A view that
    does not require grad costs no gradient product. Inputs of 16 bits compute in float32.

    Args:
        z1: ``(N, D)`` embeddings of the first view.
        z2: ``(N, D)`` embeddings of the second view.
        sim_coeff: Weight of the invariance term.
        std_coeff: Weight of the variance term.
        cov_coeff: Weight of the covariance term.
        eps: Added to the variance before the square root.
        chunk_size: Rows of ``Cov`` per block (``None``: about ``N D / 2`` elements).
        local_rows: Rows ``(start, stop)`` whose invariance term counts (``None``: all), as
            the official code computes it on each rank's own batch.

    Returns:
        The scalar loss (float64 for float64 inputs, else float32).

    Raises:
        RuntimeError: In a double backward (``create_graph=True``) through the loss.

    Example:
        >>> import torch
        >>> z1 = torch.randn(32, 64, requires_grad=True)
        >>> loss = vicreg_loss(z1, torch.randn(32, 64))
        >>> loss.backward()
        >>> z1.grad.shape
        torch.Size([32, 64])
    """
    check_views(z1, z2, min_rows=2)
    n, d = z1.shape
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, d)
    rows = local_rows if local_rows is not None else (0, n)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and z1.requires_grad, grad_on and z2.requires_grad)
    coeffs = (float(sim_coeff), float(std_coeff), float(cov_coeff))
    # Autocast would lower every product, gradient products included, to 16 bits.
    with torch.autocast(z1.device.type, enabled=False):
        loss: Tensor = _BlockedVICReg.apply(z1, z2, coeffs, float(eps), chunk, rows, need)
    return loss


class VICRegLoss(nn.Module):
    """VICReg loss with ``O(N D)`` extra memory, and exact global-batch distribution.

    ::

        loss = sim_coeff * s(z1, z2) + std_coeff * (v(z1) + v(z2)) / 2
               + cov_coeff * (c(z1) + c(z2))

    with the official formulas: ``s`` the mean squared error, ``v`` the mean over features of
    ``relu(1 - sqrt(Var + eps))`` (unbiased variance), ``c`` the sum of the squared
    off-diagonal covariances (over ``N - 1``) divided by ``D``. The official code
    materialises each view's ``D x D`` covariance (about 8 buffers of ``D^2`` at the peak of
    forward+backward); here each is built a block of rows at a time and the gradients are
    finished in the forward pass: ``8 N D^2`` FLOPs (the official autograd runs ``12 N D^2``,
    not using the covariance's symmetry).

    ``gather_distributed=True`` all-gathers both views with an autograd-aware gather, as the
    official ``FullGatherLayer``: the variance and covariance terms use the global batch, the
    invariance term this rank's own rows. The mean of the ranks' losses is the loss of the
    concatenated batch and DDP-averaged gradients are those of one process on it. Ranks must
    hold equal batch sizes, as DDP with ``drop_last=True`` gives.

    Args:
        sim_coeff: Weight of the invariance term (25 in the paper).
        std_coeff: Weight of the variance term (25).
        cov_coeff: Weight of the covariance term (1).
        eps: Added to the variance before the square root (1e-4).
        gather_distributed: Variance and covariance over the global batch of all ranks.
        process_group: Group for the gather (the default group when ``None``).
        chunk_size: Rows of each covariance per block (``None``: about ``N D / 2`` elements).

    Raises:
        TypeError, ValueError: At construction, for a hyperparameter of the wrong type or
            range; at a call, for views of the wrong shape, dtype or device.

    Example:
        >>> import torch
        >>> loss_fn = VICRegLoss()
        >>> z1 = torch.randn(32, 64, requires_grad=True)
        >>> loss = loss_fn(z1, z1.detach() + 0.1 * torch.randn(32, 64))
        >>> loss.backward()
        >>> bool(loss > 0)
        True
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, gather_distributed: bool = False, process_group: Any = None,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        self.sim_coeff = check_real("sim_coeff", sim_coeff, minimum=0.0,
                                    hint="; the paper uses sim_coeff=25.0")
        self.std_coeff = check_real("std_coeff", std_coeff, minimum=0.0,
                                    hint="; the paper uses std_coeff=25.0")
        self.cov_coeff = check_real("cov_coeff", cov_coeff, minimum=0.0,
                                    hint="; the paper uses cov_coeff=1.0")
        self.eps = check_real("eps", eps, positive=True, hint="; the paper uses eps=1e-4")
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.process_group = process_group
        self.chunk_size = check_chunk_size(chunk_size)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The loss of the two views (global statistics under ``gather_distributed``)."""
        check_views(z1, z2, min_rows=1 if self.gather_distributed else 2)
        local_rows = None
        if self.gather_distributed:
            z1, z2, local_rows = gather_views(z1, z2, self.process_group)
        return vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps,
                           self.chunk_size, local_rows)

    def extra_repr(self) -> str:
        parts = [f"sim_coeff={self.sim_coeff}", f"std_coeff={self.std_coeff}",
                 f"cov_coeff={self.cov_coeff}", f"eps={self.eps}"]
        if self.gather_distributed:
            parts.append("gather_distributed=True")
        return ", ".join(parts)
