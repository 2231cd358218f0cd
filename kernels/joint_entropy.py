"""Joint distribution + masked entropy, and the two gradient products, never storing ``P``.

Forward (:func:`joint_entropy_kernel`): a tiled matrix product over the batch,
``P[a, b] = sum_i p1[i, a] p2[i, b] / N``, whose epilogue applies the block mask (the
diagonal entries; every entry of the off-diagonal blocks; nothing else), reduces
``P lg P`` over the tile (fp32, a tree) and writes two partial sums per tile. The launcher
adds the partial sums in float64 in a fixed order: deterministic, no atomics.

Backward, Liger style (gradients computed during the forward, chunk by chunk): for a chunk of
rows ``a0:a1`` of ``P`` the same kernel also writes
``G[a0:a1, :] = c_off * (lg P + [P >= tiny])`` on the off blocks (0 elsewhere) into a
bounded workspace, then :func:`scaled_matmul_kernel` forms ``dp1[:, a0:a1] = p2 G^T / N`` and
``dp2 += p1[:, a0:a1] G / N``. Three ``N x D x D`` products in all (6 N D^2 FLOPs, the
minimum of SPEC 1); recomputing ``P`` in the backward (flash-attention style) would cost a
fourth. The diagonal entries' gradient is elementwise (``dp1[i, a] = G_aa p2[i, a] / N``), so
only ``P``'s diagonal (``D`` floats) is kept for it.

Workspace bound (beyond the ``O(N D)`` arrays ``p1, p2`` and ``dp1, dp2``)::

    chunk_rows * D * (4 bytes, or 2 in bf16 mode)      the G chunk (tf32: twice, G^T too)
  + 2 * 4 * ceil(chunk_rows / 16) * ceil(D / 16)        per-tile partial sums
  + 4 * D                                               diag(P)

with ``chunk_rows`` (:func:`chunk_rows_for`) the batch ``N`` rounded up to a multiple of 128,
or more where a 32 MiB (:data:`WORKSPACE_BYTES`) G chunk holds more rows: the products'
gradient traffic then falls with the batch (each chunk re-reads an ``(N, D)`` operand and
read-modify-writes ``dp2``), while the G chunk stays no larger than one ``(N, D)`` operand
array (tf32: two). At the paper's shape (N=2048, D=8160, K=80): 4 chunks of 2048 rows (the
32 MiB rule alone gave 8 of 1024 in ieee/tf32), a workspace of 67,401,600 bytes (bf16:
33,978,240; tf32: 134,248,320 with the ``G^T`` chunk) against 266,342,400 = 4 D^2 for a
single fp32 ``P``, 14 Triton launches per step instead of 26, and 1.93 GB of compulsory
gradient-phase traffic in tf32 instead of 2.74 (:func:`gradient_phase_bytes`). As D grows
the chunk keeps N rows (``O(N D)``), never ``D^2``. Add the ``O(N D)`` arrays: ``p1, p2``
(133,693,440 bytes in fp32, half in bf16, freed after the forward) and the saved
``dp1, dp2`` (133,693,440): 334,788,480 bytes in all (ieee), 234,518,400 (bf16); see
:func:`music_loss.kernels.ops.fused_memory_bytes`. ``chunk_size`` (``MUSICLoss``) trades
the traffic back for memory.

tf32 layouts: Hopper's tf32 ``wgmma`` takes only K-major operands (contiguous along the
reduced dimension), so in tf32 mode the joint product reads ``p1, p2`` transposed, ``(D, N)``
contiguous, written by the softmax kernel next to ``p1, p2`` (133,693,440 bytes more at the
paper's shape, freed after the forward), and ``dp2 = p1 G`` reads ``G^T``, written by the
joint kernel next to ``G`` (66,846,720 bytes more): 535,328,640 bytes in all. ieee and bf16
(16-bit ``wgmma`` takes either major order) keep the row-major operands.

TMA (opt-in, ``MUSIC_LOSS_TMA=1``): on sm_90 the joint product's operand tiles and the two
gradient products' tiles can move through host-side tensor descriptors (``USE_TMA`` of
:func:`joint_entropy_kernel`, :func:`scaled_matmul_tma_kernel`: Hopper's bulk tensor copies,
edges zero-filled, the same tiles and configs) where the installed Triton has them (3.4 and
newer) and the operands meet TMA's layout rules (16-byte aligned base and row strides);
anything else takes the pointer kernels. Not the default: it has not run on a GPU.

Why Liger style rather than recomputing ``P`` in the backward: at the paper's shape the
recomputation is a fourth ``N x D x D`` product, 2 N D^2 = 273 GFLOP more per step (+33%),
while keeping the gradient costs the saved ``dp1, dp2``: 134 MB, ``O(N D)``, half of one
``P``. Without gradients (evaluation, ``torch.no_grad``) the forward skips ``G`` and the
two products and costs one product.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from music_loss.kernels._common import (
    INTERPRET,
    TINY_F32,
    check_precision,
    device_of,
    dot_acc,
    emulate_bf16,
    emulate_tf32,
    launch,
    lg,
    lg_fast,
    needs_int64,
    operand_dtype,
    round_to_bf16,
    round_to_tf32,
)

#: Bytes of the ``G`` chunk workspace the launcher aims for (rounded to 128-row chunks).
WORKSPACE_BYTES = 32 * 2**20
#: Chunks hold a multiple of this many rows of ``P`` (the largest tile edge).
CHUNK_MULTIPLE = 128
#: Smallest tile edge of any config: sizes the partial-sum buffers.
MIN_TILE = 16

#: Per-block shared memory limits (opt-in, bytes) of the architectures the configs are
#: filtered for (and the AOT check compiles for): sm_80 163 KiB, sm_90 227 KiB.
SMEM_LIMITS: dict[int, int] = {80: 163 * 1024, 90: 227 * 1024}
#: Shared memory kept for the epilogue's scratch (layout conversions, reductions).
EPILOGUE_SMEM = 16 * 1024


def _operand_smem(block_m: int, block_n: int, block_k: int, stages: int, itemsize: int) -> int:
    """Shared memory of the pipelined operand tiles with ``itemsize``-byte operands."""
    return (block_m + block_n) * block_k * itemsize * stages


def _tile(config: triton.Config) -> tuple[int, int, int]:
    """``(rows, columns, depth)`` of a joint or product config's tile."""
    kw = config.kwargs
    if "BLOCK_A" in kw:
        return kw["BLOCK_A"], kw["BLOCK_B"], kw["BLOCK_N"]
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]


