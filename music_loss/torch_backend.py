"""The memory-light PyTorch backend (``backend="torch"``): never more than a block of ``P``.

The joint distribution ``P = p1^T p2 / N`` is built ``chunk_size`` rows at a time. Each block is
used three times while it exists: for its share of ``H_off``, for the gradient factor
``G = c * (lg P + [P >= tiny])`` and for the two gradient products ``dp1 = p2 G^T / N`` and
``dp2 = p1 G / N`` (Liger style: the gradients are finished in the forward pass, so the
backward pass only scales them by ``grad_output``). The diagonal of ``P`` is ``O(N D)`` and
handled apart from the blocks.

Memory: three ``chunk_size x D`` buffers plus four ``N x D`` (probabilities and their gradients,
which become ``dz1, dz2`` in place: the only tensors saved for backward, kept in float32
whatever the input dtype, so that ``grad_output`` (a loss scale of 65536) multiplies them
before any rounding to 16 bits). The unclamped softmax is recomputed from ``z`` with
``torch.softmax`` of the max-shifted logits: as accurate as the forward at any logit size
(``exp(x - lse)`` from a saved log-sum-exp would lose precision in proportion to the
logits).
Work: three ``N x D x D`` products, the minimum (6 N D^2 FLOPs); one fewer when only one
view requires grad.

Sharding (``p_rows``): only the rows ``A = p_rows`` of ``P`` are formed, i.e.
the entropy entries of those rows (their diagonal entries included), ``dp1[:, A]`` complete
and the partial ``dp2`` from ``p1[:, A]``: ``6 N D |A|`` FLOPs. Both products are linear in
``G``, so the partial gradients of the ranks sum to the whole.

Precision is passed in, never set globally: ``tf32`` rounds the CUDA product operands to
tf32 (nearest-even, as cuBLAS does) so the result does not depend on PyTorch's global
matmul setting; ``bf16`` rounds them to bf16. Double backward (``create_graph=True``) is
refused with a clear error: the gradients are finished in the forward pass and are not
themselves differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from music_loss._config import (
    TINY,
    LossConfig,
    MUSICTerms,
    ResolvedPrecision,
    autocast_disabled,
    compute_dtype,
    matmul_operand,
)

#: Elements per ``chunk_size x D`` buffer: large enough for efficient matmuls, small next to D^2.
_MIN_BUFFER = 1 << 20
_MAX_BUFFER = 1 << 23


def default_chunk_size(n: int, d: int) -> int:
    """Rows of ``P`` per block: about ``N D / 2`` elements, clamped to [1 Mi, 8 Mi] elements.

    Each block buffer then stays within the ``O(N D)`` arrays the backend holds anyway (and
    at most 32 MiB in float32), while blocks stay large enough that the per-block passes
    over the ``N x D`` gradient accumulators do not dominate when ``N`` is large.
    """
    budget = min(max(n * d // 2, _MIN_BUFFER), _MAX_BUFFER)
    return max(1, min(d, budget // d))


def _check_ieee_products_possible(device: torch.device, precision: str) -> None:
    """``ieee`` on CUDA needs cuBLAS in fp32 mode: the global setting decides that, and this
    backend never writes it."""
    if device.type != "cuda" or precision != "ieee":
        return
    from music_loss._gpu_policy import has_tf32

    if not has_tf32(device):  # no tf32 before sm_80: cuBLAS computes fp32 whatever the setting
        return
    from music_loss._dispatch import float32_matmul_mode

    if float32_matmul_mode() == "tf32":
        raise ValueError("precision='ieee' with backend='torch' on CUDA needs PyTorch's float32 "
                         "matmul precision at 'ieee'/'highest' (it is tf32 now, and this backend "
                         "does not change global settings); use precision='auto' or 'tf32', "
                         "or backend='triton', which takes the precision per call")


def _diagonal_blocks(buffer: Tensor, a0: int, a1: int, k: int) -> tuple[slice, Tensor]:
    """Columns spanned by the diagonal blocks of rows ``a0:a1``, and the mask of those blocks."""
    c0, c1 = (a0 // k) * k, ((a1 - 1) // k + 1) * k
    rows = torch.arange(a0, a1, device=buffer.device) // k
    cols = torch.arange(c0, c1, device=buffer.device) // k
    return slice(c0, c1), rows[:, None] == cols[None, :]


class _ChunkedMUSIC(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z1: Tensor,
        z2: Tensor,
        config: LossConfig,
        local_rows: tuple[int, int],
        precision: str,
        chunk_size: int,
        need_grads: tuple[bool, bool],
        p_rows: tuple[int, int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, d = z1.shape
        k = config.segment_dim
        s = d // k
        dtype = compute_dtype(z1.dtype)
        need1, need2 = need_grads
        need_grad = need1 or need2
        p1 = _segment_softmax(z1, k, config.temperature, config.eps, dtype)
        p2 = _segment_softmax(z2, k, config.temperature, config.eps, dtype)
        a1, a2 = matmul_operand(p1, precision), matmul_operand(p2, precision)
        c_diag, c_off = config.coefficients(d)
        acc = torch.float64 if z1.device.type != "mps" else torch.float32

        # Rows A = [r0, r1) of P (all of them unless sharded); whole segments.
        r0, r1 = p_rows
        # Diagonal entries P[a, a] of the rows A: O(N |A|), no block needed.
        p_diag = (a1[:, r0:r1] * a2[:, r0:r1]).sum(0) / n
        lg_diag = p_diag.clamp_min(TINY).log()
        h_diag = (p_diag * lg_diag).sum(dtype=acc)

        # Invariance term on this process's batch rows [l0, l1).
        l0, l1 = local_rows
        agreement = (p1[l0:l1] * p2[l0:l1]).view(l1 - l0, s, k).sum(-1)
        l_inv = -agreement.clamp_min(TINY).log().sum(dtype=acc) / ((l1 - l0) * s)

        # Gradient accumulators dL/dp, only for the views that require grad.
        dp1 = dp2 = None
        if need_grad:
            # Per column of the view's gradient; zero outside A.
            g_diag = a1.new_zeros(d)
            g_diag[r0:r1] = c_diag / n * (lg_diag + (p_diag >= TINY).to(dtype))
            g_agree = (-config.invariance_weight / ((l1 - l0) * s)
                       / agreement.clamp_min(TINY) * (agreement >= TINY).to(dtype))
            g_agree = g_agree.unsqueeze(-1)  # (rows, S, 1): broadcast over the bins
            if need1:
                dp1 = a2 * g_diag
                dp1[l0:l1].view(l1 - l0, s, k).addcmul_(p2[l0:l1].view(l1 - l0, s, k), g_agree)
            if need2:
                dp2 = a1 * g_diag
                dp2[l0:l1].view(l1 - l0, s, k).addcmul_(p1[l0:l1].view(l1 - l0, s, k), g_agree)

        # Off-diagonal blocks, `chunk_size` rows of P at a time.
        h_off = torch.zeros((), dtype=acc, device=z1.device)
        # Every entry of P is at least eps^2: with the default eps the floor never binds and
        # the clamp and its mask can be skipped (two passes over each block).
        floor_binds = config.eps**2 < 2 * TINY
        # d(P lg P)/dP = lg P + [P >= tiny] (torch.clamp_min's gradient). Where the floor never
        # binds, the "+1" part of G contributes c/N times the off-block row sums of the other
        # view, O(N D) in all: adding it here lets the block products use lg P as G directly,
        # saving a buffer and a pass per block (not in bf16 mode, which rounds G itself).
        hoist_one = need_grad and not floor_binds and precision != "bf16"
        if s > 1 and c_off != 0.0:
            _check_ieee_products_possible(z1.device, precision)
            if hoist_one:
                # dp1[:, A] sums over every column b of P; dp2 over the rows a in A only.
                if dp1 is not None:
                    dp1[:, r0:r1].add_(_off_block_sums(a2, k)[:, r0:r1], alpha=c_off / n)
                if dp2 is not None:
                    dp2.add_(_off_block_sums(a1, k, (r0 // k, r1 // k)), alpha=c_off / n)
            for a0 in range(r0, r1, chunk_size):
                a_end = min(a0 + chunk_size, r1)
                rows = a1[:, a0:a_end]  # a strided view: BLAS reads it in place
                block = torch.mm(rows.t(), a2).div_(n)  # P[a0:a_end, :]
                lg_block = block.clamp_min(TINY).log_() if floor_binds else block.log()
                cols, inside = _diagonal_blocks(block, a0, a_end, k)
                lg_block[:, cols].masked_fill_(inside, 0.0)
                if need_grad:
                    if hoist_one:
                        grad_block = lg_block
                    else:
                        grad_block = ((block >= TINY).to(dtype).add_(lg_block) if floor_binds
                                      else lg_block + 1.0)
                        grad_block[:, cols].masked_fill_(inside, 0.0)
                    grad_block = matmul_operand(grad_block, precision)
                    # dp1[:, a0:a_end] += c a2 G^T / N ; dp2 += c a1[:, a0:a_end] G / N
                    if dp1 is not None:
                        dp1[:, a0:a_end].addmm_(a2, grad_block.t(), alpha=c_off / n)
                    if dp2 is not None:
                        dp2.addmm_(rows, grad_block, alpha=c_off / n)
                h_off += block.mul_(lg_block).sum(dtype=acc)
                del block, lg_block

        diag, off, inv = c_diag * h_diag, c_off * h_off, config.invariance_weight * l_inv
        # The sum in the accumulator type, rounded once: the parts may nearly cancel.
        loss = (diag + off + inv).to(dtype)

        del p1, p2, a1, a2
        # dz in float32 (float64 for float64 inputs) until grad_output has scaled it.
        dz1 = _softmax_backward_(dp1, z1, config, dtype) if dp1 is not None else None
        dz2 = _softmax_backward_(dp2, z2, config, dtype) if dp2 is not None else None
        ctx.save_for_backward(dz1, dz2)
        ctx.input_dtypes = (z1.dtype, z2.dtype)
        parts = (diag.to(dtype), off.to(dtype), inv.to(dtype))
        ctx.mark_non_differentiable(*parts)
        return (loss, *parts)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: autograd wants a differentiable backward. The gradients here
            # were finished in the forward pass and are constants: refuse rather than return
            # silently wrong second derivatives.
            raise RuntimeError(
                "music_loss backend='torch' does not support double backward "
                "(create_graph=True through the loss, e.g. a gradient penalty): its second "
                "derivatives would be wrong. Use backend='reference' for that computation.")
        dz1, dz2 = ctx.saved_tensors
        dtype1, dtype2 = ctx.input_dtypes
        grads = [None if dz is None else (dz * grad_loss.to(dz.dtype)).to(dtype)
                 for dz, dtype in ((dz1, dtype1), (dz2, dtype2))]
        return grads[0], grads[1], None, None, None, None, None, None


def _off_block_sums(p: Tensor, k: int, segments: tuple[int, int] | None = None) -> Tensor:
    """``out[i, a] = sum of p[i, b] over the b outside a's segment``, ``(N, D)``; only the
    ``b`` in ``segments`` ``[s0, s1)`` when given."""
    n, d = p.shape
    segment_sums = p.view(n, d // k, k).sum(-1, keepdim=True)  # (N, S, 1)
    if segments is None:
        total = segment_sums.sum(1, keepdim=True)  # (N, 1, 1)
        return (total - segment_sums).expand(n, d // k, k).reshape(n, d)
    s0, s1 = segments
    total = segment_sums[:, s0:s1].sum(1, keepdim=True)
    outside = total.expand(n, d // k, 1).clone()
    outside[:, s0:s1] -= segment_sums[:, s0:s1]
    return outside.expand(n, d // k, k).reshape(n, d)


def _segment_softmax(
    z: Tensor, k: int, temperature: float, eps: float, dtype: torch.dtype
) -> Tensor:
    """Clamped segment softmax ``(N, D)`` in ``dtype``.

    The maximum is subtracted before dividing by the temperature (exact when the two are
    close, Sterbenz): dividing first rounds logits of size ``|z| / t`` and puts that absolute
    error into every exponent.
    """
    n, d = z.shape
    logits = z.to(dtype).view(n, d // k, k)
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    p = torch.softmax(shifted.div_(temperature), dim=-1)
    if eps > 0:
        p.clamp_min_(eps)
    return p.view(n, d)


def _softmax_backward_(
    dp: Tensor, z: Tensor, config: LossConfig, dtype: torch.dtype
) -> Tensor:
    """Through the clamp (gradient where q >= eps) and the segment softmax, in ``dp``'s buffer.

    ``q`` is recomputed from ``z`` by the same softmax as the forward (cheaper in memory than
    keeping it, and exact where the clamp replaced it).
    """
    n, d = dp.shape
    k = config.segment_dim
    q = _segment_softmax(z, k, config.temperature, 0.0, dtype).view(n, d // k, k)
    dq = dp.view(n, d // k, k)
    if config.eps > 0:
        dq.masked_fill_(q < config.eps, 0.0)
    dot = (q * dq).sum(-1, keepdim=True)
    return dq.sub_(dot).mul_(q).div_(config.temperature).view(n, d)


def music_loss_torch(
    z1: Tensor,
    z2: Tensor,
    config: LossConfig,
    local_rows: tuple[int, int] | None = None,
    precision: ResolvedPrecision = "ieee",
    chunk_size: int | None = None,
    p_rows: tuple[int, int] | None = None,
) -> MUSICTerms:
    """MUSIC loss holding at most ``chunk_size`` rows of ``P`` at a time.

    Args:
        z1: ``(N, D)`` first view (global batch when distributed).
        z2: ``(N, D)`` second view.
        config: Hyperparameters.
        local_rows: Batch rows ``(local_start, local_stop)`` whose invariance term counts
            (``None``: all).
        precision: ``"ieee"``, ``"tf32"`` (CUDA only; CPU computes fp32) or ``"bf16"``
            (operands rounded to bf16, fp32 accumulation).
        chunk_size: Rows of ``P`` per block; :func:`default_chunk_size` when ``None``.
        p_rows: Rows ``(p_row_start, p_row_stop)`` of ``P`` whose entropy entries this call
            computes, on segment boundaries (sharding); ``None``: all ``D``. The entropy
            parts and their gradient are then this range's share.

    Returns:
        :class:`MUSICTerms`; only ``loss`` carries a gradient (the parts are for logging).

    Raises:
        RuntimeError: In a double backward (``create_graph=True``) through the loss.

    Example:
        >>> import torch
        >>> from music_loss._config import LossConfig
        >>> z1 = torch.randn(8, 12, requires_grad=True)
        >>> terms = music_loss_torch(z1, torch.randn(8, 12), LossConfig(segment_dim=3))
        >>> terms.loss.backward()
        >>> z1.grad.shape
        torch.Size([8, 12])
    """
    n, d = z1.shape
    chunk_size = chunk_size if chunk_size is not None else default_chunk_size(n, d)
    local_rows = local_rows if local_rows is not None else (0, n)
    p_rows = p_rows if p_rows is not None else (0, d)
    # Only the views that require grad get a gradient (target networks, stop-gradient):
    # the other view's N x D x D product is skipped.
    grad_on = torch.is_grad_enabled()
    need_grads = (grad_on and z1.requires_grad, grad_on and z2.requires_grad)
    # Precision is ours to choose (resolved from autocast by the dispatch): autocast would
    # otherwise lower every product, gradient products included, to 16 bits.
    with autocast_disabled(z1.device.type):
        loss, diag, off, inv = _ChunkedMUSIC.apply(z1, z2, config, local_rows, precision,
                                                   chunk_size, need_grads, p_rows)
    return MUSICTerms(loss, diag, off, inv)
