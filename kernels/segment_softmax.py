"""Segment softmax kernels (Triton JIT): the forward of both views with the invariance term
fused, and the loss's backward.

``p = clamp_min(softmax(z.view(N, S, K) / t, -1), eps)`` for any ``K >= 1`` (80 and other
non powers of two: a segment is padded to ``BLOCK_K = next_pow2(K)`` lanes and masked), fp32
math from fp16/bf16/fp32 inputs, arbitrary input strides.

Fused into the forward: the invariance term's per-row sums of ``lg(sum_k p1 p2)`` over the
local batch rows ``[local_start, local_stop)``, so the loss reads ``z`` once.
Fused into the backward: every elementwise gradient of the loss (the invariance term, the
diagonal entries of ``P``), the off-block gradient products computed by the joint pass, the
clamp mask and the softmax Jacobian, each weighted by the upstream gradient of its term (read
from a device tensor: no host sync). The softmax is recomputed from ``z`` there instead of
storing ``q``: one read of ``z`` is cheaper than a write plus a read of an fp32 ``(N, D)``
array. The launchers are in :mod:`music_loss.kernels.launchers`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from music_loss.kernels._common import lg, next_power_of_2, round_to_bf16, round_to_tf32

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
    local_start, local_stop, inv_temperature, eps,
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
        is_local = (row_id >= local_start) & (row_id < local_stop)
        block_sum = tl.where(is_local, tl.sum(log_agreement, axis=0), 0.0)
        tl.store(inv_ptr + row * tl.num_programs(1) + pid_s, block_sum)


@triton.jit
def _softmax_backward(q, dp, mask, eps, inv_temperature):
    """Clamp mask (``torch.clamp_min``: passes where ``q >= eps``) then softmax Jacobian."""
    dq = tl.where(mask & (q >= eps), dp, 0.0)
    inner = tl.sum(q * dq, axis=1)
    return q * (dq - inner[:, None]) * inv_temperature


@triton.jit
def music_loss_bwd_kernel(
    z1_ptr, z2_ptr, dpo1_ptr, dpo2_ptr, pdiag_ptr, gterms_ptr, dz1_ptr, dz2_ptr,
    S, K, D, stride_z1n, stride_z1d, stride_z2n, stride_z2d,
    local_start, local_stop, inv_temperature, eps, c_diag, inv_coef, inv_n,
    HAS_OFF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_INT64: tl.constexpr, NEED1: tl.constexpr = True, NEED2: tl.constexpr = True,
):
    """Gradient of the fused loss w.r.t. both views, per (row, segment block).

    ``NEED1`` / ``NEED2``: which views' gradients to read and store (a view that needs
    none may pass the other view's pointers). ``dz`` may be ``dpo`` itself (in place): each
    program reads its tile of ``dpo`` before it stores the same tile of ``dz``.

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
    is_local = (row_id >= local_start) & (row_id < local_stop)
    d_agreement = tl.where(is_local & (agreement >= 1.1754943508222875e-38),
                           inv_coef / tl.maximum(agreement, 1.1754943508222875e-38), 0.0)
    d_agreement = d_agreement * w_inv
    # Diagonal entries: d[P lg P]/dP = lg P + [P >= tiny], dP_aa/dp1[i,a] = p2[i,a] / N.
    p_diag = tl.load(pdiag_ptr + col, mask=mask, other=1.0)
    g_diag = c_diag * (lg(p_diag)
                       + tl.where(p_diag >= 1.1754943508222875e-38, 1.0, 0.0)) * inv_n * w_diag
    dp1 = (d_agreement[:, None] + g_diag) * p2
    dp2 = (d_agreement[:, None] + g_diag) * p1
    if NEED1:
        if HAS_OFF:
            dp1 += w_off * tl.load(dpo1_ptr + row * D + col, mask=mask, other=0.0)
        dz1 = _softmax_backward(q1, dp1, mask, eps, inv_temperature)
        tl.store(dz1_ptr + row * D + col, dz1, mask=mask)
    if NEED2:
        if HAS_OFF:
            dp2 += w_off * tl.load(dpo2_ptr + row * D + col, mask=mask, other=0.0)
        dz2 = _softmax_backward(q2, dp2, mask, eps, inv_temperature)
        tl.store(dz2_ptr + row * D + col, dz2, mask=mask)
