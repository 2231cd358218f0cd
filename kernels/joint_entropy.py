"""The joint-distribution kernel and the two gradient products (Triton JIT kernels).

Forward (:func:`joint_entropy_kernel`): a tiled matrix product over the batch,
``P[a, b] = sum_i p1[i, a] p2[i, b] / N``, whose epilogue applies the block mask (the
diagonal entries; every entry of the off-diagonal blocks; nothing else), reduces
``P lg P`` over the tile (fp32, a tree) and writes two partial sums per tile. The launcher
adds the partial sums in float64 in a fixed order: deterministic, no atomics.

Gradients are computed during the forward, chunk by chunk (Liger style): for a chunk of
rows ``a0:a1`` of ``P`` the same kernel also writes
``G[a0:a1, :] = lg P + [P >= tiny]`` on the off blocks (0 elsewhere) into a bounded
workspace, then :func:`scaled_matmul_kernel` forms ``dp1[:, a0:a1] = c p2 G^T`` and
``dp2 += c p1[:, a0:a1] G`` with ``c = c_off / N`` (the loss's coefficient of ``H_off``
scales the fp32 products, one multiply per output entry, rather than every entry of ``G``;
in bf16 ``dp2``'s accumulator starts from its output tile, read before the main loop, so
no load waits after it). Three ``N x D x D`` products in all (6 N D^2 FLOPs, the
minimum); recomputing ``P`` in the backward (flash-attention style) would cost a fourth,
a third more work, while keeping the gradient costs two ``O(N D)`` arrays. The diagonal
entries' gradient is elementwise (``dp1[i, a] = G_aa p2[i, a] / N``), so only ``P``'s
diagonal (``D`` floats) is kept for it. Without gradients (evaluation, ``torch.no_grad``)
the forward skips ``G`` and the two products and costs one product.

Operands as stored, in every mode: every product reads the row-major ``(N, D)`` arrays
``p1, p2`` and the row-major ``G`` chunk, no transposed copies. Two operands reduce over
their rows: both of the joint product (over the batch) and ``G`` in ``dp2 = p1 G``. Hopper's
tf32 ``wgmma`` (and datacenter Blackwell's ``tcgen05.mma``) read fp32 operands only K-major
(contiguous along the reduced dimension) from shared memory, so there
(``KMAJOR_STAGING``, sm_90 and sm_100) those tiles are transposed on chip
(:func:`_kmajor_operand_tile`: 16-byte copies in memory order, then a transposing store
into the operand buffer, at most 2-way bank conflicted); 16-bit ``wgmma`` (bf16) and
``mma.sync`` (sm_80, sm_86, sm_89, sm_120: operands in registers) take either order.

TMA (opt-in, ``MUSIC_LOSS_TMA=1``): on sm_90 the joint product's operand tiles and the two
gradient products' tiles can move through host-side tensor descriptors (``USE_TMA`` of
:func:`joint_entropy_kernel`, :func:`scaled_matmul_tma_kernel`: Hopper's bulk tensor copies,
edges zero-filled, the same tiles and configs); see
:func:`music_loss.kernels.launchers.use_tma`.

Warp specialisation (opt-in, ``MUSIC_LOSS_WARP_SPECIALIZE=1``): on sm_90 in bf16 the joint
kernel's ``WARP_SPECIALIZE`` variant splits each program into a producer warp group, which
issues the TMA copies of tensor descriptors the kernel builds from ``p1, p2``, and two
consumer warp groups, which run the ``wgmma`` and the epilogue of 64 rows each of a 128-row
tile (Triton's ``tl.range(..., warp_specialize=True)``). It writes per-row partial sums (a
sum over the tile would reduce across the consumers), and its epilogue's two branches are
one-sided (Hopper's warp specialiser declines a function with an ``else`` block). tf32 has
no such variant: its operands fail Hopper's warp specialiser. Off by default until a GPU
timing shows it faster; see
:func:`music_loss.kernels.launchers.use_warp_specialize`.

The launch plan (chunks, workspace, launches) is in :mod:`music_loss.kernels.launchers`;
the memory and time it gives at the paper's shape are on the benchmarks page.
"""

from __future__ import annotations

