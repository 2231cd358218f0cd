"""``nn.Module`` forms: they hold hyperparameters and call the functional API."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from music_loss._config import BACKENDS, PRECISIONS, MUSICTerms
from music_loss.functional import (
    _check_choice,
    _check_process_group,
    make_config,
    music_loss,
    segment_softmax,
)


class MUSICLoss(nn.Module):
    r"""MUSIC loss (Multi-Segmental Informational Coding), a drop-in SSL criterion.

    Splits each ``D``-dim embedding into ``S = D / segment_dim`` segments, turns each into a
    distribution with a softmax, and minimises the entropy of the cross-view joint
    distribution's diagonal and off-diagonal blocks plus an invariance term::

        L = w_diag H_diag / S + w_off H_off / (S (S-1)) + w_inv L_inv     ("blocks", Eq. 5)
        L = (w_diag H_diag + w_off H_off) / S**2 + w_inv L_inv            ("joint",  Eq. 3)

    See :func:`music_loss.functional.music_loss` for every term. The loss is a statistic of
    the whole batch (no gradient accumulation over micro-batches); use
    ``gather_distributed=True`` to compute it over the global batch under DDP.

    Args:
        segment_dim: Bins per segment ``K`` (paper: 80 with ``D = 8160``).
        temperature: Softmax temperature ``t > 0``.
        eps: Lower clamp of the probabilities (``0`` disables it).
        diag_weight: Weight of the diagonal entropy term.
        off_weight: Weight of the off-diagonal-block entropy term.
        invariance_weight: Weight ``lambda`` of the invariance term.
        normalization: ``"blocks"`` (default) or ``"joint"``.
        gather_distributed: All-gather the views across ranks (with gradient).
        process_group: Group for the gather (default group when ``None``).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"reference"``.
        precision: ``"auto"`` | ``"ieee"`` | ``"tf32"`` | ``"bf16"``.

    Raises:
        ValueError: On a bad hyperparameter, or ``gather_distributed=True`` without an
            initialised process group.

    Example:
        >>> import torch
        >>> from music_loss import MUSICLoss
        >>> loss_fn = MUSICLoss(segment_dim=80)
        >>> z1 = torch.randn(64, 8160, requires_grad=True)
        >>> z2 = torch.randn(64, 8160, requires_grad=True)
        >>> loss = loss_fn(z1, z2)
        >>> loss.backward()
        >>> loss.shape, z1.grad.shape
        (torch.Size([]), torch.Size([64, 8160]))
    """

    def __init__(
        self,
        segment_dim: int = 80,
        *,
        temperature: float = 1.0,
        eps: float = 1e-8,
        diag_weight: float = 1.0,
        off_weight: float = 1.0,
        invariance_weight: float = 1.0,
        normalization: str = "blocks",
        gather_distributed: bool = False,
        process_group: Any = None,
        backend: str = "auto",
        precision: str = "auto",
    ) -> None:
        super().__init__()
        # Validate now so a typo fails at construction, not at the first step.
        make_config(segment_dim, temperature, eps, diag_weight, off_weight, invariance_weight,
                    normalization)
        _check_choice("backend", backend, BACKENDS)
        _check_choice("precision", precision, PRECISIONS)
        if gather_distributed:
            _check_process_group()
        self.segment_dim = segment_dim
        self.temperature = temperature
        self.eps = eps
        self.diag_weight = diag_weight
        self.off_weight = off_weight
        self.invariance_weight = invariance_weight
        self.normalization = normalization
        self.gather_distributed = gather_distributed
        self.process_group = process_group
        self.backend = backend
        self.precision = precision

    def forward(self, z1: Tensor, z2: Tensor, return_terms: bool = False) -> Tensor | MUSICTerms:
        """Loss of two ``(N, D)`` views (or :class:`MUSICTerms` with ``return_terms=True``)."""
        return music_loss(
            z1, z2, self.segment_dim,
            temperature=self.temperature, eps=self.eps, diag_weight=self.diag_weight,
            off_weight=self.off_weight, invariance_weight=self.invariance_weight,
            normalization=self.normalization, gather_distributed=self.gather_distributed,
            process_group=self.process_group, backend=self.backend, precision=self.precision,
            return_terms=return_terms,
        )

    def extra_repr(self) -> str:
        return (f"segment_dim={self.segment_dim}, temperature={self.temperature}, "
                f"eps={self.eps}, normalization={self.normalization!r}, "
                f"backend={self.backend!r}, precision={self.precision!r}")


class SegmentSoftmax(nn.Module):
    """Module form of :func:`music_loss.segment_softmax` (no clamp by default).

    Example:
        >>> import torch
        >>> from music_loss import SegmentSoftmax
        >>> SegmentSoftmax(segment_dim=4)(torch.zeros(2, 8))[0, :4]
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """

    def __init__(self, segment_dim: int, temperature: float = 1.0, eps: float = 0.0) -> None:
        super().__init__()
        make_config(segment_dim, temperature, eps)
        self.segment_dim = segment_dim
        self.temperature = temperature
        self.eps = eps

    def forward(self, z: Tensor) -> Tensor:
        return segment_softmax(z, self.segment_dim, self.temperature, self.eps)

    def extra_repr(self) -> str:
        return f"segment_dim={self.segment_dim}, temperature={self.temperature}, eps={self.eps}"