#: Operand bytes on a GPU per precision mode (``operand_dtype`` is fp32 for emulated bf16).
OPERAND_BYTES: dict[str, int] = {"ieee": 4, "tf32": 4, "bf16": 2}


def config_smem(config: triton.Config, precision: str) -> int:
    """Operand staging of ``config`` in ``precision`` on a GPU (4-byte operands, 2 in bf16)."""
    return _operand_smem(*_tile(config), config.num_stages, OPERAND_BYTES[precision])


#: The deepest staging any candidate may use: 2-byte operands on sm_90.
_MAX_STAGING = max(SMEM_LIMITS.values()) - EPILOGUE_SMEM

#: Autotune configs of the joint kernel (the union over architectures and precisions;
#: :func:`configs_for` picks those of one). Tiles of 32 fp32 accumulators per thread (64x64
#: with 4 warps, 128x64 and 64x128 with 8) and of 64 (64x128 with 4 warps: one warpgroup
#: issuing Hopper's m64n128 ``wgmma``; 128x128 with 8: two of them). The epilogue (masks, a
#: log, reductions, the G store) holds the accumulator plus same-shaped temporaries: with
#: 64 per thread ptxas -v reports up to 255 registers and no spills in every mode, both
#: archs, triton 3.6 and 3.8 (``python -m music_loss.kernels.aot`` fails on a spill in a
#: loop, or on more than 64 bytes outside one); 128 per thread would not fit. Each tile goes
#: deeper along the batch (``BLOCK_N`` 128, or 4 stages at 64) where the staging fits; the
#: wide tiles take the two shallower depths only (each config costs the first step an
#: autotuning run and a compile per key). The 32-per-thread tiles come first:
#: deterministic mode pins a mode's first config.
JOINT_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_A": ba, "BLOCK_B": bb, "BLOCK_N": bn, "GROUP_A": 8,
                   "WIDE_TILE": wide}, num_warps=warps, num_stages=stages)
    for ba, bb, warps in ((64, 64, 4), (128, 64, 8), (64, 128, 8), (64, 128, 4), (128, 128, 8))
    for wide in (ba * bb > 32 * 32 * warps,)
    for bn, stages in ((32, 4), (64, 3)) + (() if wide else ((64, 4), (128, 3)))
    if _operand_smem(ba, bb, bn, stages, 2) <= _MAX_STAGING
]

#: Autotune configs of the gradient products: a plain epilogue, so up to 64 accumulators
#: per thread (ptxas -v, sm_90: 128 and more spill); deeper K steps where they fit.
MATMUL_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=warps, num_stages=stages)
    for bm, bn, warps in ((64, 64, 4), (64, 128, 4), (128, 128, 8))
    for bk, stages in ((32, 4), (64, 3), (64, 4), (128, 3))
    if _operand_smem(bm, bn, bk, stages, 2) <= _MAX_STAGING
    and (bm, bn, bk) != (64, 64, 32)  # too little work per K step to hide latency
]


def device_smem_limit() -> int:
    """The current CUDA device's per-block (opt-in) shared memory; sm_80's without CUDA."""
    if torch.cuda.is_available() and not INTERPRET:  # what Triton checks launches against
        props: Any = triton.runtime.driver.active.utils.get_device_properties(
            torch.cuda.current_device())
        return int(props["max_shared_mem"])
    return SMEM_LIMITS[80]


def configs_for(configs: list[triton.Config], precision: str,
                smem_limit: int | None = None) -> list[triton.Config]:
    """The configs a precision mode autotunes over on a device with ``smem_limit`` bytes of
    shared memory per block (default: the current device's).

    The operand staging (real element size: 4 bytes, 2 in bf16) plus
    :data:`EPILOGUE_SMEM` must fit the limit. ``ieee`` runs on FMA units, where the
    operand tiles are spread over registers: on sm_80 (ptxas -v, see ``python -m
    music_loss.kernels.aot``) every config with a 64-deep K step, and the joint kernel with
    4 warps, spilled (84 to 9304 bytes); those are dropped for it.

    Example:
        >>> len(configs_for(JOINT_CONFIGS, "bf16", SMEM_LIMITS[90])) > len(
        ...     configs_for(JOINT_CONFIGS, "tf32", SMEM_LIMITS[80]))
        True
    """
    limit = device_smem_limit() if smem_limit is None else smem_limit
    fitting = [c for c in configs if config_smem(c, precision) <= limit - EPILOGUE_SMEM]
    if precision != "ieee":
        return fitting
    return [c for c in fitting if _tile(c)[2] == 32 and ("BLOCK_A" not in c.kwargs
                                                         or c.num_warps == 8)]


def _prune(configs: list[triton.Config], named_args: dict[str, Any],
           **kwargs: Any) -> list[triton.Config]:
    precision = kwargs.get("PRECISION", named_args.get("PRECISION", "tf32"))
    return configs_for(configs, precision) or list(configs)


#: Configs used under the interpreter (and by tests that pin one): few, large programs.
INTERPRET_JOINT_META: dict[str, int] = {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_N": 32,
                                        "GROUP_A": 4}
