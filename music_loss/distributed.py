"""Autograd-aware all-gather for ``gather_distributed=True`` (SPEC 3).

The forward pass concatenates every rank's rows; the backward pass sums the incoming
gradients across ranks (each rank's loss depends on every rank's rows through the
joint distribution) and returns this rank's slice, as VICReg's ``FullGatherLayer`` does.

Batch sizes. The default path assumes every rank holds the same number of rows (DDP with
``drop_last=True``, or a ``DistributedSampler``, gives that) and exchanges nothing but the
rows: no size exchange read on the host each step (a stall on GPU and a graph break under
``torch.compile``). That assumption is checked once per (process group, local batch size)
with one small all-gather, cached, and a clear error names the fix when sizes differ.
``uneven=True`` supports different sizes by exchanging them every step (a host sync) and
padding rows to the largest size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: (process group, local rows) pairs whose equal sizes were verified across the group.
_CHECKED_EQUAL: set[tuple[int, int]] = set()


def is_distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_process_group() -> None:
    """Raise a clear error when ``gather_distributed=True`` runs without a process group."""
    if not is_distributed_ready():
        raise ValueError("gather_distributed=True needs an initialised process group; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun), "
                         "or pass gather_distributed=False")


def _rank_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    world = dist.get_world_size(group)
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


def _check_equal_sizes_once(n: int, device: torch.device, group: Any) -> None:
    key = (id(group), n)
    if key in _CHECKED_EQUAL:
        return
    sizes = _rank_sizes(n, device, group)
    if len(set(sizes)) != 1:
        raise ValueError(f"gather_distributed=True: the ranks hold different batch sizes "
                         f"{sizes}; use drop_last=True (or a DistributedSampler) so every rank "
                         "holds the same number of rows, or pass uneven_batches=True "
                         "(exchanges the sizes every step: a host sync)")
    _CHECKED_EQUAL.add(key)


class _GatherEqualRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Sum over ranks and keep this rank's rows in one collective.
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM,
                                   group=ctx.group)
        return out, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], group: Any) -> Tensor:  # type: ignore[override]
        rank = dist.get_rank(group)
        max_n = max(sizes)
        padded = x.new_zeros((max_n, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: Tensor, group: Any = None, *,
                uneven: bool = False) -> tuple[Tensor, tuple[int, int]]:
    """All-gather ``x`` along dim 0 with gradient; also return this rank's ``(start, stop)``.

    Args:
        x: This rank's ``(n, D)`` rows.
        group: Process group (the default group when ``None``).
        uneven: Ranks may hold different ``n`` (sizes exchanged every step, a host sync).
            Otherwise every rank must hold the same ``n``: checked once per ``n`` and group,
            then assumed.

    Returns:
        The concatenated rows in rank order, and the slice of this rank.
    """
    rank = dist.get_rank(group)
    n = x.shape[0]
    if not uneven:
        _check_equal_sizes_once(n, x.device, group)
        return _GatherEqualRows.apply(x, group), (rank * n, rank * n + n)
    sizes = _rank_sizes(n, x.device, group)
    start = sum(sizes[:rank])
    return _GatherRows.apply(x, sizes, group), (start, start + sizes[rank])
