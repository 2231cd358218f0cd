"""Segment softmax kernels: forward (one or two views, invariance term fused) and backward.

``p = clamp_min(softmax(z.view(N, S, K) / t, -1), eps)`` for any ``K >= 1`` (80 and other
non powers of two: a segment is padded to ``BLOCK_K = next_pow2(K)`` lanes and masked), fp32
math from fp16/bf16/fp32 inputs, arbitrary input strides.

Fused into the two-view forward: the invariance term's per-row sums of
``lg(sum_k p1 p2)`` over the local rows (SPEC 1.4), so the loss reads ``z`` once.
Fused into the two-view backward: every elementwise gradient of the loss (the invariance
term, the diagonal entries of ``P``), the off-block gradient products computed by
:mod:`music_loss.kernels.joint_entropy`, the clamp mask and the softmax Jacobian, each
weighted by the upstream gradient of its term (read from a device tensor: no host sync).
The softmax is recomputed from ``z`` there instead of storing ``q``: one read of ``z`` is
cheaper than a write plus a read of an fp32 ``(N, D)`` array.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from music_loss.kernels._common import (
    TINY_F32,
    device_of,
    emulate_tf32,
    lg,
    needs_int64,
    next_power_of_2,
    round_to_bf16,
    round_to_tf32,
)

#: Elements of one ``[BLOCK_S, BLOCK_K]`` tile per program (per view).
_TILE_ELEMENTS = 2048


def softmax_blocks(segment_dim: int, num_segments: int) -> dict[str, int]:
    """Tile shape of the elementwise kernels for segments of ``segment_dim`` bins.

    Example:
        >>> softmax_blocks(80, 102)
        {'BLOCK_S': 16, 'BLOCK_K': 128, 'num_warps': 4}
    """
    block_k = max(2, next_power_of_2(segment_dim))
    block_s = max(1, min(next_power_of_2(num_segments), _TILE_ELEMENTS // block_k))
    num_warps = 4 if block_s * block_k <= 4096 else 8
    return {"BLOCK_S": block_s, "BLOCK_K": block_k, "num_warps": num_warps}


@triton.jit
def _softmax_tile(z_ptr, row, stride_n, stride_d, col, mask, s_valid, inv_temperature, eps):
    """Load one row's ``[BLOCK_S, BLOCK_K]`` tile; return ``(q, p)`` in fp32 (0 where masked)."""
    z = tl.load(z_ptr + row * stride_n + col * stride_d, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask, z, float("-inf"))
    z_max = tl.max(z, axis=1)
    z_max = tl.where(s_valid, z_max, 0.0)
    e = tl.where(mask, tl.exp((z - z_max[:, None]) * inv_temperature), 0.0)
    total = tl.sum(e, axis=1)
    total = tl.where(s_valid, total, 1.0)
    q = e / total[:, None]
    p = tl.where(mask, tl.maximum(q, eps, propagate_nan=tl.PropagateNan.ALL), 0.0)
    return q, p


@triton.jit
def _tile_indices(row_id, pid_s, S, K, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_INT64: tl.constexpr):
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    s_valid = offs_s < S
    mask = s_valid[:, None] & (offs_k < K)[None, :]
    col = offs_s[:, None] * K + offs_k[None, :]
    row = row_id
    if USE_INT64:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    return row, col, mask, s_valid


@triton.jit
def _store_operand(ptrs, p, mask, ROUND_BF16: tl.constexpr, ROUND_TF32: tl.constexpr,
                   EMULATE_TF32: tl.constexpr):
    """Store ``p`` as a matmul operand: rounded to bf16 values (emulated bf16 operands) or
    to the nearest tf32 (tensor cores would truncate it: a downward bias), or as is."""
    if ROUND_BF16:
        tl.store(ptrs, round_to_bf16(p), mask=mask)
    elif ROUND_TF32:
        tl.store(ptrs, round_to_tf32(p, EMULATE_TF32), mask=mask)
    else:
        tl.store(ptrs, p, mask=mask)


