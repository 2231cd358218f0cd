"""The fused MUSIC loss as ``torch.library`` custom ops, and the backend entry point.

Two ops, ``music_loss::fused_forward`` and ``music_loss::fused_backward``, registered with
``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``: ``torch.compile``
traces through them without a graph break, and, unlike ``triton_op``, they also compile
and run under ``TRITON_INTERPRET=1`` on CPU tensors, so CI tests the compiled path.
No host syncs: the upstream gradients travel as a device tensor read by the kernel.

Data flow of the forward (gradients computed in it, Liger style, when needed):
  1. :func:`~music_loss.kernels.launchers.softmax_forward`: ``p1, p2`` (operand
     dtype) and the invariance partial sums, one read of each view;
  2. :func:`~music_loss.kernels.launchers.joint_entropy_pass`: entropy partial sums,
     ``diag(P)`` and the off-block gradients ``dp1, dp2`` (fp32, ``O(N D)``), chunk by chunk;
  3. the backward kernel (run in autograd's backward) combines them with the per-term
     upstream gradients and applies clamp mask and softmax Jacobian: ``dz1, dz2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from music_loss._config import LossConfig, MUSICTerms
from music_loss.kernels._common import (
    check_precision,
    device_of,
    emulate_tensor_cores,
    operand_dtype,
)
from music_loss.kernels.launchers import (
    JointPlan,
    joint_entropy_pass,
    music_loss_backward,
    softmax_forward,
)

_NAMESPACE = "music_loss"


def _has_off(dim: int, segment_dim: int, c_off: float) -> bool:
    """Off-block gradient products are needed only with >= 2 segments and a nonzero weight."""
    return dim // segment_dim > 1 and c_off != 0.0


@torch.library.custom_op(f"{_NAMESPACE}::fused_forward", mutates_args=())
def fused_forward(
    z1: Tensor, z2: Tensor, segment_dim: int, temperature: float, eps: float,
    c_diag: float, c_off: float, invariance_weight: float, local_start: int, local_stop: int,
    precision: str, chunk_size: int, need_grad1: bool, need_grad2: bool,
    p_row_start: int, p_row_stop: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Terms ``(loss, diag, off, inv)`` as a float32 ``(4,)`` tensor, plus saved gradients.

    Returns:
        ``(terms, dp_off1, dp_off2, p_diag)``; ``dp_off1`` (``dp_off2``) is empty unless
        ``need_grad1`` (``need_grad2``) and the off-block term has a nonzero coefficient:
        a view that does not require grad costs no gradient product. Only the rows
        ``[p_row_start, p_row_stop)`` of ``P`` are computed (sharding; ``(0, D)``: all).
    """
    with device_of(z1):  # launch on z1's GPU, not the current one
        n, d = z1.shape
        s = d // segment_dim
        # tf32: the softmax also writes p1, p2 transposed (the joint product's K-major
        # operands).
        p_t = (z1.new_empty((d, n), dtype=torch.float32),
               z1.new_empty((d, n), dtype=torch.float32)) if precision == "tf32" else None
        round_bf16 = precision == "bf16" and emulate_tensor_cores()
        p1, p2, inv_partials = softmax_forward(
            z1, z2, segment_dim, temperature, eps, operand_dtype(precision),
            (local_start, local_stop), round_bf16=round_bf16, round_tf32=precision == "tf32",
            out_transposed=p_t)
        assert p2 is not None and inv_partials is not None
        has_off = _has_off(d, segment_dim, c_off)
        plan = JointPlan(segment_dim, c_off, precision,
                         grads=(need_grad1 and has_off, need_grad2 and has_off),
                         chunk_size=chunk_size or None, p_rows=(p_row_start, p_row_stop))
        joint = joint_entropy_pass(p1, p2, plan, p_t)
        del p1, p2, p_t
        diag = c_diag * joint.h_diag
        off = c_off * joint.h_off
        local_count = local_stop - local_start
        inv = -invariance_weight * inv_partials.sum(dtype=torch.float64) / (local_count * s)
        terms = torch.stack([diag + off + inv, diag, off, inv]).to(torch.float32)
        return terms, joint.dp1, joint.dp2, joint.p_diag


