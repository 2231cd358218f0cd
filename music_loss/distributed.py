"""Autograd-aware all-gather for ``gather_distributed=True``, and the per-call agreement
that makes every rank fail together.

The forward pass concatenates every rank's rows; the backward pass sums the incoming
gradients across ranks (each rank's loss depends on every rank's rows through the
joint distribution) and returns this rank's slice, as VICReg's ``FullGatherLayer`` does.

Agreement before the rows move. Every call, on every rank, at the same point, exchanges one
small integer header per rank (an all-gather of 5 int64 values: a local validation error,
the batch size, the feature size, the dtype and, with ``check_finite=True``, a non-finite
flag). Every rank reads the same gathered headers and so raises the same clear error at the
same point when one rank's inputs are bad, when the ranks' sizes differ without
``uneven_batches=True``, or when a rank holds no rows; the rows are gathered only when every
rank agrees. There is no per-rank cache: a rank whose batch size changes (a last partial
batch, an eval loop) can never skip the exchange while another runs it. In eager mode the
header is read on the host (one small synchronisation per call; see the docs for its
measured cost). Under ``torch.compile`` nothing is read on the host: the compiled graph
checks the gathered sizes (and the finite flags) with a device-side assertion
(``torch._assert_async``) before the rows are gathered, and a new batch size recompiles.

Sharding (the default under ``gather_distributed=True``): rank ``r`` of ``W`` owns the
rows ``[s0 K, s1 K)`` of ``P`` with ``s0 = r S // W``, ``s1 = (r + 1) S // W`` (whole segments,
balanced; a rank owns none when ``S < W``), computes only their entropy entries and the
matching gradient products, and the gather's backward (a reduce-scatter) sums the ranks'
partial gradients. The W partial entropy sums are all-reduced (2 scalars, detached) for the
value. The equal-size collectives are PyTorch's functional collectives, which
``torch.compile`` traces without a graph break.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

#: The all-gather whose backward is a reduce-scatter (sum): named ``all_gather_single_autograd``
#: since torch 2.14, ``all_gather_tensor_autograd`` before (deprecated from 2.14).
_all_gather_autograd: Any = (getattr(funcol, "all_gather_single_autograd", None)
                             or funcol.all_gather_tensor_autograd)
#: The same names without gradient, for the functional and the in-place collective.
_all_gather: Any = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_into: Any = (getattr(dist, "all_gather_single", None)
                         or dist.all_gather_into_tensor)

#: dtype codes of the header (index + 1; 0 for anything else).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Header fields, one int64 each.
_ERROR, _ROWS, _DIM, _DTYPE, _NONFINITE = range(5)


def is_distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def check_process_group() -> None:
    """Raise a clear error when ``gather_distributed=True`` runs without a process group."""
    if not is_distributed_ready():
        raise ValueError("gather_distributed=True needs an initialised process group; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun), "
                         "or pass gather_distributed=False")


class Agreement(NamedTuple):
    """What every rank learnt from the header exchange: the ranks' batch sizes, in rank
    order, and this rank's position in the group."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def local_rows(self) -> tuple[int, int]:
        start = sum(self.sizes[: self.rank])
        return start, start + self.sizes[self.rank]


def _nonfinite_flag(z1: Tensor, z2: Tensor) -> Tensor:
    """1 when ``z1`` or ``z2`` holds NaN or inf, as an int64 device tensor (no host read)."""
    finite = torch.isfinite(z1).all() & torch.isfinite(z2).all()
    return (~finite).to(torch.int64).reshape(1)


