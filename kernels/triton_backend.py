"""The fused MUSIC loss as ``torch.library`` custom ops, and the backend entry point.

One op, ``music_loss::fused_forward``, registered with ``torch.library.custom_op`` +
``register_fake`` + ``register_autograd``: ``torch.compile`` traces through it without a
graph break, and, unlike ``triton_op``, it also compiles and runs under
``TRITON_INTERPRET=1`` on CPU tensors, so CI tests the compiled path. No host syncs: the
backward scales by the upstream gradient as a device tensor.

Data flow of the forward (the loss's gradients finished in it, Liger style, when needed):
  1. :func:`~music_loss.kernels.launchers.softmax_forward`: ``p1, p2`` (operand
     dtype) and the invariance partial sums, one read of each view; with fp32 operands
     ``p1`` is stored in the first view's gradient array;
  2. :func:`~music_loss.kernels.launchers.joint_entropy_pass`: entropy partial sums,
     ``diag(P)`` and the off-block gradients ``dp1, dp2``, chunk by chunk, accumulated in
     the two gradient arrays (fp32 ``(N, D)``, the shape of the inputs);
  3. the backward kernel, in place on those arrays: diagonal and invariance terms, clamp
     mask and softmax Jacobian, for an upstream gradient of 1.
The autograd backward multiplies them by the loss's upstream gradient and casts them to the
views' dtypes. Only ``loss`` carries a gradient (the parts are detached logging values).
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
) -> tuple[Tensor, Tensor, Tensor]:
    """Terms ``(loss, diag, off, inv)`` as a float32 ``(4,)`` tensor, and the loss's
    gradients for an upstream gradient of 1.

    Returns:
        ``(terms, grad1, grad2)``: ``grad1`` (``grad2``) is ``d loss / d z1`` (``z2``), fp32
        ``(N, D)``, or empty unless ``need_grad1`` (``need_grad2``): a view that does not
        require grad costs no gradient product. Only the rows ``[p_row_start, p_row_stop)``
        of ``P`` are computed (sharding; ``(0, D)``: all).
    """
    with device_of(z1):  # launch on z1's GPU, not the current one
        n, d = z1.shape
        s = d // segment_dim
        # The gradients, fp32 whatever the views' dtype (a loss scale of 2^16 neither
        # overflows nor flushes them before it is applied; cast in the backward). With fp32
        # operands (ieee, tf32) p1 is stored in grad1: each chunk's columns of p1 are dead
        # once that chunk's dp2 product has read them, before dp1 overwrites them.
        grad1 = z1.new_empty((n, d) if need_grad1 else (0,), dtype=torch.float32)
        grad2 = z1.new_empty((n, d) if need_grad2 else (0,), dtype=torch.float32)
        op_dtype = operand_dtype(precision)
        p1_in_grad1 = need_grad1 and op_dtype == torch.float32
        round_bf16 = precision == "bf16" and emulate_tensor_cores()
        p1, p2, inv_partials = softmax_forward(
            z1, z2, segment_dim, temperature, eps, op_dtype,
            (local_start, local_stop), round_bf16=round_bf16, round_tf32=precision == "tf32",
            out1=grad1 if p1_in_grad1 else None)
        assert p2 is not None and inv_partials is not None
        has_off = _has_off(d, segment_dim, c_off)
        plan = JointPlan(segment_dim, c_off, precision,
                         grads=(need_grad1 and has_off, need_grad2 and has_off),
                         chunk_size=chunk_size or None, p_rows=(p_row_start, p_row_stop))
        joint = joint_entropy_pass(p1, p2, plan,
                                   out=(grad1 if plan.grads[0] else None,
                                        grad2 if plan.grads[1] else None))
        del p1, p2
        diag = c_diag * joint.h_diag
        off = c_off * joint.h_off
        local_count = local_stop - local_start
        inv = -invariance_weight * inv_partials.sum(dtype=torch.float64) / (local_count * s)
        terms = torch.stack([diag + off + inv, diag, off, inv]).to(torch.float32)
        if need_grad1 or need_grad2:
            # Clamp mask and softmax Jacobian, in place: grad = d loss / d z.
            music_loss_backward(
                z1, z2, joint.dp1, joint.dp2, joint.p_diag,
                torch.tensor([1.0, 0.0, 0.0, 0.0], device=z1.device), segment_dim,
                temperature, eps, c_diag, -invariance_weight / (local_count * s),
                (local_start, local_stop), has_off,
                diag_segments=(p_row_start // segment_dim, p_row_stop // segment_dim),
                out=(grad1 if need_grad1 else None, grad2 if need_grad2 else None))
        return terms, grad1, grad2


@fused_forward.register_fake
def _fused_forward_fake(
    z1: Tensor, z2: Tensor, segment_dim: int, temperature: float, eps: float,
    c_diag: float, c_off: float, invariance_weight: float, local_start: int, local_stop: int,
    precision: str, chunk_size: int, need_grad1: bool, need_grad2: bool,
    p_row_start: int, p_row_stop: int,
) -> tuple[Tensor, Tensor, Tensor]:
    n, d = z1.shape
    terms = z1.new_empty(4, dtype=torch.float32)
    grad1 = z1.new_empty((n, d) if need_grad1 else (0,), dtype=torch.float32)
    grad2 = z1.new_empty((n, d) if need_grad2 else (0,), dtype=torch.float32)
    return terms, grad1, grad2


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    z1, z2 = inputs[:2]
    need_grad1, need_grad2 = inputs[12:14]
    _terms, grad1, grad2 = output
    ctx.save_for_backward(grad1, grad2)
    ctx.dtypes = (z1.dtype, z2.dtype)
    ctx.need_grads = (need_grad1, need_grad2)


def _backward(ctx: Any, grad_terms: Tensor | None, *_unused: Any) -> tuple[Any, ...]:
    if torch.is_grad_enabled():
        # create_graph=True: the gradients finished in the forward are constants, so second
        # derivatives through them would be silently wrong.
        raise RuntimeError(
            "music_loss backend='triton' does not support double backward (create_graph=True "
            "through the loss, e.g. a gradient penalty): its second derivatives would be "
            "wrong. Use backend='reference' for that computation.")
    need1, need2 = ctx.need_grads
    if not (need1 or need2):
        raise RuntimeError("music_loss::fused_forward ran without gradient bookkeeping "
                           "(need_grad1=need_grad2=False); call it through music_loss_triton")
    grad1, grad2 = ctx.saved_tensors
    if grad_terms is None:
        return (None,) * 16
    # Only the loss carries a gradient (the parts are detached): scale by its upstream
    # gradient, a device tensor (no host sync, no branch on its value), then cast.
    scale = grad_terms[0].to(torch.float32)
    dz1 = (grad1 * scale).to(ctx.dtypes[0]) if need1 else None
    dz2 = (grad2 * scale).to(ctx.dtypes[1]) if need2 else None
    return (dz1, dz2) + (None,) * 14


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
        :class:`MUSICTerms` of float32 scalars; ``loss`` is differentiable w.r.t. ``z1`` and
        ``z2`` (its gradients are finished in the forward), the parts are detached.

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
    terms, _, _ = fused_forward(
        z1, z2, config.segment_dim, config.temperature, config.eps, c_diag, c_off,
        config.invariance_weight, local_start, local_stop, precision, chunk_size or 0,
        grad_on and z1.requires_grad, grad_on and z2.requires_grad, p_row_start, p_row_stop,
    )
    return MUSICTerms(terms[0], terms[1].detach(), terms[2].detach(), terms[3].detach())