@fused_forward.register_fake
def _fused_forward_fake(
    z1: Tensor, z2: Tensor, segment_dim: int, temperature: float, eps: float,
    c_diag: float, c_off: float, invariance_weight: float, local_start: int, local_stop: int,
    precision: str, chunk_size: int, need_grad1: bool, need_grad2: bool,
    p_row_start: int, p_row_stop: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, d = z1.shape
    terms = z1.new_empty(4, dtype=torch.float32)
    has_off = _has_off(d, segment_dim, c_off)
    dp1 = z1.new_empty((n, d) if need_grad1 and has_off else (0,), dtype=torch.float32)
    dp2 = z1.new_empty((n, d) if need_grad2 and has_off else (0,), dtype=torch.float32)
    return terms, dp1, dp2, z1.new_empty(d, dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::fused_backward", mutates_args=())
def fused_backward(
    z1: Tensor, z2: Tensor, dp_off1: Tensor, dp_off2: Tensor, p_diag: Tensor,
    grad_terms: Tensor, segment_dim: int, temperature: float, eps: float, c_diag: float,
    c_off: float, invariance_weight: float, local_start: int, local_stop: int,
    p_row_start: int, p_row_stop: int,
) -> tuple[Tensor, Tensor]:
    """``(dz1, dz2)`` from the saved gradients and the upstream gradients of the 4 terms."""
    n, d = z1.shape
    inv_coef = -invariance_weight / ((local_stop - local_start) * (d // segment_dim))
    with device_of(z1):
        return music_loss_backward(
            z1, z2, dp_off1, dp_off2, p_diag, grad_terms.to(torch.float32).contiguous(),
            segment_dim, temperature, eps, c_diag, inv_coef, (local_start, local_stop),
            has_off=dp_off1.numel() > 0 or dp_off2.numel() > 0,
            diag_segments=(p_row_start // segment_dim, p_row_stop // segment_dim),
        )


@fused_backward.register_fake
def _fused_backward_fake(
    z1: Tensor, z2: Tensor, dp_off1: Tensor, dp_off2: Tensor, p_diag: Tensor,
    grad_terms: Tensor, segment_dim: int, temperature: float, eps: float, c_diag: float,
    c_off: float, invariance_weight: float, local_start: int, local_stop: int,
    p_row_start: int, p_row_stop: int,
) -> tuple[Tensor, Tensor]:
    return (torch.empty(z1.shape, dtype=z1.dtype, device=z1.device),
            torch.empty(z2.shape, dtype=z2.dtype, device=z2.device))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    (z1, z2, segment_dim, temperature, eps, c_diag, c_off, invariance_weight,
     local_start, local_stop, _precision, _chunk_size, need_grad1, need_grad2,
     p_row_start, p_row_stop) = inputs
    _terms, dp_off1, dp_off2, p_diag = output
    ctx.save_for_backward(z1, z2, dp_off1, dp_off2, p_diag)
    ctx.params = (segment_dim, temperature, eps, c_diag, c_off, invariance_weight,
                  local_start, local_stop, p_row_start, p_row_stop)
    ctx.need_grads = (need_grad1, need_grad2)


def _backward(ctx: Any, grad_terms: Tensor | None, *_unused: Any) -> tuple[Any, ...]:
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradient products are constants, so second
        # derivatives through them would be silently wrong.
        raise RuntimeError(
            "music_loss backend='triton' does not support double backward (create_graph=True "
            "through the loss, e.g. a gradient penalty): its second derivatives would be "
            "wrong. Use backend='reference' for that computation.")
    need1, need2 = ctx.need_grads
    if not (need1 or need2):
        raise RuntimeError("music_loss::fused_forward ran without gradient bookkeeping "
                           "(need_grad1=need_grad2=False); call it through music_loss_triton")
    z1, z2, dp_off1, dp_off2, p_diag = ctx.saved_tensors
    if grad_terms is None:
        grad_terms = torch.zeros(4, device=z1.device, dtype=torch.float32)
    dz1, dz2 = fused_backward(z1, z2, dp_off1, dp_off2, p_diag, grad_terms, *ctx.params)
    # A view that did not require grad has no off-block product: its dz is not computed
    # from the full gradient and must not be returned.
    return (dz1 if need1 else None, dz2 if need2 else None) + (None,) * 14


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def music_loss_triton(
    z1: Tensor, z2: Tensor, config: LossConfig, local_rows: tuple[int, int] | None,
    precision: str, *, chunk_size: int | None = None, p_rows: tuple[int, int] | None = None,
) -> MUSICTerms:
    """The MUSIC loss through the fused Triton kernels (the ``backend="triton"`` path).

    Args:
        z1: ``(N, D)`` first view (CUDA, or CPU under ``TRITON_INTERPRET=1``), fp16, bf16 or
            fp32, any strides; the global batch when distributed.
        z2: Second view, same shape, dtype and device.
        config: Validated hyperparameters.
        local_rows: ``(local_start, local_stop)``: the batch rows whose invariance term
            counts; ``None`` = all.
        precision: ``"ieee"``, ``"tf32"`` or ``"bf16"`` operands for the three products.
        chunk_size: Rows of ``P`` per chunk (default: the batch ``N`` rounded up to
            128, at least a 32 MiB ``G`` chunk; see
            :func:`~music_loss.kernels.configs.chunk_size_for`).
        p_rows: ``(p_row_start, p_row_stop)``: the rows of ``P`` whose entropy entries
            count, on segment boundaries (sharding); ``None``: all ``D``.

    Returns:
        :class:`MUSICTerms` of float32 scalars, differentiable w.r.t. ``z1`` and ``z2``.

    Example:
        >>> import os, torch
        >>> from music_loss._config import LossConfig
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     z1, z2 = torch.randn(8, 12), torch.randn(8, 12)
        ...     terms = music_loss_triton(z1, z2, LossConfig(segment_dim=3), None, "ieee")
        ...     assert torch.isfinite(terms.loss)
    """
    check_precision(precision)
    if z1.dtype == torch.float64 or z2.dtype == torch.float64:
        raise TypeError("the Triton kernels compute in float32; pass float32/bf16/fp16 views "
                        "or use backend='torch' for float64")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n, d = z1.shape
    local_start, local_stop = local_rows if local_rows is not None else (0, n)
    p_row_start, p_row_stop = p_rows if p_rows is not None else (0, d)
    c_diag, c_off = config.coefficients(d)
    grad_on = torch.is_grad_enabled()
    terms, _, _, _ = fused_forward(
        z1, z2, config.segment_dim, config.temperature, config.eps, c_diag, c_off,
        config.invariance_weight, local_start, local_stop, precision, chunk_size or 0,
        grad_on and z1.requires_grad, grad_on and z2.requires_grad, p_row_start, p_row_stop,
    )
    return MUSICTerms(terms[0], terms[1], terms[2], terms[3])