import triton
import triton.language as tl

from music_loss.kernels._common import dot_acc, lg, lg2_fast, round_to_bf16, round_to_tf32


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
def _via_registers(x, EMULATE: tl.constexpr):
    """``x`` unchanged, through an opaque identity (``mov.b32``, which ptxas removes): a
    tile that reaches ``tl.dot`` this way is not a load, so Triton does not force the dot's
    shared-memory layout onto the tile's global->shared copy (for an fp32 operand that is not
    contiguous along the reduced dimension that would be 4-byte copies into a K-major
    buffer). The copy keeps the global order (16 bytes); the operand is formed from
    registers. ``EMULATE`` (the interpreter, which runs no PTX): ``x`` itself."""
    if EMULATE:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _cat_columns(x, y):
    """``[R, C]`` and ``[R, C]`` -> ``[R, 2C]``, ``x`` left of ``y``, in registers."""
    return tl.reshape(tl.permute(tl.join(x, y), (0, 2, 1)), (x.shape[0], 2 * x.shape[1]))


@triton.jit
def _columns16(ptr, offs_n, col0, n_left, col_stop, stride_n):
    """Rows ``offs_n`` (``< n_left``) x columns ``col0 + [0, 16)`` (``< col_stop``) of a
    row-major array: 64 bytes of each row, 16 bytes (4 floats) per thread."""
    cols = col0 + tl.arange(0, 16)
    return tl.load(ptr + offs_n[:, None] * stride_n + cols[None, :],
                   mask=(offs_n < n_left)[:, None] & (cols < col_stop)[None, :], other=0.0)


@triton.jit
def _columns32(ptr, offs_n, col0, n_left, col_stop, stride_n):
    return _cat_columns(_columns16(ptr, offs_n, col0, n_left, col_stop, stride_n),
                        _columns16(ptr, offs_n, col0 + 16, n_left, col_stop, stride_n))


@triton.jit
def _columns64(ptr, offs_n, col0, n_left, col_stop, stride_n):
    return _cat_columns(_columns32(ptr, offs_n, col0, n_left, col_stop, stride_n),
                        _columns32(ptr, offs_n, col0 + 32, n_left, col_stop, stride_n))