def agree(
    z1: Tensor,
    z2: Tensor,
    local_error: Exception | None,
    *,
    check_finite: bool,
    uneven: bool,
    group: Any = None,
) -> Agreement:
    """Exchange each rank's header and raise, on every rank alike, what any rank got wrong.

    Called by every rank at the same point of every call, before any other collective.

    Args:
        z1: This rank's first view (its device carries the header).
        z2: This rank's second view.
        local_error: The error this rank's own validation raised, or ``None``: it is raised
            after the exchange, and the other ranks raise a matching error.
        check_finite: Also agree on whether any rank's views hold NaN or inf.
        uneven: Ranks may hold different (non-zero) batch sizes.
        group: Process group (the default group when ``None``).

    Returns:
        The ranks' batch sizes and this rank's index.

    Raises:
        ValueError: On every rank, when any rank's inputs are invalid or non-finite (with
            ``check_finite``), the feature sizes or dtypes differ across ranks, the batch
            sizes differ without ``uneven``, a rank holds no rows, or the global batch is
            below 2.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if torch.compiler.is_compiling():
        return _agree_compiled(z1, z2, check_finite=check_finite, uneven=uneven, rank=rank,
                               world=world, group=group)
    dtype_code = _DTYPES.index(z1.dtype) + 1 if z1.dtype in _DTYPES else 0
    fields = [int(local_error is not None), *_shape(z1), dtype_code]
    header = torch.tensor(fields, dtype=torch.int64, device=z1.device)
    flag = (_nonfinite_flag(z1, z2) if check_finite and local_error is None
            else header.new_zeros(1))
    header = torch.cat([header, flag])
    gathered = torch.empty(world * header.numel(), dtype=torch.int64, device=z1.device)
    _all_gather_into(gathered, header, group=group)
    table: list[list[int]] = gathered.view(world, header.numel()).tolist()  # the host read
    _raise_disagreement(table, local_error, rank, uneven=uneven)
    return Agreement(tuple(row[_ROWS] for row in table), rank)


def _shape(z: Tensor) -> tuple[int, int]:
    return (int(z.shape[0]), int(z.shape[1])) if z.dim() == 2 else (-1, -1)


def _raise_disagreement(table: list[list[int]], local_error: Exception | None, rank: int, *,
                        uneven: bool) -> None:
    def ranks_where(test: Any) -> list[int]:
        return [r for r, row in enumerate(table) if test(row)]

    failed = ranks_where(lambda row: row[_ERROR])
    if failed:
        if local_error is not None:
            raise local_error
        raise ValueError(f"gather_distributed=True: the inputs of rank(s) {failed} are invalid "
                         "(their error names the argument and the fix); every rank stops here")
    dims = [row[_DIM] for row in table]
    dtypes = [_DTYPES[row[_DTYPE] - 1] if row[_DTYPE] else None for row in table]
    if len(set(dims)) > 1 or len(set(dtypes)) > 1:
        raise ValueError(f"gather_distributed=True: the ranks' views differ in feature size "
                         f"{dims} or dtype {[str(d) for d in dtypes]}; every rank must pass "
                         "(n, D) views of the same D and dtype (the same model)")
    nonfinite = ranks_where(lambda row: row[_NONFINITE])
    if nonfinite:
        raise ValueError(f"z1 or z2 contains NaN or inf on rank(s) {nonfinite}; check the "
                         "encoder's output (learning rate, mixed-precision overflow) before "
                         "the loss")
    sizes = [row[_ROWS] for row in table]
    if not uneven and len(set(sizes)) > 1:
        raise ValueError(f"gather_distributed=True: the ranks hold different batch sizes "
                         f"{sizes}; use drop_last=True (or a DistributedSampler) so every rank "
                         "holds the same number of rows, or pass uneven_batches=True")
    empty = ranks_where(lambda row: row[_ROWS] == 0)
    if empty and len(table) > 1:
        raise ValueError(f"gather_distributed=True: rank(s) {empty} hold no rows (batch sizes "
                         f"{sizes}); every rank needs at least 1 row for its invariance term: "
                         "use drop_last=True, or give every rank at least one sample")
    if sum(sizes) < 2:
        raise ValueError(f"the global batch must hold at least 2 samples, got {sum(sizes)} "
                         f"(batch sizes {sizes}); the loss is a statistic of the batch")


def _agree_compiled(z1: Tensor, z2: Tensor, *, check_finite: bool, uneven: bool, rank: int,
                    world: int, group: Any) -> Agreement:
    """The header check inside a compiled graph: device-side assertions, no host read."""
    if uneven:
        raise ValueError("uneven_batches=True reads the ranks' batch sizes on the host at every "
                         "call, which torch.compile cannot trace; compile without it (equal "
                         "batch sizes, drop_last=True) or run the loss eagerly")
    n = z1.shape[0]
    if world == 1:
        if check_finite:
            torch._assert_async(_nonfinite_flag(z1, z2).sum() == 0,
                                "z1 or z2 contains NaN or inf")
        return Agreement((n,), rank)
    flag = _nonfinite_flag(z1, z2) if check_finite else z1.new_zeros(1, dtype=torch.int64)
    header = torch.cat([flag.new_full((1,), n), flag])
    gathered = _all_gather(header, 0, _group(group)).view(world, 2)
    torch._assert_async((gathered[:, 0] == n).all(),
                        "gather_distributed=True: the ranks hold different batch sizes; use "
                        "drop_last=True (or a DistributedSampler)")
    if check_finite:
        torch._assert_async(gathered[:, 1].sum() == 0, "z1 or z2 contains NaN or inf on a rank")
    return Agreement((n,) * world, rank)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...], rank: int, group: Any) -> Tensor:  # type: ignore[override]
        max_n = max(sizes)
        padded = x.new_zeros((max_n, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_agreed(x: Tensor, agreement: Agreement, group: Any = None) -> Tensor:
    """All-gather ``x`` along dim 0 (with gradient when ``x`` requires it), in rank order.

    Args:
        x: This rank's ``(n, D)`` rows.
        agreement: The ranks' batch sizes, from :func:`agree` (called first, on every rank).
        group: Process group (the default group when ``None``).

    Returns:
        The concatenated rows of every rank. Its backward sums the ranks' gradients of the
        gathered rows (a reduce-scatter when the sizes are equal) and returns this rank's.
    """
    sizes = agreement.sizes
    if len(set(sizes)) == 1:
        if not x.requires_grad:
            # A stop-gradient view: a plain gather, no reduce-scatter in the backward.
            out = _all_gather(x.contiguous(), 0, _group(group))
            return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out
        # Backward: a reduce-scatter (sum over ranks, this rank's rows) in one collective.
        gathered: Tensor = _all_gather_autograd(x.contiguous(), 0, _group(group))
        return gathered
    if not x.requires_grad:
        with torch.no_grad():
            return _GatherRows.apply(x, sizes, agreement.rank, group)
    gathered_uneven: Tensor = _GatherRows.apply(x, sizes, agreement.rank, group)
    return gathered_uneven


def gather_rows(x: Tensor, group: Any = None, *,
                uneven: bool = False) -> tuple[Tensor, tuple[int, int]]:
    """All-gather ``x`` along dim 0 with gradient; also return this rank's ``(start, stop)``.

    The ranks first agree on their sizes (:func:`agree`, on every rank at every call), so a
    mismatch raises the same clear error on every rank.

    Args:
        x: This rank's ``(n, D)`` rows.
        group: Process group (the default group when ``None``).
        uneven: Ranks may hold different (non-zero) ``n``; otherwise they must be equal.

    Returns:
        The concatenated rows in rank order, and the slice of this rank.
    """
    agreement = agree(x, x, None, check_finite=False, uneven=uneven, group=group)
    return gather_agreed(x, agreement, group), agreement.local_rows


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
