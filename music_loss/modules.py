"""``nn.Module`` forms: they hold hyperparameters and call the functional API."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from music_loss._config import Backend, LossConfig, MUSICTerms, Normalization, Precision
from music_loss._validate import (
    check_backend,
    check_chunk_size,
    check_flag,
    check_precision,
    make_config,
)
from music_loss.functional import loss_with_config, segment_softmax

#: Options of :class:`MUSICLoss` outside the loss's hyperparameters, with their validators.
_OPTIONS: dict[str, Any] = {
    "gather_distributed": lambda v: check_flag("gather_distributed", v),
    "process_group": lambda v: v,
    "backend": check_backend,
    "precision": check_precision,
    "check_finite": lambda v: check_flag("check_finite", v),
    "chunk_size": check_chunk_size,
    "uneven_batches": lambda v: check_flag("uneven_batches", v),
    "shard": lambda v: check_flag("shard", v),
}


def _config_field(name: str) -> property:
    """A hyperparameter of the config, validated on assignment as at construction."""

    def get(self: MUSICLoss) -> Any:
        return getattr(self.config, name)

    def set_(self: MUSICLoss, value: Any) -> None:
        fields = dataclasses.asdict(self.config)
        fields[name] = value
        self.config = make_config(**fields)

    return property(get, set_, doc=f"``{name}``, validated on assignment.")


def _option(name: str) -> property:
    def get(self: MUSICLoss) -> Any:
        return self._options[name]

    def set_(self: MUSICLoss, value: Any) -> None:
        self._options[name] = _OPTIONS[name](value)

    return property(get, set_, doc=f"``{name}``, validated on assignment.")


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
        check_finite: Raise if a view holds NaN or inf (eager: a host sync per call; under
            ``torch.compile``: a device-side assertion).
        chunk_size: Rows of ``P`` per block (``torch``) or per chunk of the fused
            gradient products (``triton``); ``None``: from the shapes.
        uneven_batches: With ``gather_distributed``, allow different per-rank batch sizes;
            each rank's invariance term is weighted by its share of the global batch, so the
            mean loss and DDP's gradients are those of one process. By default the sizes must
            be equal (checked on every rank at every call).
        shard: With ``gather_distributed``, each rank computes only its rows of ``P``
            (``1/W`` of the loss's work, same values and gradients); ``False``: every rank
            computes all of ``P``.

    The hyperparameters are validated at construction and again on every assignment
    (``loss_fn.chunk_size = 0`` raises the same error as ``MUSICLoss(chunk_size=0)``), so a
    typo fails where it is made and each call only checks the views. Numbers may be Python
    numbers, numpy scalars or 0-dim tensors (read once, as a Python float). ``temperature``
    and the weights can change between steps, e.g. a temperature schedule::

        loss_fn = MUSICLoss(segment_dim=80, temperature=1.0)
        for epoch in range(epochs):
            loss_fn.temperature = 1.0 - 0.5 * epoch / max(1, epochs - 1)   # 1.0 -> 0.5
            ...

    Under ``torch.compile`` a changed value is picked up: the first change recompiles the
    step once, after which PyTorch treats the value as an input of the graph (four
    temperatures, two graphs, values equal to eager).

    ``gather_distributed=True`` may be set before the process group exists (trainers build
    modules first): the group is required at the first call.

    Raises:
        ValueError: On a bad hyperparameter.

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
        normalization: Normalization = "blocks",
        gather_distributed: bool = False,
        process_group: Any = None,
        backend: Backend = "auto",
        precision: Precision = "auto",
        check_finite: bool = False,
        chunk_size: int | None = None,
        uneven_batches: bool = False,
        shard: bool = True,
    ) -> None:
        super().__init__()
        self.config: LossConfig = make_config(segment_dim, temperature, eps, diag_weight,
                                              off_weight, invariance_weight, normalization)
        self._options: dict[str, Any] = {}
        self.gather_distributed = gather_distributed
        self.process_group = process_group
        self.backend = backend
        self.precision = precision
        self.check_finite = check_finite
        self.chunk_size = chunk_size
        self.uneven_batches = uneven_batches
        self.shard = shard

    # Views of the config: assignment validates and replaces the (immutable) config.
    segment_dim: int = _config_field("segment_dim")  # type: ignore[assignment]
    temperature: float = _config_field("temperature")  # type: ignore[assignment]
    eps: float = _config_field("eps")  # type: ignore[assignment]
    diag_weight: float = _config_field("diag_weight")  # type: ignore[assignment]
    off_weight: float = _config_field("off_weight")  # type: ignore[assignment]
    invariance_weight: float = _config_field("invariance_weight")  # type: ignore[assignment]
    normalization: Normalization = _config_field("normalization")  # type: ignore[assignment]
    gather_distributed: bool = _option("gather_distributed")  # type: ignore[assignment]
    process_group: Any = _option("process_group")
    backend: Backend = _option("backend")  # type: ignore[assignment]
    precision: Precision = _option("precision")  # type: ignore[assignment]
    check_finite: bool = _option("check_finite")  # type: ignore[assignment]
    chunk_size: int | None = _option("chunk_size")  # type: ignore[assignment]
    uneven_batches: bool = _option("uneven_batches")  # type: ignore[assignment]
    shard: bool = _option("shard")  # type: ignore[assignment]

    def forward(self, z1: Tensor, z2: Tensor, return_terms: bool = False) -> Tensor | MUSICTerms:
        """Loss of two ``(N, D)`` views (or :class:`MUSICTerms` with ``return_terms=True``;
        only its ``loss`` carries a gradient)."""
        terms = loss_with_config(
            z1, z2, self.config, gather_distributed=self.gather_distributed,
            process_group=self.process_group, backend=self.backend, precision=self.precision,
            check_finite=self.check_finite, chunk_size=self.chunk_size,
            uneven_batches=self.uneven_batches, shard=self.shard,
        )
        return terms if return_terms else terms.loss

    def extra_repr(self) -> str:
        """Every hyperparameter that changes the loss or how it is computed; the weights,
        the distributed options and the tuning knobs only when they are not the defaults."""
        c = self.config
        parts = [f"segment_dim={c.segment_dim}", f"temperature={c.temperature}",
                 f"eps={c.eps}"]
        parts += [f"{name}={value}" for name, value in (
            ("diag_weight", c.diag_weight), ("off_weight", c.off_weight),
            ("invariance_weight", c.invariance_weight)) if value != 1.0]
        parts += [f"normalization={c.normalization!r}", f"backend={self.backend!r}",
                  f"precision={self.precision!r}"]
        if self.gather_distributed:
            parts += ["gather_distributed=True", f"shard={self.shard}"]
            if self.uneven_batches:
                parts.append("uneven_batches=True")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.check_finite:
            parts.append("check_finite=True")
        return ", ".join(parts)


class SegmentSoftmax(nn.Module):
    """Module form of :func:`music_loss.segment_softmax` (no clamp by default).

    Example:
        >>> import torch
        >>> from music_loss import SegmentSoftmax
        >>> SegmentSoftmax(segment_dim=4)(torch.zeros(2, 8))[0, :4]
        tensor([0.2500, 0.2500, 0.2500, 0.2500])

    Its hyperparameters are validated on assignment as at construction.
    """

    def __init__(self, segment_dim: int = 80, temperature: float = 1.0, eps: float = 0.0) -> None:
        super().__init__()
        self._config = make_config(segment_dim, temperature, eps)

    @property
    def segment_dim(self) -> int:
        return self._config.segment_dim

    @segment_dim.setter
    def segment_dim(self, value: Any) -> None:
        self._config = make_config(value, self.temperature, self.eps)

    @property
    def temperature(self) -> float:
        return self._config.temperature

    @temperature.setter
    def temperature(self, value: Any) -> None:
        self._config = make_config(self.segment_dim, value, self.eps)

    @property
    def eps(self) -> float:
        return self._config.eps

    @eps.setter
    def eps(self, value: Any) -> None:
        self._config = make_config(self.segment_dim, self.temperature, value)

    def forward(self, z: Tensor) -> Tensor:
        return segment_softmax(z, self.segment_dim, self.temperature, self.eps)

    def extra_repr(self) -> str:
        return f"segment_dim={self.segment_dim}, temperature={self.temperature}, eps={self.eps}"