@triton.jit
def _kmajor_operand_tile(ptr, offs_n, col0, n_left, col_stop, stride_n,
                         BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    """Rows ``offs_n`` x columns ``col0 + [0, BLOCK)`` (``BLOCK`` 16 to 128) of a row-major
    fp32 array, for a tf32 tensor-core operand that reduces over the rows, which sm_90's
    ``wgmma`` and sm_100's ``tcgen05.mma`` read from shared memory only K-major (contiguous
    along the rows), so the tile is transposed on chip.

    Loaded as 16-column tiles, each one copy of 16 bytes per thread with 4 threads per row
    (a whole-tile load puts up to 32 threads along a row), kept in the global order in the
    pipeline's shared buffers (16-byte ``cp.async``, conflict free), then passed through
    :func:`_via_registers` and stored K-major into the dot's 128-byte-swizzled operand
    buffer: with threads spread along the rows that transposing store is at most 2-way bank
    conflicted (8-way from whole-tile rows)."""
    if BLOCK == 128:
        tile = _cat_columns(_columns64(ptr, offs_n, col0, n_left, col_stop, stride_n),
                            _columns64(ptr, offs_n, col0 + 64, n_left, col_stop, stride_n))
    elif BLOCK == 64:
        tile = _columns64(ptr, offs_n, col0, n_left, col_stop, stride_n)
    elif BLOCK == 32:
        tile = _columns32(ptr, offs_n, col0, n_left, col_stop, stride_n)
    else:
        tile = _columns16(ptr, offs_n, col0, n_left, col_stop, stride_n)
    return _via_registers(tile, EMULATE)


@triton.jit
def joint_entropy_kernel(
    p1_ptr, p2_ptr, g_ptr, pdiag_ptr, partial_ptr,
    N, D, K, chunk_start, chunk_len, stride_p1n, stride_p1a, stride_p2n, stride_p2b, stride_g,
    stride_partial, inv_n,
    WRITE_G: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_A: tl.constexpr, EMULATE_TF32: tl.constexpr = False, ROUND_TF32: tl.constexpr = True,
    USE_INT64: tl.constexpr = False,
    FAST_LOG: tl.constexpr = True, USE_TMA: tl.constexpr = False,
    KMAJOR_STAGING: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
):
    """One ``[BLOCK_A, BLOCK_B]`` tile of rows ``chunk_start + [0, chunk_len)`` of ``P``.

    Writes ``partial[0, pid] = sum P lg P`` over the tile's diagonal entries and
    ``partial[1, pid]`` over its off-block entries, ``pdiag[a] = P[a, a]``, and (``WRITE_G``)
    ``G[a - chunk_start, b] = lg P + [P >= tiny]`` on off blocks, 0 elsewhere (an
    operand of the tf32 products: stored rounded to nearest tf32 there, ``ROUND_TF32``).
    ``FAST_LOG`` (tf32/bf16 only; ieee always takes the accurate log): ``lg2.approx.f32``.
    ``USE_TMA``: ``p1_ptr, p2_ptr`` are tensor descriptors of the operands (the strides are
    then unused), read with TMA bulk copies; the epilogue's stores keep pointers.
    ``KMAJOR_STAGING`` (tf32 on sm_90/sm_100; row-major arrays, unit column strides): both
    operand tiles are made K-major on chip (:func:`_kmajor_operand_tile`).
    ``WARP_SPECIALIZE`` (bf16 on sm_90, 128-row tiles; ``p1_ptr, p2_ptr`` pointers, unit column
    strides): the main loop is warp specialised (a producer warp group issues the TMA copies
    of tensor descriptors built in the kernel, two consumer warp groups each run the ``wgmma``
    and the epilogue of 64 rows of the tile; ``num_warps`` is one warp group's, the program
    runs three), and ``partial`` receives per-row sums: ``partial[0, pid * BLOCK_A + r]`` and
    ``partial[1, pid * BLOCK_A + r]`` for row ``r`` of the tile (a sum over the whole tile
    would reduce across the two consumers). Needs a Triton allocator for the descriptors'
    scratch (:func:`music_loss.kernels.launchers.use_warp_specialize`).

    The operands are read through both strides: ``p[n, a]`` at ``n * stride_p1n + a *
    stride_p1a`` (row-major ``(N, D)`` arrays). Pointer increments along the batch are
    64-bit and ``USE_INT64`` widens the column offsets (``N * D >= 2**31``).
    """
    pid = tl.program_id(0)
    num_a = tl.cdiv(chunk_len, BLOCK_A)
    num_b = tl.cdiv(D, BLOCK_B)
    pid_a, pid_b = _grouped_tile(pid, num_a, num_b, GROUP_A)
    local_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_a = chunk_start + local_a
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = tl.arange(0, BLOCK_N)
    mask_a = local_a < chunk_len
    mask_b = offs_b < D
    cols_a = offs_a
    cols_b = offs_b
    if USE_INT64:
        cols_a = cols_a.to(tl.int64)
        cols_b = cols_b.to(tl.int64)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    if WARP_SPECIALIZE:
        # Descriptors made here, not on the host: Hopper's warp specialiser gives each of its
        # two consumer warp groups half of the A tile by narrowing the descriptor's block,
        # which it can do only to a descriptor built in the kernel.
        tl.static_assert(not USE_TMA and not KMAJOR_STAGING and PRECISION == "bf16",
                         "WARP_SPECIALIZE: bf16 with pointer operands only")
        tl.static_assert(BLOCK_A == 128, "WARP_SPECIALIZE: 128-row tiles (64 per consumer)")
        a_start = chunk_start + pid_a * BLOCK_A
        b_start = pid_b * BLOCK_B
        p1_desc = tl.make_tensor_descriptor(p1_ptr, shape=[N, chunk_start + chunk_len],
                                            strides=[stride_p1n, 1],
                                            block_shape=[BLOCK_N, BLOCK_A])
        p2_desc = tl.make_tensor_descriptor(p2_ptr, shape=[N, D], strides=[stride_p2n, 1],
                                            block_shape=[BLOCK_N, BLOCK_B])
        for n0 in tl.range(0, N, BLOCK_N, warp_specialize=True):
            a = p1_desc.load([n0, a_start]).T
            b = p2_desc.load([n0, b_start])
            acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
    elif USE_TMA:  # p1_ptr, p2_ptr are tensor descriptors (bulk copies; edges zero-filled)
        a_start = chunk_start + pid_a * BLOCK_A
        b_start = pid_b * BLOCK_B
        for n0 in range(0, N, BLOCK_N):
            a = p1_ptr.load([n0, a_start]).T
            b = p2_ptr.load([n0, b_start])
            acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
    else:
        a_ptrs = p1_ptr + cols_a[:, None] * stride_p1a + offs_n[None, :] * stride_p1n
        b_ptrs = p2_ptr + offs_n[:, None] * stride_p2n + cols_b[None, :] * stride_p2b
        a_rows = p1_ptr  # row n0 of p1, p2 (64-bit pointer arithmetic)
        b_rows = p2_ptr
        for n0 in range(0, N, BLOCK_N):
            mask_n = offs_n < N - n0
            if KMAJOR_STAGING:
                a = tl.trans(_kmajor_operand_tile(
                    a_rows, offs_n, chunk_start + pid_a * BLOCK_A, N - n0,
                    chunk_start + chunk_len, stride_p1n, BLOCK_A, EMULATE_TF32))
                b = _kmajor_operand_tile(b_rows, offs_n, pid_b * BLOCK_B, N - n0, D,
                                         stride_p2n, BLOCK_B, EMULATE_TF32)
            else:
                a = tl.load(a_ptrs, mask=mask_a[:, None] & mask_n[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_b[None, :], other=0.0)
            acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
            a_ptrs += BLOCK_N * stride_p1n
            b_ptrs += BLOCK_N * stride_p2n
            a_rows += BLOCK_N * stride_p1n
            b_rows += BLOCK_N * stride_p2n

    # Epilogue. Only a tile whose segment ranges meet (it touches the block diagonal: a few
    # percent of the tiles at K = 80) needs the segment masks, the diagonal sum and
    # P's diagonal: a uniform branch on the tile, the whole epilogue on each side (only the
    # accumulator is live across it), every other tile taking its valid entries as
    # off-block. Tensor-core modes only: with ieee's FMA operand tiles the branch makes
    # ptxas spill (and that product dwarfs the epilogue anyway), so every tile runs the
    # general epilogue there.
    valid = mask_a[:, None] & mask_b[None, :]
    a_first = chunk_start + pid_a * BLOCK_A
    b_first = pid_b * BLOCK_B
    row_has_diag = mask_a & (offs_a >= b_first) & (offs_a < b_first + BLOCK_B) & (offs_a < D)
    meets_blocks = True
    if PRECISION != "ieee":
        meets_blocks = ((a_first // K <= (b_first + BLOCK_B - 1) // K)
                        & (b_first // K <= (a_first + BLOCK_A - 1) // K))
    if WARP_SPECIALIZE:
        # The warp specialiser leaves a function with an ``else`` block unsplit: the two
        # epilogues behind two one-sided branches, the second condition written out (as
        # ``not meets_blocks`` the compiler folds the pair back into an if/else).
        misses_blocks = ((a_first // K > (b_first + BLOCK_B - 1) // K)
                         | (b_first // K > (a_first + BLOCK_A - 1) // K))
        if meets_blocks:
            _joint_epilogue(acc, valid, mask_a, row_has_diag, offs_a, offs_b, local_a, K,
                            inv_n, pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr,
                            stride_g, True, WRITE_G, PRECISION, FAST_LOG,
                            EMULATE_BF16, EMULATE_TF32, ROUND_TF32, True)
        if misses_blocks:
            _joint_epilogue(acc, valid, mask_a, row_has_diag, offs_a, offs_b, local_a, K,
                            inv_n, pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr,
                            stride_g, False, WRITE_G, PRECISION, FAST_LOG,
                            EMULATE_BF16, EMULATE_TF32, ROUND_TF32, True)
    elif meets_blocks:
        _joint_epilogue(acc, valid, mask_a, row_has_diag, offs_a, offs_b, local_a, K, inv_n,
                        pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr, stride_g,
                        True, WRITE_G, PRECISION, FAST_LOG,
                        EMULATE_BF16, EMULATE_TF32, ROUND_TF32)
    else:
        _joint_epilogue(acc, valid, mask_a, row_has_diag, offs_a, offs_b, local_a, K, inv_n,
                        pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr, stride_g,
                        False, WRITE_G, PRECISION, FAST_LOG,
                        EMULATE_BF16, EMULATE_TF32, ROUND_TF32)


@triton.jit
def _epilogue_log(x, PRECISION: tl.constexpr, FAST_LOG: tl.constexpr, EMULATE: tl.constexpr):
    """The epilogue's log of ``max(x, tiny)``, in the unit :func:`_log_unit` gives: natural
    (libdevice's accurate log) in ieee mode or with ``FAST_LOG=False``, else base 2 from the
    special-function unit (:func:`lg2_fast`, whose few ulps are far inside the tf32 / bf16
    budgets): the factor ln 2 is then applied once per tile sum instead of per entry."""
    if PRECISION == "ieee" or not FAST_LOG:
        return lg(x)
    else:
        return lg2_fast(x, EMULATE)


@triton.jit
def _log_unit(PRECISION: tl.constexpr, FAST_LOG: tl.constexpr):
    """Natural logs per unit of :func:`_epilogue_log`'s result (1 or ln 2)."""
    if PRECISION == "ieee" or not FAST_LOG:
        return 1.0
    else:
        return 0.6931471805599453


@triton.jit
def _joint_epilogue(acc, valid, valid_rows, row_has_diag, offs_a, offs_b, local_a, K, inv_n,
                    pid, partial_ptr, stride_partial, pdiag_ptr, g_ptr, stride_g,
                    MEETS_BLOCKS: tl.constexpr, WRITE_G: tl.constexpr,
                    PRECISION: tl.constexpr, FAST_LOG: tl.constexpr,
                    EMULATE_BF16: tl.constexpr, EMULATE_TF32: tl.constexpr,
                    ROUND_TF32: tl.constexpr, ROW_SUMS: tl.constexpr = False):
    """The joint kernel's epilogue of one tile, fp32: ``P lg P`` reduced to the tile's two
    partial sums, and the tile of ``G = lg P + [P >= tiny]`` (``WRITE_G``; rounded
    as its store will be: to nearest tf32 for the tf32 products, or to bf16 under the
    interpreter, as a GPU store does). ``MEETS_BLOCKS``: the
    tile touches the block diagonal, so entries are classed by segment (diagonal / off-block
    / neither) and ``P``'s diagonal is stored; else every valid entry is off-block.
    ``ROW_SUMS``: the two partial sums per row of the tile (``partial[k, pid * rows + r]``)
    rather than per tile.

    Per entry the tile costs a scale, a clamp and a log (base 2 on the fast path), one
    multiply-add into the sum and a set plus a multiply-add for ``G``: ln 2 scales the sums
    once per row or tile, and the loss's coefficient of ``H_off`` scales the gradient
    products (their ``alpha``), not ``G``. Columns past ``D`` hold ``P = 0`` (their operand
    tiles read 0), adding ``0 * lg(tiny) = 0``: off the block diagonal only rows are masked,
    once per row sum rather than per entry."""
    joint = acc * inv_n
    unit = _log_unit(PRECISION, FAST_LOG)
    log_joint = _epilogue_log(joint, PRECISION, FAST_LOG, EMULATE_TF32 or EMULATE_BF16)
    plogp = joint * log_joint
    if MEETS_BLOCKS:
        is_diag = (offs_a[:, None] == offs_b[None, :]) & valid
        is_off = ((offs_a // K)[:, None] != (offs_b // K)[None, :]) & valid
        # P's diagonal by rows (each row's one diagonal entry, where the tile holds it): a
        # row vector to store and take P lg P of, not a masked store of every entry.
        p_diag = tl.sum(tl.where(is_diag, joint, 0.0), axis=1)
        log_diag = _epilogue_log(p_diag, PRECISION, FAST_LOG, EMULATE_TF32 or EMULATE_BF16)
        if ROW_SUMS:
            diag_sum = tl.where(row_has_diag, p_diag * log_diag, 0.0) * unit
        else:
            diag_sum = tl.sum(tl.where(row_has_diag, p_diag * log_diag, 0.0), axis=0) * unit
        tl.store(pdiag_ptr + offs_a, p_diag, mask=row_has_diag)
        off_rows = tl.sum(tl.where(is_off, plogp, 0.0), axis=1)
    else:
        if ROW_SUMS:
            diag_sum = tl.zeros(local_a.shape, dtype=tl.float32)
        else:
            diag_sum = 0.0
        # rows outside the chunk dropped (TMA tiles may read past its end)
        off_rows = tl.where(valid_rows, tl.sum(plogp, axis=1), 0.0)
    if ROW_SUMS:
        slots = pid * local_a.shape[0] + tl.arange(0, local_a.shape[0])
        tl.store(partial_ptr + slots, diag_sum)
        tl.store(partial_ptr + stride_partial + slots, off_rows * unit)
    else:
        tl.store(partial_ptr + pid, diag_sum)
        tl.store(partial_ptr + stride_partial + pid, tl.sum(off_rows, axis=0) * unit)
    if WRITE_G:
        grad = log_joint * unit + (joint >= 1.1754943508222875e-38).to(tl.float32)
        if MEETS_BLOCKS:  # elsewhere every stored entry is off-block
            grad = tl.where(is_off, grad, 0.0)
        if PRECISION == "bf16" and EMULATE_BF16:
            grad = round_to_bf16(grad)
        if PRECISION == "tf32" and ROUND_TF32:
            grad = round_to_tf32(grad, EMULATE_TF32)
        tl.store(g_ptr + local_a[:, None] * stride_g + offs_b[None, :], grad, mask=valid)


@triton.jit
def scaled_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, alpha,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EMULATE_TF32: tl.constexpr = False,
    KMAJOR_STAGING: tl.constexpr = False,
):
    """``C = alpha * A @ B`` (``+ C`` when ``ACCUMULATE``; in bf16 computed as ``alpha (C /
    alpha + A @ B)``, the accumulator starting from ``C``), fp32 accumulate and store.

    Any strides (the launcher passes transposes as strides). ``USE_INT64`` widens the row
    and column offsets (``M * stride_am`` may pass ``2**31``). ``KMAJOR_STAGING`` (tf32 on
    sm_90/sm_100, ``B`` row-major with unit column stride: ``dp2``'s ``G``): ``B``'s tiles are made
    K-major on chip (:func:`_kmajor_operand_tile`).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m
    cols = offs_n
    if USE_INT64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    b_rows = b_ptr  # row k0 of B (64-bit pointer arithmetic)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE and PRECISION == "bf16":
        # C / alpha + A @ B, scaled by alpha at the end: C's tile is read before the main
        # loop (its latency overlaps the pipeline's first operand copies), in the
        # accumulator's registers, instead of a load the epilogue waits for. bf16 only:
        # in tf32 (K-major staging) and ieee (FMA tiles) starting from C costs 10-36 more
        # registers per thread (ieee spills); there the load stays after the loop.
        acc = tl.load(c_ptrs, mask=mask_c, other=0.0) * (1.0 / alpha)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if KMAJOR_STAGING:
            b = _kmajor_operand_tile(b_rows, offs_k, pid_n * BLOCK_N, K - k0, N, stride_bk,
                                     BLOCK_N, EMULATE_TF32)
        else:
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        b_rows += BLOCK_K * stride_bk
    acc = acc * alpha
    if ACCUMULATE and PRECISION != "bf16":
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
    if ACCUMULATE:  # C / alpha + A @ B, C read before the main loop (as above)
        acc = c_desc.load([off_m, off_n]) * (1.0 / alpha)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k0])
        if B_KMAJOR:
            b = b_desc.load([off_n, k0]).T
        else:
            b = b_desc.load([k0, off_n])
        acc = dot_acc(a, b, acc, PRECISION, EMULATE_BF16, EMULATE_TF32)
    c_desc.store([off_m, off_n], acc * alpha)