@triton.jit
def segment_softmax_fwd_kernel(
    z1_ptr, z2_ptr, p1_ptr, p2_ptr, inv_ptr,
    S, K, D, stride_z1n, stride_z1d, stride_z2n, stride_z2d,
    row_start, row_stop, inv_temperature, eps,
    TWO_VIEWS: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_INT64: tl.constexpr, ROUND_TF32: tl.constexpr = False,
    EMULATE_TF32: tl.constexpr = False,
):
    """Program (row, segment block): write ``p`` (both views), and, for two views, the
    block's sum of ``lg(sum_k p1 p2)`` over its segments if the row is local (else 0).
    ``ROUND_BF16``: store ``p`` rounded to bf16 values in fp32 (emulated bf16 operands);
    ``ROUND_TF32``: rounded to nearest tf32 (``EMULATE_TF32``: by bit arithmetic, the
    interpreter). The invariance term uses the unrounded values."""
    row_id = tl.program_id(0)
    pid_s = tl.program_id(1)
    row, col, mask, s_valid = _tile_indices(row_id, pid_s, S, K, BLOCK_S, BLOCK_K, USE_INT64)
    _, p1 = _softmax_tile(z1_ptr, row, stride_z1n, stride_z1d, col, mask, s_valid,
                          inv_temperature, eps)
    _store_operand(p1_ptr + row * D + col, p1, mask, ROUND_BF16, ROUND_TF32, EMULATE_TF32)
    if TWO_VIEWS:
        _, p2 = _softmax_tile(z2_ptr, row, stride_z2n, stride_z2d, col, mask, s_valid,
                              inv_temperature, eps)
        _store_operand(p2_ptr + row * D + col, p2, mask, ROUND_BF16, ROUND_TF32, EMULATE_TF32)
        agreement = tl.sum(p1 * p2, axis=1)
        log_agreement = tl.where(s_valid, lg(agreement),
                                 0.0)
        is_local = (row_id >= row_start) & (row_id < row_stop)
        block_sum = tl.where(is_local, tl.sum(log_agreement, axis=0), 0.0)
        tl.store(inv_ptr + row * tl.num_programs(1) + pid_s, block_sum)