INTERPRET_MATMUL_META: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
                                         "GROUP_M": 4}


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP: tl.constexpr):
    """Program id -> (tile row, tile column), walking GROUP tile rows at a time (L2 reuse)."""
    per_group = GROUP * num_n
    group = pid // per_group
    first_m = group * GROUP
    group_rows = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def joint_entropy_kernel(
    p1_ptr, p2_ptr, g_ptr, gt_ptr, pdiag_ptr, partial_ptr,
    N, D, K, row_begin, num_rows, stride_p1n, stride_p1a, stride_p2n, stride_p2b, stride_g,
    stride_gt, stride_partial, inv_n, c_off,
    WRITE_G: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_A: tl.constexpr, EMULATE_TF32: tl.constexpr = False, ROUND_TF32: tl.constexpr = True,
    WRITE_GT: tl.constexpr = False, USE_INT64: tl.constexpr = False,
    FAST_LOG: tl.constexpr = True, USE_TMA: tl.constexpr = False,
    WIDE_TILE: tl.constexpr = False,
):
    """One ``[BLOCK_A, BLOCK_B]`` tile of rows ``row_begin + [0, num_rows)`` of ``P``.

    Writes ``partial[0, pid] = sum P lg P`` over the tile's diagonal entries and
    ``partial[1, pid]`` over its off-block entries, ``pdiag[a] = P[a, a]``, and (``WRITE_G``)
    ``G[a - row_begin, b] = c_off (lg P + [P >= tiny])`` on off blocks, 0 elsewhere (an
    operand of the tf32 products: stored rounded to nearest tf32 there, ``ROUND_TF32``);
    ``WRITE_GT``: also ``G^T`` (``gt[b, a - row_begin]``), the K-major operand of ``dp2``.
    ``FAST_LOG`` (tf32/bf16 only; ieee always takes the accurate log): ``lg2.approx.f32``.
    ``USE_TMA``: ``p1_ptr, p2_ptr`` are tensor descriptors of the operands (the strides are
    then unused), read with TMA bulk copies; the epilogue's stores keep pointers.
    ``WIDE_TILE`` (set by the autotune configs): 64 accumulators per thread, which with
    ``WRITE_GT`` keeps the general epilogue on every tile (see the epilogue's comment).

    The operands are read through both strides: ``p[n, a]`` at ``n * stride_p1n + a *
    stride_p1a``. Row-major ``(N, D)`` arrays (ieee, bf16) or their ``(D, N)`` transposes
    (tf32): Hopper's tf32 ``wgmma`` takes only K-major (batch-contiguous) operands, read from
    the transposes with 16-byte copies. Pointer increments along the batch are 64-bit and
    ``USE_INT64`` widens the column offsets (``D * N >= 2**31`` in the transposed layout).
    """
    pid = tl.program_id(0)
    num_a = tl.cdiv(num_rows, BLOCK_A)
    num_b = tl.cdiv(D, BLOCK_B)
    pid_a, pid_b = _grouped_tile(pid, num_a, num_b, GROUP_A)
    local_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_a = row_begin + local_a
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = tl.arange(0, BLOCK_N)
    mask_a = local_a < num_rows
    mask_b = offs_b < D
    cols_a = offs_a
    cols_b = offs_b
    if USE_INT64:
        cols_a = cols_a.to(tl.int64)
        cols_b = cols_b.to(tl.int64)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    if USE_TMA:  # p1_ptr, p2_ptr are tensor descriptors (bulk copies; edges zero-filled)
        a_start = row_begin + pid_a * BLOCK_A
        b_start = pid_b * BLOCK_B
        for n0 in range(0, N, BLOCK_N):
            if PRECISION == "tf32":  # the (D, N) transposes: K-major tiles
                a = p1_ptr.load([a_start, n0])
                b = p2_ptr.load([b_start, n0]).T
            else:
                a = p1_ptr.load([n0, a_start]).T
                b = p2_ptr.load([n0, b_start])
            acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
    else:
        a_ptrs = p1_ptr + cols_a[:, None] * stride_p1a + offs_n[None, :] * stride_p1n
        b_ptrs = p2_ptr + offs_n[:, None] * stride_p2n + cols_b[None, :] * stride_p2b
        for n0 in range(0, N, BLOCK_N):
            mask_n = offs_n < N - n0
            a = tl.load(a_ptrs, mask=mask_a[:, None] & mask_n[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_b[None, :], other=0.0)
            acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
            a_ptrs += BLOCK_N * stride_p1n
            b_ptrs += BLOCK_N * stride_p2n

    # Epilogue. Only a tile whose segment ranges meet (it touches the block diagonal; see
    # :func:`block_diagonal_tile_fraction`) needs the segment masks, the diagonal sum and
    # P's diagonal: a uniform branch on the tile, the whole epilogue on each side (only the
    # accumulator is live across it), every other tile taking its valid entries as
    # off-block. Tensor-core modes only, and not where a wide tile (64 accumulators per
    # thread) also writes G^T: with the branch, ptxas -v spilled 4-32 bytes in both (G^T's
    # transposing store; ieee's FMA operand tiles, whose product dwarfs the epilogue
    # anyway), so every tile runs the general epilogue there.
    valid = mask_a[:, None] & mask_b[None, :]
    a_first = row_begin + pid_a * BLOCK_A
    b_first = pid_b * BLOCK_B
    row_has_diag = mask_a & (offs_a >= b_first) & (offs_a < b_first + BLOCK_B) & (offs_a < D)
    meets_blocks = True
    if PRECISION != "ieee" and not (WIDE_TILE and WRITE_GT):
        meets_blocks = ((a_first // K <= (b_first + BLOCK_B - 1) // K)
                        & (b_first // K <= (a_first + BLOCK_A - 1) // K))
    if meets_blocks:
        _joint_epilogue(acc, valid, row_has_diag, offs_a, offs_b, local_a, cols_b, K, inv_n,
                        c_off, pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr, gt_ptr,
                        stride_g, stride_gt, True, WRITE_G, WRITE_GT, PRECISION, FAST_LOG,
                        EMULATE_BF16, EMULATE_TF32, ROUND_TF32)
    else:
        _joint_epilogue(acc, valid, row_has_diag, offs_a, offs_b, local_a, cols_b, K, inv_n,
                        c_off, pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr, gt_ptr,
                        stride_g, stride_gt, False, WRITE_G, WRITE_GT, PRECISION, FAST_LOG,
                        EMULATE_BF16, EMULATE_TF32, ROUND_TF32)


@triton.jit
def _epilogue_log(x, PRECISION: tl.constexpr, FAST_LOG: tl.constexpr, EMULATE: tl.constexpr):
    """The epilogue's ``lg``: libdevice's accurate log in ieee mode (or ``FAST_LOG=False``),
    else the special-function unit's (:func:`lg_fast`), whose few ulps are far inside the
    tf32 / bf16 budgets."""
    if PRECISION == "ieee" or not FAST_LOG:
        return lg(x)
    else:
        return lg_fast(x, EMULATE)


@triton.jit
def _joint_epilogue(acc, valid, row_has_diag, offs_a, offs_b, local_a, cols_b, K, inv_n,
                    c_off, pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr, gt_ptr,
                    stride_g, stride_gt,
                    MEETS_BLOCKS: tl.constexpr, WRITE_G: tl.constexpr, WRITE_GT: tl.constexpr,
                    PRECISION: tl.constexpr, FAST_LOG: tl.constexpr,
                    EMULATE_BF16: tl.constexpr, EMULATE_TF32: tl.constexpr,
                    ROUND_TF32: tl.constexpr):
    """The joint kernel's epilogue of one tile, fp32: ``P lg P`` reduced to the tile's two
    partial sums, and the tile of ``G = c_off (lg P + [P >= tiny])`` (``WRITE_G``; rounded
    as its store will be: to nearest tf32 for the tf32 products, or to bf16 under the
    interpreter, as a GPU store does) and of ``G^T`` (``WRITE_GT``). ``MEETS_BLOCKS``: the
    tile touches the block diagonal, so entries are classed by segment (diagonal / off-block
    / neither) and ``P``'s diagonal is stored; else every valid entry is off-block."""
    joint = acc * inv_n
    if MEETS_BLOCKS:
        is_diag = (offs_a[:, None] == offs_b[None, :]) & valid
        is_off = ((offs_a // K)[:, None] != (offs_b // K)[None, :]) & valid
    else:
        is_off = valid
    log_joint = _epilogue_log(joint, PRECISION, FAST_LOG, EMULATE_TF32 or EMULATE_BF16)
    plogp = joint * log_joint
    if MEETS_BLOCKS:
        # P's diagonal by rows (each row's one diagonal entry, where the tile holds it): a
        # row vector to store and take P lg P of, not a masked store of every entry.
        p_diag = tl.sum(tl.where(is_diag, joint, 0.0), axis=1)
        log_diag = _epilogue_log(p_diag, PRECISION, FAST_LOG, EMULATE_TF32 or EMULATE_BF16)
        diag_sum = tl.sum(tl.where(row_has_diag, p_diag * log_diag, 0.0), axis=0)
        tl.store(pdiag_ptr + offs_a, p_diag, mask=row_has_diag)
    else:
        diag_sum = 0.0
    off_sum = tl.sum(tl.sum(tl.where(is_off, plogp, 0.0), axis=1), axis=0)
    tl.store(partial_ptr + pid, diag_sum)
    tl.store(partial_ptr + stride_partial + pid, off_sum)
    if WRITE_G:
        grad = c_off * (log_joint + tl.where(joint >= 1.1754943508222875e-38, 1.0, 0.0))
        if MEETS_BLOCKS:  # elsewhere only invalid entries are not off-block: never stored
            grad = tl.where(is_off, grad, 0.0)
        if PRECISION == "bf16" and EMULATE_BF16:
            grad = round_to_bf16(grad)
        if PRECISION == "tf32" and ROUND_TF32:
            grad = round_to_tf32(grad, EMULATE_TF32)
        tl.store(g_ptr + local_a[:, None] * stride_g + offs_b[None, :], grad, mask=valid)
        if WRITE_GT:
            tl.store(gt_ptr + cols_b[None, :] * stride_gt + local_a[:, None], grad,
                     mask=valid)


@triton.jit
def scaled_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, alpha,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EMULATE_TF32: tl.constexpr = False,
):
    """``C = alpha * A @ B`` (``+ C`` when ``ACCUMULATE``), fp32 accumulate and store.

    Any strides (the launcher passes transposes as strides). ``USE_INT64`` widens row
    offsets (``M`` is the batch: ``M * stride_am`` may pass ``2**31``).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m
    if USE_INT64:
        rows = rows.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * alpha
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask_c, other=0.0)
    tl.store(c_ptrs, acc, mask=mask_c)


@triton.jit
def scaled_matmul_tma_kernel(
    a_desc, b_desc, c_desc, c_ptr, M, N, K, alpha,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EMULATE_TF32: tl.constexpr = False,
):
    """:func:`scaled_matmul_kernel` with TMA: operand tiles and the output tile move through
    tensor descriptors (Hopper's bulk tensor copies; out-of-bounds reads are zero-filled and
    stores clipped by the hardware, so no masks). ``B_KMAJOR``: ``b_desc`` describes ``B^T``,
    ``(N, K)`` contiguous along K (tf32's K-major operand), read as ``[BLOCK_N, BLOCK_K]``
    tiles. ``c_ptr`` is the output's storage, only named for the autotuner's restore."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k0])
        if B_KMAJOR:
            b = b_desc.load([off_n, k0]).T
        else:
            b = b_desc.load([k0, off_n])
        acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
    acc = acc * alpha
    if ACCUMULATE:
        acc += c_desc.load([off_m, off_n])
    c_desc.store([off_m, off_n], acc)


# The GPU launchers autotune; the raw kernels above are what the interpreter and the AOT
# check (music_loss.kernels.aot) use.
_joint_autotuned: Any = None if INTERPRET else triton.autotune(
    configs=JOINT_CONFIGS, key=["N", "D", "num_rows", "PRECISION", "WRITE_G", "FAST_LOG"],
    prune_configs_by={"early_config_prune": _prune},
)(joint_entropy_kernel)


def _joint_tma_block_shapes(nargs: dict[str, Any]) -> None:
    """Config pre-hook of the TMA joint kernel: descriptor tiles of the config being run."""
    ba, bb, bn = nargs["BLOCK_A"], nargs["BLOCK_B"], nargs["BLOCK_N"]
    k_major = nargs["PRECISION"] == "tf32"
    nargs["p1_ptr"].block_shape = [ba, bn] if k_major else [bn, ba]
    nargs["p2_ptr"].block_shape = [bb, bn] if k_major else [bn, bb]


_joint_tma_autotuned: Any = None if INTERPRET else triton.autotune(
    configs=[triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                           pre_hook=_joint_tma_block_shapes) for c in JOINT_CONFIGS],
    key=["N", "D", "num_rows", "PRECISION", "WRITE_G", "FAST_LOG"],
    prune_configs_by={"early_config_prune": _prune},
)(joint_entropy_kernel)


def _matmul_autotuner(restore_output: bool) -> Any:
    # The strides are in the key: the same sizes with transposed operands (dp1's NT layout
    # against dp2's) are different kernels for the memory system. An accumulating product
    # (``dp2 +=``) needs its output restored between the benchmark runs of its configs, and
    # the copy is timed with each run: only that variant pays for it.
    return triton.autotune(
        configs=MATMUL_CONFIGS, key=["M", "N", "K", "PRECISION", "stride_am", "stride_ak",
                                     "stride_bk", "stride_bn"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["c_ptr"] if restore_output else None,
    )(scaled_matmul_kernel)


_matmul_store: Any = None if INTERPRET else _matmul_autotuner(restore_output=False)
_matmul_accumulate: Any = None if INTERPRET else _matmul_autotuner(restore_output=True)


def _tma_block_shapes(nargs: dict[str, Any]) -> None:
    """Config pre-hook: give the descriptors the tile shapes of the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_KMAJOR"] else [bk, bn]
    nargs["c_desc"].block_shape = [bm, bn]


def _tma_autotuner(restore_output: bool) -> Any:
    configs = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                             pre_hook=_tma_block_shapes) for c in MATMUL_CONFIGS]
    return triton.autotune(
        configs=configs, key=["M", "N", "K", "PRECISION", "B_KMAJOR"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["c_ptr"] if restore_output else None,
    )(scaled_matmul_tma_kernel)


_tma_store: Any = None if INTERPRET else _tma_autotuner(restore_output=False)
_tma_accumulate: Any = None if INTERPRET else _tma_autotuner(restore_output=True)


def chosen_configs(precision: str | None = None) -> dict[str, list[str]]:
    """The configs the GPU autotuners have picked so far, per tuner: ``str(config)`` of each
    tuning key's choice (keys of ``precision`` only, when given). Empty under the
    interpreter, which does not autotune. ``python -m music_loss.kernels.profile`` records
    it, so a GPU run shows which tiles win on its card.

    Example:
        >>> isinstance(chosen_configs("tf32"), dict)
        True
    """
    tuners = {"joint": _joint_autotuned, "joint_tma": _joint_tma_autotuned,
              "product": _matmul_store, "product_accumulate": _matmul_accumulate,
              "product_tma": _tma_store, "product_tma_accumulate": _tma_accumulate}
    chosen = {}
    for name, tuner in tuners.items():
        picks = sorted({str(config) for key, config in getattr(tuner, "cache", {}).items()
                        if precision is None or precision in key})
        if picks:
            chosen[name] = picks
    return chosen


def tma_available() -> bool:
    """True when this Triton has host-side tensor descriptors (triton >= 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # pragma: no cover - older Triton: the pointer kernels
        return False
    return True


def use_tma(device: torch.device, precision: str) -> bool:
    """Whether the gradient products go through TMA descriptors here.

    Only tensor-core modes on sm_90 or newer (TMA is Hopper's), with a Triton that has
    descriptors, and only when asked (``MUSIC_LOSS_TMA=1``; under the interpreter too, which
    emulates descriptors): the path compiles for sm_90 (``python -m
    music_loss.kernels.aot``) and matches the reference in the interpreter, but has not run
    on a GPU yet, so the pointer kernels stay the default until ``make gpu-validate`` has
    timed both.
    """
    if precision == "ieee" or os.environ.get("MUSIC_LOSS_TMA", "0") in ("", "0"):
        return False
    if not tma_available():
        return False
    if INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ready(*tensors: Tensor) -> bool:
    """TMA's layout rules: unit last stride, 16-byte aligned base and other strides."""
    for t in tensors:
        item = t.element_size()
        if t.stride(-1) != 1 or (t.data_ptr() % 16) or any((st * item) % 16
                                                            for st in t.stride()[:-1]):
            return False
    return True


def _matmul_tma(a: Tensor, b: Tensor, c: Tensor, alpha: float, accumulate: bool,
                precision: str, meta: dict[str, Any] | None) -> bool:
    """``c (+)= alpha * a @ b`` through TMA descriptors; False (nothing launched) when an
    operand breaks TMA's layout rules, for the pointer kernel to take over."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b_kmajor = b.stride(0) == 1 and b.stride(1) != 1  # B^T is contiguous along K
    b_stored = b.T if b_kmajor else b
    if not _tma_ready(a, b_stored, c):
        return False
    m, k = a.shape
    n = b.shape[1]
    placeholder = [16, 16]  # set per config (the pre-hook, or below for a pinned config)
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), placeholder)
    b_desc = TensorDescriptor(b_stored, list(b_stored.shape), list(b_stored.stride()),
                              placeholder)
    c_desc = TensorDescriptor(c, list(c.shape), list(c.stride()), placeholder)
    args = (a_desc, b_desc, c_desc, c, m, n, k, alpha)
    kwargs = {"ACCUMULATE": accumulate, "PRECISION": precision,
              "EMULATE_BF16": emulate_bf16(), "B_KMAJOR": b_kmajor,
              "EMULATE_TF32": emulate_tf32()}
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    if meta is not None or INTERPRET:
        fixed = dict(meta or INTERPRET_MATMUL_META)
        _tma_block_shapes({"a_desc": a_desc, "b_desc": b_desc, "c_desc": c_desc,
                           "B_KMAJOR": b_kmajor, **fixed})
    launch(_tma_accumulate if accumulate else _tma_store, scaled_matmul_tma_kernel, grid,
           None if meta is None and not INTERPRET else fixed, *args, **kwargs)
    return True


def chunk_rows_for(dim: int, precision: str, n: int | None = None,
                   workspace_bytes: int = WORKSPACE_BYTES) -> int:
    """Rows of ``P`` per chunk: a multiple of 128, the larger of two sizes (at most ``D``).

    * the rows whose ``G`` chunk fits ``workspace_bytes`` (32 MiB): a floor that keeps
      chunks few at small batches;
    * the batch ``n`` rounded up to 128 (:data:`CHUNK_MULTIPLE`): every chunk re-reads an
      ``(N, D)`` operand for ``dp1`` and read-modify-writes the fp32 ``dp2``, about
      ``12 N D`` bytes a chunk, ``(D / rows) 12 N D`` a step against the products'
      ``4 N D^2`` FLOPs: ``3 / rows`` bytes per FLOP. With ``rows >= N`` that is at most
      ``3 / N`` (plus ``G``'s own store and reads, ``D^2`` entries whatever the chunking:
      ``op / N`` with ``op`` = 4 bytes, 2 in bf16, twice that in tf32 with ``G^T``), so the
      gradient traffic per FLOP falls as the batch grows instead of growing as
      ``N D^3``; the ``G`` chunk stays no larger than one ``(N, D)`` operand array (tf32:
      two), ``O(N D)``. See :func:`gradient_phase_bytes`.

    Example:
        >>> chunk_rows_for(8160, "tf32"), chunk_rows_for(8160, "tf32", n=2048)
        (1024, 2048)
    """
    bytes_per_row = dim * operand_dtype(precision).itemsize
    rows = max(CHUNK_MULTIPLE, workspace_bytes // bytes_per_row // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
    if n is not None:
        rows = max(rows, triton.cdiv(n, CHUNK_MULTIPLE) * CHUNK_MULTIPLE)
    return min(rows, triton.cdiv(dim, CHUNK_MULTIPLE) * CHUNK_MULTIPLE)


def workspace_bytes(dim: int, precision: str, chunk_rows: int | None = None,
                    n: int | None = None) -> int:
    """Upper bound of the joint pass's workspace in bytes, beyond the ``O(N D)`` arrays
    (``chunk_rows`` default: :func:`chunk_rows_for` for a batch of ``n``).

    Example:
        >>> workspace_bytes(8160, "tf32", n=2048) <= 2 * (2048 * 8160 * 4) + 2**20
        True
    """
    rows = min(chunk_rows or chunk_rows_for(dim, precision, n), dim)
    # tf32: G^T too (dp2's K-major operand), as large as the G chunk.
    g_chunk = rows * dim * operand_dtype(precision).itemsize * (2 if precision == "tf32" else 1)
    partials = 2 * 4 * triton.cdiv(rows, MIN_TILE) * triton.cdiv(dim, MIN_TILE)
    return g_chunk + partials + 4 * dim


def launches_per_step(dim: int, precision: str, chunk_rows: int | None = None,
                      n: int | None = None) -> int:
    """Triton launches of one forward+backward of the fused loss (gradients needed): the
    softmax forward, per chunk of rows of ``P`` the joint kernel and the two gradient
    products, and the backward kernel (ATen's small ops, e.g. the partial sums, not counted).

    Example:
        >>> launches_per_step(8160, "tf32", n=2048)  # 4 chunks of 2048 rows (was 8 of 1024)
        14
    """
    rows = chunk_rows or chunk_rows_for(dim, precision, n)
    return 2 + 3 * triton.cdiv(dim, rows)


def gradient_phase_bytes(n: int, dim: int, precision: str, chunk_rows: int | None = None) -> int:
    """Compulsory global-memory bytes of the gradient phase of one step: per chunk, the ``G``
    store, and each product reading its operands once and writing its output once (``dp2``
    read-modify-written from the second chunk on). Tile re-reads (served by L2 or not) are
    not counted: a lower bound of the traffic, from the launch plan, not a measurement.

    Example:
        >>> round(gradient_phase_bytes(2048, 8160, "tf32") / 1e9, 2)  # 2.74 with 1024 rows
        1.93
    """
    rows = chunk_rows or chunk_rows_for(dim, precision, n)
    op = operand_dtype(precision).itemsize
    total = 0
    for a0 in range(0, dim, rows):
        r = min(rows, dim - a0)
        total += r * dim * op * (2 if precision == "tf32" else 1)  # G (and G^T) written
        total += n * dim * op + r * dim * op + n * r * 4        # dp1[:, a0:a1] = p2 G^T / N
        total += n * r * op + r * dim * op + n * dim * 4 * (2 if a0 else 1)  # dp2 (+)= p1 G
    return total


def block_diagonal_tile_fraction(dim: int, segment_dim: int, block_a: int,
                                 block_b: int) -> float:
    """Fraction of the joint kernel's ``block_a x block_b`` tiles over a ``D x D`` pass whose
    segment ranges meet: they touch the block diagonal and run the general epilogue (segment
    masks, the diagonal sum, ``P``'s diagonal); the others take every valid entry as
    off-block (see :func:`joint_entropy_kernel`).

    Example:
        >>> round(block_diagonal_tile_fraction(8160, 80, 128, 128), 3)  # the paper's shape
        0.041
    """
    def meets(a: int, b: int) -> bool:
        return (a // segment_dim <= (b + block_b - 1) // segment_dim
                and b // segment_dim <= (a + block_a - 1) // segment_dim)

    tiles = [(a, b) for a in range(0, dim, block_a) for b in range(0, dim, block_b)]
    return sum(meets(a, b) for a, b in tiles) / len(tiles)


class JointPass(NamedTuple):
    """Result of :func:`joint_entropy_pass`.

    Attributes:
        h_diag: float64 scalar ``sum_a P_aa lg P_aa``.
        h_off: float64 scalar ``sum_{off blocks} P lg P``.
        p_diag: fp32 ``(D,)``, the diagonal of ``P``.
        dp1: fp32 ``(N, D)`` ``c_off p2 G^T / N`` (off blocks only), or an empty tensor.
        dp2: fp32 ``(N, D)`` ``c_off p1 G / N``, or an empty tensor.
    """

    h_diag: Tensor
    h_off: Tensor
    p_diag: Tensor
    dp1: Tensor
    dp2: Tensor


def _meta_of(config: triton.Config) -> dict[str, Any]:
    """A config as the fixed meta-parameters :func:`launch` takes."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _matmul(a: Tensor, b: Tensor, c: Tensor, alpha: float, accumulate: bool, precision: str,
            meta: dict[str, Any] | None) -> None:
    """``c (+)= alpha * a @ b`` with the Triton product (``c`` fp32, any strides): through
    TMA descriptors where :func:`use_tma` says so and the layouts allow, else pointers."""
    if use_tma(a.device, precision) and _matmul_tma(a, b, c, alpha, accumulate, precision,
                                                    meta):
        return
    m, k = a.shape
    n = b.shape[1]
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    tuner = _matmul_accumulate if accumulate else _matmul_store
    launch(tuner, scaled_matmul_kernel, grid, meta,
           a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
           c.stride(0), c.stride(1), alpha,
           ACCUMULATE=accumulate, PRECISION=precision, EMULATE_BF16=emulate_bf16(),
           USE_INT64=needs_int64(a, b, c), EMULATE_TF32=emulate_tf32())


def joint_entropy_pass(
    p1: Tensor, p2: Tensor, segment_dim: int, c_off: float, precision: str,
    write_grad: bool, chunk_rows: int | None = None,
    joint_meta: dict[str, Any] | None = None, matmul_meta: dict[str, Any] | None = None,
    round_tf32: bool = True, p1_t: Tensor | None = None, p2_t: Tensor | None = None,
    grad_views: tuple[bool, bool] = (True, True),
    row_range: tuple[int, int] | None = None, fast_log: bool = True,
) -> JointPass:
    """Entropy sums of ``P = p1^T p2 / N`` and, if asked, the off-block gradient products.

    Args:
        p1: ``(N, D)`` probabilities of view 1, contiguous, fp32 (bf16 in bf16 mode).
        p2: Same for view 2.
        segment_dim: ``K``.
        c_off: Coefficient of ``H_off`` folded into ``G`` (1.0 for the raw sums' gradient).
        precision: ``"ieee"``, ``"tf32"`` or ``"bf16"`` for the three products.
        write_grad: Also compute ``dp1, dp2`` (the off-block part of the gradient).
        chunk_rows: Rows of ``P`` per chunk (default :func:`chunk_rows_for`).
        joint_meta: Pin the joint kernel's config (interpreter default: a fixed one).
        matmul_meta: Pin the products' config.
        round_tf32: In tf32 mode, store ``G`` rounded to nearest tf32 (``False`` only to
            measure the truncation bias; ``p1, p2`` are rounded by the softmax kernel).
        p1_t: In tf32 mode, ``p1`` transposed, ``(D, N)`` contiguous (the softmax kernel
            writes it; made here when ``None``): the joint product's K-major operand.
        p2_t: Same for ``p2``.
        grad_views: Which of ``dp1``, ``dp2`` to form (with ``write_grad``); the other is
            returned empty and its gradient product skipped (a view without grad).
        row_range: Only the rows ``[start, stop)`` of ``P`` (sharding, SPEC 3): the launcher
            walks those chunks only, so the sums cover those rows, ``dp1`` is complete in
            its columns ``start:stop`` (0 elsewhere), ``dp2`` is their partial sum, and
            ``p_diag`` holds ``P[a, a]`` for ``a`` in the range (0 elsewhere).
        fast_log: In tf32/bf16 mode, take the epilogue's log from the special-function
            unit (``lg2.approx.f32``; ``False``: libdevice's accurate ``logf``, to measure
            the difference). ieee always uses the accurate log.

    Returns:
        A :class:`JointPass`.
    """
    check_precision(precision)
    n, d = p1.shape
    if not (p1.is_contiguous() and p2.is_contiguous()):
        raise ValueError("p1 and p2 must be contiguous (the softmax kernel writes them so)")
    if INTERPRET:
        joint_meta = joint_meta or INTERPRET_JOINT_META
        matmul_meta = matmul_meta or INTERPRET_MATMUL_META
    elif torch.are_deterministic_algorithms_enabled():
        # Autotuning picks by timing, so two processes could tile differently and round
        # differently: deterministic mode pins each kernel's first config instead.
        joint_meta = joint_meta or _meta_of(configs_for(JOINT_CONFIGS, precision)[0])
        matmul_meta = matmul_meta or _meta_of(configs_for(MATMUL_CONFIGS, precision)[0])
    if joint_meta is not None and min(joint_meta["BLOCK_A"], joint_meta["BLOCK_B"]) < MIN_TILE:
        raise ValueError(f"joint_meta tiles must be at least {MIN_TILE} wide (the partial-sum "
                         f"buffer is sized for that), got {joint_meta}")
    rows_per_chunk = chunk_rows or chunk_rows_for(d, precision, n)
    dev = p1.device
    r0, r1 = row_range if row_range is not None else (0, d)
    # A partial row range leaves entries unwritten: they must read 0, not garbage.
    alloc = torch.empty if (r0, r1) == (0, d) else torch.zeros
    p_diag = alloc(d, device=dev, dtype=torch.float32)
    want1, want2 = (write_grad and grad_views[0]), (write_grad and grad_views[1])
    # distinct tensors: custom ops forbid aliases
    dp1 = alloc((n, d) if want1 else (0,), device=dev, dtype=torch.float32)
    dp2 = alloc((n, d) if want2 else (0,), device=dev, dtype=torch.float32)
    workspace = torch.empty((min(rows_per_chunk, d), d) if write_grad else (0,), device=dev,
                            dtype=p1.dtype)
    # tf32 (Hopper's tf32 wgmma reads only K-major operands): the joint product reads the
    # (D, N) transposes, and dp2 = p1 G reads G^T, written next to G by the joint kernel.
    k_major = precision == "tf32"
    if k_major:
        op1 = p1_t if p1_t is not None else p1.t().contiguous()
        op2 = p2_t if p2_t is not None else p2.t().contiguous()
        if op1.shape != (d, n) or op2.shape != (d, n) or not (op1.is_contiguous()
                                                              and op2.is_contiguous()):
            raise ValueError(f"p1_t and p2_t must be contiguous ({d}, {n}) transposes of p1, "
                             f"p2, got {tuple(op1.shape)} and {tuple(op2.shape)}")
        strides = (1, n, 1, n)  # (stride_p1n, stride_p1a, stride_p2n, stride_p2b)
    else:
        op1, op2 = p1, p2
        strides = (p1.stride(0), 1, p2.stride(0), 1)
    write_gt = want2 and k_major  # G^T only feeds the dp2 product
    workspace_t = torch.empty((d, min(rows_per_chunk, d)) if write_gt else (0,), device=dev,
                              dtype=p1.dtype)
    joint_tuner, operands = _joint_autotuned, (op1, op2)
    joint_tma = use_tma(dev, precision) and _tma_ready(op1, op2)
    if joint_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        operands = tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])
                         for t in (op1, op2))
        joint_tuner = _joint_tma_autotuned
        if joint_meta is not None:
            _joint_tma_block_shapes({"p1_ptr": operands[0], "p2_ptr": operands[1],
                                     "PRECISION": precision, **joint_meta})
    sums: list[Tensor] = []
    for a0 in range(r0, r1, rows_per_chunk):
        rows = min(rows_per_chunk, r1 - a0)
        slots = triton.cdiv(rows, MIN_TILE) * triton.cdiv(d, MIN_TILE)
        partial = torch.empty((2, slots), device=dev, dtype=torch.float32)
        grid = lambda cfg, rows=rows: (triton.cdiv(rows, cfg["BLOCK_A"])
                                       * triton.cdiv(d, cfg["BLOCK_B"]),)
        used = launch(joint_tuner, joint_entropy_kernel, grid, joint_meta,
                      *operands, workspace if write_grad else p_diag,
                      workspace_t if write_gt else p_diag, p_diag, partial,
                      n, d, segment_dim, a0, rows, *strides, d, max(1, workspace_t.shape[-1]),
                      slots, 1.0 / n, c_off,
                      WRITE_G=write_grad, PRECISION=precision, EMULATE_BF16=emulate_bf16(),
                      EMULATE_TF32=emulate_tf32(), ROUND_TF32=round_tf32, WRITE_GT=write_gt,
                      USE_INT64=needs_int64(op1, op2), FAST_LOG=fast_log,
                      USE_TMA=joint_tma)
        tiles = triton.cdiv(rows, used["BLOCK_A"]) * triton.cdiv(d, used["BLOCK_B"])
        sums.append(partial[:, :tiles].sum(dim=1, dtype=torch.float64))
        if write_grad:
            g_chunk = workspace[:rows]
            # dp1[:, a0:a1] = p2 @ G_chunk^T / N ; dp2 (+)= p1[:, a0:a1] @ G_chunk / N
            if want1:
                _matmul(p2, g_chunk.T, dp1[:, a0:a0 + rows], 1.0 / n, False, precision,
                        matmul_meta)
            if want2:
                g_operand = workspace_t[:, :rows].T if write_gt else g_chunk  # K-major in tf32
                _matmul(p1[:, a0:a0 + rows], g_operand, dp2, 1.0 / n, a0 > r0, precision,
                        matmul_meta)
    # No rows (a rank that owns no segment): both sums are 0.
    total = (torch.stack(sums).sum(dim=0) if sums
             else torch.zeros(2, device=dev, dtype=torch.float64))
    return JointPass(total[0], total[1], p_diag, dp1, dp2)


class JointEntropyFunction(torch.autograd.Function):
    """Raw sums ``(H_diag, H_off)`` of ``P = p1^T p2 / N`` with gradients w.r.t. ``p1, p2``.

    The off-block gradient products are formed during the forward (when an input requires
    grad) and scaled by the upstream gradient in the backward.

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     p = torch.softmax(torch.randn(8, 4, 3), -1).reshape(8, 12)
        ...     h_diag, h_off = JointEntropyFunction.apply(p, p.clone(), 3, "ieee")
    """

    @staticmethod
    def forward(ctx: Any, p1: Tensor, p2: Tensor, segment_dim: int,
                precision: str) -> tuple[Tensor, Tensor]:
        write_grad = any(ctx.needs_input_grad[:2])
        dtype = operand_dtype(precision)
        p1c = p1.to(torch.float32)
        p2c = p2.to(torch.float32)
        result = joint_entropy_pass(p1c.to(dtype).contiguous(), p2c.to(dtype).contiguous(),
                                    segment_dim, 1.0, precision, write_grad)
        ctx.save_for_backward(p1c, p2c, result.p_diag, result.dp1, result.dp2)
        ctx.input_dtypes = (p1.dtype, p2.dtype)
        return result.h_diag.float(), result.h_off.float()

    @staticmethod
    def backward(ctx: Any, g_diag: Tensor, g_off: Tensor) -> tuple[Tensor, Tensor, None, None]:
        p1, p2, p_diag, dp1, dp2 = ctx.saved_tensors
        n = p1.shape[0]
        per_column = (torch.log(p_diag.clamp_min(TINY_F32)) + (p_diag >= TINY_F32).float()) / n
        diag1 = g_diag * per_column * p2
        diag2 = g_diag * per_column * p1
        grad1 = (diag1 + g_off * dp1).to(ctx.input_dtypes[0])
        grad2 = (diag2 + g_off * dp2).to(ctx.input_dtypes[1])
        return grad1, grad2, None, None


def joint_entropy_triton(p1: Tensor, p2: Tensor, segment_dim: int,
                         precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """``(H_diag, H_off)`` of ``P = p1^T p2 / N`` by the fused kernels (differentiable).

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     p = torch.softmax(torch.randn(8, 4, 3), -1).reshape(8, 12)
        ...     h_diag, h_off = joint_entropy_triton(p, p, 3)
        ...     assert float(h_diag) <= 0 and float(h_off) <= 0
    """
    check_precision(precision)
    with device_of(p1):
        out: tuple[Tensor, Tensor] = JointEntropyFunction.apply(p1, p2, segment_dim, precision)
    return out
