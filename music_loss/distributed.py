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

Sharding (SPEC 3, the default under ``gather_distributed=True``): rank ``r`` of ``W`` owns the
rows ``[s0 K, s1 K)`` of ``P`` with ``s0 = r S // W``, ``s1 = (r + 1) S // W`` (whole segments,
balanced; a rank owns none when ``S < W``), computes only their entropy entries and the
matching gradient products, and the gather's backward (a reduce-scatter) sums the ranks'
partial gradients. The W partial entropy sums are all-reduced (2 scalars, detached) for the
value. The equal-size collectives are PyTorch's functional collectives, which
``torch.compile`` traces without a graph break.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

#: The all-gather whose backward is a reduce-scatter (sum): named ``all_gather_single_autograd``
#: since torch 2.14, ``all_gather_tensor_autograd`` before (deprecated from 2.14).
_all_gather_autograd: Any = (getattr(funcol, "all_gather_single_autograd", None)
                             or funcol.all_gather_tensor_autograd)

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
        # Backward: a reduce-scatter (sum over ranks, this rank's rows) in one collective.
        gathered = _all_gather_autograd(x.contiguous(), 0, _group(group))
        return gathered, (rank * n, rank * n + n)
    sizes = _rank_sizes(n, x.device, group)
    start = sum(sizes[:rank])
    return _GatherRows.apply(x, sizes, group), (start, start + sizes[rank])


def _group(group: Any) -> Any:
    """The functional collectives take a process group, never ``None``."""
    return group if group is not None else dist.group.WORLD


def owned_segments(num_segments: int, rank: int, world: int) -> tuple[int, int]:
    """Segments ``[s0, s1)`` whose rows of ``P`` rank ``rank`` of ``world`` owns when sharding.

    Contiguous and balanced (sizes differ by at most one); empty when ``S < W`` leaves this
    rank without one. Every segment is owned by exactly one rank.

    Example:
        >>> [owned_segments(5, r, 3) for r in range(3)]
        [(0, 1), (1, 3), (3, 5)]
        >>> owned_segments(1, 0, 2), owned_segments(1, 1, 2)
        ((0, 0), (0, 1))
    """
    return rank * num_segments // world, (rank + 1) * num_segments // world


def sum_over_ranks(x: Tensor, group: Any = None) -> Tensor:
    """All-reduce (sum) of a small detached tensor, traceable by ``torch.compile``.

    No host sync: the result is a device tensor the caller keeps in the graph. In eager mode
    the collective returns an ``AsyncCollectiveTensor``; it is waited on here (the stream
    waits, not the host) so callers get a plain tensor that ``torch.save`` and ``.numpy()``
    accept.
    """
    out = funcol.all_reduce(x.detach(), "sum", _group(group))
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out