def transposed_blocks(segment_dim: int) -> dict[str, int]:
    """Tile of :func:`segment_softmax_fwd_t_kernel`: ``BLOCK_R`` rows x one segment.

    ``BLOCK_R`` rows make each bin's transposed store ``4 BLOCK_R`` contiguous bytes (32 rows:
    a whole 128-byte line at ``K = 80``) where one row per program wrote 4 bytes per sector.

    Example:
        >>> transposed_blocks(80)
        {'BLOCK_R': 32, 'BLOCK_K': 128, 'num_warps': 4}
    """
    block_k = max(2, next_power_of_2(segment_dim))
    block_r = max(8, min(64, 4096 // block_k))
    return {"BLOCK_R": block_r, "BLOCK_K": block_k,
            "num_warps": 4 if block_r * block_k <= 4096 else 8}


@triton.jit
def segment_softmax_fwd_t_kernel(
    z1_ptr, z2_ptr, p1_ptr, p2_ptr, pt1_ptr, pt2_ptr, inv_ptr,
    N, K, D, stride_z1n, stride_z1d, stride_z2n, stride_z2d,
    row_start, row_stop, inv_temperature, eps,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, USE_INT64: tl.constexpr,
    ROUND_TF32: tl.constexpr = True, EMULATE_TF32: tl.constexpr = False,
):
    """Two views, program (block of ``BLOCK_R`` rows, segment): write ``p`` row-major and
    transposed (``pt[col, row]``, ``(D, N)`` contiguous: the tf32 joint product's K-major
    operands), both rounded to nearest tf32 (``ROUND_TF32``), and the block's sum of
    ``lg(sum_k p1 p2)`` over its local rows (``inv[pid_r, segment]``).

    A tile spans rows, so each bin's transposed store covers ``BLOCK_R`` consecutive rows:
    16-byte vectors, whole sectors (Triton routes the tile through shared memory to change
    its layout) instead of one 4-byte element per sector."""
    pid_r = tl.program_id(0)
    seg = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_valid = rows < N
    mask = r_valid[:, None] & (offs_k < K)[None, :]
    row = rows[:, None]
    col = (seg * K + offs_k)[None, :]
    if USE_INT64:
        row = row.to(tl.int64)
        col = col.to(tl.int64)
    _, p1 = _softmax_tile(z1_ptr, row, stride_z1n, stride_z1d, col, mask, r_valid,
                          inv_temperature, eps)
    _, p2 = _softmax_tile(z2_ptr, row, stride_z2n, stride_z2d, col, mask, r_valid,
                          inv_temperature, eps)
    _store_operand(p1_ptr + row * D + col, p1, mask, False, ROUND_TF32, EMULATE_TF32)
    _store_operand(p2_ptr + row * D + col, p2, mask, False, ROUND_TF32, EMULATE_TF32)
    _store_operand(pt1_ptr + col * N + row, p1, mask, False, ROUND_TF32, EMULATE_TF32)
    _store_operand(pt2_ptr + col * N + row, p2, mask, False, ROUND_TF32, EMULATE_TF32)
    agreement = tl.sum(p1 * p2, axis=1)
    is_local = r_valid & (rows >= row_start) & (rows < row_stop)
    log_agreement = tl.where(is_local, lg(agreement), 0.0)
    tl.store(inv_ptr + pid_r * tl.num_programs(1) + seg, tl.sum(log_agreement, axis=0))


@triton.jit
def _softmax_backward(q, dp, mask, eps, inv_temperature):
    """Clamp mask (``torch.clamp_min``: passes where ``q >= eps``) then softmax Jacobian."""
    dq = tl.where(mask & (q >= eps), dp, 0.0)
    inner = tl.sum(q * dq, axis=1)
    return q * (dq - inner[:, None]) * inv_temperature


@triton.jit
def segment_softmax_bwd_kernel(
    z_ptr, dp_ptr, dz_ptr,
    S, K, D, stride_zn, stride_zd, stride_dpn, stride_dpd, inv_temperature, eps,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, USE_INT64: tl.constexpr,
):
    """``dz`` of the clamped segment softmax of one view from ``dp`` (recomputes ``q``)."""
    row, col, mask, s_valid = _tile_indices(tl.program_id(0), tl.program_id(1), S, K,
                                            BLOCK_S, BLOCK_K, USE_INT64)
    q, _ = _softmax_tile(z_ptr, row, stride_zn, stride_zd, col, mask, s_valid,
                         inv_temperature, eps)
    dp = tl.load(dp_ptr + row * stride_dpn + col * stride_dpd, mask=mask, other=0.0)
    dz = _softmax_backward(q, dp.to(tl.float32), mask, eps, inv_temperature)
    tl.store(dz_ptr + row * D + col, dz, mask=mask)


@triton.jit
def music_loss_bwd_kernel(
    z1_ptr, z2_ptr, dpo1_ptr, dpo2_ptr, pdiag_ptr, gterms_ptr, dz1_ptr, dz2_ptr,
    S, K, D, stride_z1n, stride_z1d, stride_z2n, stride_z2d,
    row_start, row_stop, inv_temperature, eps, c_diag, inv_coef, inv_n,
    HAS_OFF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """Gradient of the fused loss w.r.t. both views, per (row, segment block).

    ``gterms = (g_loss, g_diag, g_off, g_inv)``: upstream gradients of the four returned
    terms; ``loss = diag + off + inv``, so each term's weight is ``g_loss + g_term``.
    ``dpo1/dpo2``: ``c_off * p2 G^T / N`` and ``c_off * p1 G / N`` (off blocks only).
    ``pdiag``: the diagonal ``P[a, a]``; ``inv_coef = -w_inv / (n S)``.
    """
    row_id = tl.program_id(0)
    row, col, mask, s_valid = _tile_indices(row_id, tl.program_id(1), S, K, BLOCK_S, BLOCK_K,
                                            USE_INT64)
    g_loss = tl.load(gterms_ptr).to(tl.float32)
    w_diag = g_loss + tl.load(gterms_ptr + 1).to(tl.float32)
    w_off = g_loss + tl.load(gterms_ptr + 2).to(tl.float32)
    w_inv = g_loss + tl.load(gterms_ptr + 3).to(tl.float32)
    q1, p1 = _softmax_tile(z1_ptr, row, stride_z1n, stride_z1d, col, mask, s_valid,
                           inv_temperature, eps)
    q2, p2 = _softmax_tile(z2_ptr, row, stride_z2n, stride_z2d, col, mask, s_valid,
                           inv_temperature, eps)
    # Invariance: d lg(A) / dA = [A >= tiny] / max(A, tiny), A = sum_k p1 p2 (local rows).
    agreement = tl.sum(p1 * p2, axis=1)
    is_local = (row_id >= row_start) & (row_id < row_stop)
    d_agreement = tl.where(is_local & (agreement >= 1.1754943508222875e-38),
                           inv_coef / tl.maximum(agreement, 1.1754943508222875e-38), 0.0)
    d_agreement = d_agreement * w_inv
    # Diagonal entries: d[P lg P]/dP = lg P + [P >= tiny], dP_aa/dp1[i,a] = p2[i,a] / N.
    p_diag = tl.load(pdiag_ptr + col, mask=mask, other=1.0)
    g_diag = c_diag * (lg(p_diag)
                       + tl.where(p_diag >= 1.1754943508222875e-38, 1.0, 0.0)) * inv_n * w_diag
    dp1 = (d_agreement[:, None] + g_diag) * p2
    dp2 = (d_agreement[:, None] + g_diag) * p1
    if HAS_OFF:
        dp1 += w_off * tl.load(dpo1_ptr + row * D + col, mask=mask, other=0.0)
        dp2 += w_off * tl.load(dpo2_ptr + row * D + col, mask=mask, other=0.0)
    dz1 = _softmax_backward(q1, dp1, mask, eps, inv_temperature)
    dz2 = _softmax_backward(q2, dp2, mask, eps, inv_temperature)
    tl.store(dz1_ptr + row * D + col, dz1, mask=mask)
    tl.store(dz2_ptr + row * D + col, dz2, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def softmax_forward(
    z1: Tensor, z2: Tensor | None, segment_dim: int, temperature: float, eps: float,
    out_dtype: torch.dtype = torch.float32, local_rows: tuple[int, int] | None = None,
    round_bf16: bool = False, round_tf32: bool = False,
    out_transposed: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Segment softmax of one or two views; with two, the invariance partial sums too.

    Returns:
        ``(p1, p2, inv_partials)``: ``p`` as contiguous ``(N, D)`` arrays of ``out_dtype``
        (fp32 values rounded once on store; ``round_bf16``: to bf16 values, kept in
        ``out_dtype``; ``round_tf32``: to the nearest tf32 values, for tf32 products), and an ``(N, blocks)`` fp32 array whose sum is
        ``sum_{local i, s} lg(sum_k p1 p2)`` (``None`` for one view). ``out_transposed``
        (two views): two contiguous ``(D, N)`` arrays of ``out_dtype`` that also receive
        ``p1, p2`` transposed (the tf32 joint product's K-major operands).

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     p, _, _ = softmax_forward(torch.randn(2, 6), None, 3, 1.0, 0.0)
        ...     assert torch.allclose(p.view(2, 2, 3).sum(-1), torch.ones(2, 2))
    """
    n, d = z1.shape
    s = d // segment_dim
    two = z2 is not None
    start, stop = local_rows if local_rows is not None else (0, n)
    zb = z2 if z2 is not None else z1
    p1 = torch.empty((n, d), device=z1.device, dtype=out_dtype)
    p2 = torch.empty_like(p1) if two else None
    if out_transposed is not None:
        if not two or round_bf16 or any(
                t.shape != (d, n) or not t.is_contiguous() or t.dtype != out_dtype
                for t in out_transposed):
            raise ValueError(f"out_transposed must be two contiguous ({d}, {n}) {out_dtype} "
                             "arrays, and needs two views (tf32 operands, not bf16)")
        meta = transposed_blocks(segment_dim)
        grid = (triton.cdiv(n, meta["BLOCK_R"]), s)
        partials = torch.empty(grid, device=z1.device, dtype=torch.float32)
        pt1, pt2 = out_transposed
        segment_softmax_fwd_t_kernel[grid](
            z1, zb, p1, p2, pt1, pt2, partials, n, segment_dim, d, z1.stride(0), z1.stride(1),
            zb.stride(0), zb.stride(1), start, stop, 1.0 / temperature, eps,
            USE_INT64=needs_int64(z1, zb, p1), ROUND_TF32=round_tf32,
            EMULATE_TF32=emulate_tf32(), **meta,
        )
        return p1, p2, partials
    meta = softmax_blocks(segment_dim, s)
    grid = (n, triton.cdiv(s, meta["BLOCK_S"]))
    inv = torch.empty(grid, device=z1.device, dtype=torch.float32) if two else None
    segment_softmax_fwd_kernel[grid](
        z1, zb, p1, p2 if p2 is not None else p1, inv if inv is not None else p1,
        s, segment_dim, d, z1.stride(0), z1.stride(1), zb.stride(0), zb.stride(1),
        start, stop, 1.0 / temperature, eps,
        TWO_VIEWS=two, ROUND_BF16=round_bf16, USE_INT64=needs_int64(z1, zb, p1),
        ROUND_TF32=round_tf32, EMULATE_TF32=emulate_tf32(), **meta,
    )
    return p1, p2, inv


def softmax_backward(z: Tensor, dp: Tensor, segment_dim: int, temperature: float,
                     eps: float) -> Tensor:
    """``dz`` (dtype of ``z``) of the clamped segment softmax, given ``dp``."""
    n, d = z.shape
    s = d // segment_dim
    meta = softmax_blocks(segment_dim, s)
    grid = (n, triton.cdiv(s, meta["BLOCK_S"]))
    dz = torch.empty((n, d), device=z.device, dtype=z.dtype)
    segment_softmax_bwd_kernel[grid](
        z, dp, dz, s, segment_dim, d, z.stride(0), z.stride(1), dp.stride(0), dp.stride(1),
        1.0 / temperature, eps, USE_INT64=needs_int64(z, dp, dz), **meta,
    )
    return dz


def music_loss_backward(
    z1: Tensor, z2: Tensor, dp_off1: Tensor, dp_off2: Tensor, p_diag: Tensor,
    grad_terms: Tensor, segment_dim: int, temperature: float, eps: float, c_diag: float,
    inv_coef: float, local_rows: tuple[int, int], has_off: bool,
    diag_segments: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch :func:`music_loss_bwd_kernel`; returns ``(dz1, dz2)`` in the views' dtypes.

    ``diag_segments``: only the diagonal entries of these segments ``[s0, s1)`` count
    (sharding, SPEC 3): the kernel is launched on the column ranges before, inside and after
    them (pointers offset to the range's first column), with ``c_diag = 0`` outside.
    """
    n, d = z1.shape
    s = d // segment_dim
    s0, s1 = diag_segments if diag_segments is not None else (0, s)
    dz1 = torch.empty((n, d), device=z1.device, dtype=z1.dtype)
    dz2 = torch.empty((n, d), device=z2.device, dtype=z2.dtype)
    # A view that needs no gradient has an empty dp_off: read the other view's in its place
    # (same shape); the caller discards that view's dz.
    off1 = dp_off1 if dp_off1.numel() else (dp_off2 if has_off else p_diag)
    off2 = dp_off2 if dp_off2.numel() else (dp_off1 if has_off else p_diag)
    use_int64 = needs_int64(z1, z2, dz1)
    for first, stop, coef in ((0, s0, 0.0), (s0, s1, c_diag), (s1, s, 0.0)):
        if stop <= first:
            continue
        c = first * segment_dim  # D stays the row stride of dpo and dz

        def cols(t: Tensor, c: int = c) -> Tensor:
            return t[:, c:] if t.dim() == 2 else t[c:]

        meta = softmax_blocks(segment_dim, stop - first)
        grid = (n, triton.cdiv(stop - first, meta["BLOCK_S"]))
        music_loss_bwd_kernel[grid](
            cols(z1), cols(z2), cols(off1), cols(off2), cols(p_diag), grad_terms, cols(dz1),
            cols(dz2), stop - first, segment_dim, d, z1.stride(0), z1.stride(1),
            z2.stride(0), z2.stride(1), local_rows[0], local_rows[1], 1.0 / temperature, eps,
            coef, inv_coef, 1.0 / n, HAS_OFF=has_off, USE_INT64=use_int64, **meta,
        )
    return dz1, dz2


class SegmentSoftmaxFunction(torch.autograd.Function):
    """Autograd wrapper of the segment softmax kernels (fp32 output, ``dz`` in ``z``'s dtype).

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     z = torch.randn(3, 10, requires_grad=True)
        ...     p = SegmentSoftmaxFunction.apply(z, 5, 1.0, 0.0)
        ...     p.sum().backward()
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, segment_dim: int, temperature: float,
                eps: float) -> Tensor:
        p, _, _ = softmax_forward(z, None, segment_dim, temperature, eps)
        ctx.save_for_backward(z)
        ctx.params = (segment_dim, temperature, eps)
        return p

    @staticmethod
    def backward(ctx: Any, grad_p: Tensor) -> tuple[Tensor | None, None, None, None]:
        (z,) = ctx.saved_tensors
        segment_dim, temperature, eps = ctx.params
        dz = softmax_backward(z, grad_p, segment_dim, temperature, eps)
        return dz, None, None, None


def segment_softmax_triton(z: Tensor, segment_dim: int, temperature: float = 1.0,
                           eps: float = 0.0) -> Tensor:
    """Clamped segment softmax through the Triton kernels, differentiable w.r.t. ``z``.

    Example:
        >>> import os, torch
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     p = segment_softmax_triton(torch.randn(4, 6), 3)
        ...     assert p.shape == (4, 6)
    """
    if z.dim() != 2 or z.shape[1] % segment_dim != 0:
        raise ValueError(f"z must be (N, D) with D a multiple of segment_dim={segment_dim}, "
                         f"got shape {tuple(z.shape)}")
    with device_of(z):
        out: Tensor = SegmentSoftmaxFunction.apply(z, segment_dim, temperature, eps)
    return out


__all__ = [
    "SegmentSoftmaxFunction",
    "TINY_F32",
    "music_loss_backward",
    "segment_softmax_triton",
    "softmax_backward",
    "softmax_forward",
]
