"""Autograd-aware all-gather for ``gather_distributed=True`` (SPEC 3).

The forward pass concatenates every rank's rows; the backward pass sums the incoming
gradients across ranks (each rank's loss depends on every rank's rows through the
joint distribution) and returns this rank's slice, as VICReg's ``FullGatherLayer`` does.
Per-rank batch sizes may differ: rows are padded to the largest size for the collective
and trimmed afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _rank_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    world = dist.get_world_size(group)
    size = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


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


def gather_rows(x: Tensor, group: Any = None) -> tuple[Tensor, tuple[int, int]]:
    """All-gather ``x`` along dim 0 with gradient; also return this rank's ``(start, stop)``.

    Args:
        x: This rank's ``(n, D)`` rows. Ranks may hold different ``n``.
        group: Process group (the default group when ``None``).

    Returns:
        The concatenated ``(sum n, D)`` rows in rank order, and the slice of this rank.
    """
    sizes = _rank_sizes(x.shape[0], x.device, group)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    return _GatherRows.apply(x, sizes, group), (start, start + sizes[rank])


def is_distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()
