"""A float64 oracle of the fused kernels' arithmetic, with bf16 or tf32 operand rounding.

It spells out the loss's gradient (``G = c (lg P + [P >= tiny])``, ``dp1 = p2 G^T / N``,
``dp2 = p1 G / N``, the elementwise diagonal and invariance parts, then clamp and softmax
backward by autograd) and rounds exactly what the kernels round in bf16 or tf32 mode:
``p1, p2`` as product operands and the off-block ``G`` (tf32: to nearest, ties away from
zero, as PTX ``cvt.rna.tf32.f32``; ``truncate_tf32`` drops the low bits instead, as tensor
cores do with operands nobody rounded). With ``round_bf16=False`` it must agree with
float64 autograd of ``music_loss.reference`` (tested), which validates the transcription.
"""

from __future__ import annotations

import torch
from torch import Tensor

from music_loss._config import TINY, LossConfig, MUSICTerms
from music_loss.reference import block_masks, lg, segment_softmax_reference


def _bf16(x: Tensor, enabled: bool) -> Tensor:
    return x.to(torch.float32).to(torch.bfloat16).double() if enabled else x


def tf32_round(x: Tensor) -> Tensor:
    """float32 values -> nearest tf32 (ties away from zero), as float32 (finite inputs)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def tf32_truncate(x: Tensor) -> Tensor:
    """float32 values -> tf32 by dropping the 13 low mantissa bits (tensor-core reads)."""
    return (x.to(torch.float32).contiguous().view(torch.int32) & -0x2000).view(torch.float32)


def _operand(x: Tensor, round_bf16: bool, tf32: str | None) -> Tensor:
    if tf32 == "round":
        return tf32_round(x).double()
    if tf32 == "truncate":
        return tf32_truncate(x).double()
    return _bf16(x, round_bf16)


def rounded_oracle(z1: Tensor, z2: Tensor, config: LossConfig,
                   local_rows: tuple[int, int] | None = None, round_bf16: bool = True,
                   grad_terms: Tensor | None = None,
                   tf32: str | None = None) -> tuple[MUSICTerms, Tensor, Tensor]:
    """Terms and ``(dz1, dz2)`` in float64 for upstream gradients ``grad_terms`` of
    ``(loss, diag, off, inv)`` (default ``(1, 0, 0, 0)``). ``tf32``: ``"round"`` or
    ``"truncate"`` the operands to tf32 instead of any bf16 rounding."""
    n, d = z1.shape
    k = config.segment_dim
    s = d // k
    g = (torch.tensor([1.0, 0, 0, 0], dtype=torch.float64) if grad_terms is None
         else grad_terms.double())
    z1d = z1.detach().double().requires_grad_(True)
    z2d = z2.detach().double().requires_grad_(True)
    # p in float32 first (as the kernels compute it), then float64 for everything else.
    p1 = segment_softmax_reference(z1d, k, config.temperature, config.eps)
    p2 = segment_softmax_reference(z2d, k, config.temperature, config.eps)
    p1_32 = segment_softmax_reference(z1.detach().float(), k, config.temperature, config.eps)
    p2_32 = segment_softmax_reference(z2.detach().float(), k, config.temperature, config.eps)
    op1 = _operand(p1_32.double(), round_bf16, tf32)
    op2 = _operand(p2_32.double(), round_bf16, tf32)
    joint = op1.T @ op2 / n
    plogp = joint * lg(joint)
    diag_mask, off_mask = block_masks(d, k, joint.device)
    h_diag, h_off = (plogp * diag_mask).sum(), (plogp * off_mask).sum()
    c_diag, c_off = config.coefficients(d)
    start, stop = local_rows if local_rows is not None else (0, n)
    q1, q2 = p1_32.double()[start:stop], p2_32.double()[start:stop]
    q1.requires_grad_(True)
    q2.requires_grad_(True)
    agreement = (q1 * q2).view(stop - start, s, k).sum(-1)
    l_inv = -lg(agreement).mean()
    diag, off, inv = c_diag * h_diag, c_off * h_off, config.invariance_weight * l_inv
    terms = MUSICTerms(diag + off + inv, diag, off, inv)

    w_diag, w_off, w_inv = g[0] + g[1], g[0] + g[2], g[0] + g[3]
    dlog = lg(joint) + (joint >= TINY).double()
    # G is rounded as the kernels store it (without c_off, which scales the products)
    g_off = _operand(dlog * off_mask, round_bf16, tf32)
    dp1 = w_off * c_off * (op2 @ g_off.T) / n
    dp2 = w_off * c_off * (op1 @ g_off) / n
    per_column = w_diag * c_diag * torch.diagonal(dlog) / n
    dp1 = dp1 + per_column * p2_32.double()
    dp2 = dp2 + per_column * p1_32.double()
    di1, di2 = torch.autograd.grad(w_inv * inv, (q1, q2))
    dp1[start:stop] += di1
    dp2[start:stop] += di2
    dz1, dz2 = torch.autograd.grad((p1, p2), (z1d, z2d), grad_outputs=(dp1, dp2))
    detached = MUSICTerms(*(t.detach() for t in terms))
    return detached, dz1, dz2
