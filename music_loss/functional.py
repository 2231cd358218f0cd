"""Functional MUSIC loss: validate the inputs, then dispatch to a backend.

Data flows one way: :func:`music_loss` -> ``_dispatch`` -> a backend (``reference`` |
``torch`` (:mod:`music_loss.torch_backend`) | ``triton`` (:mod:`music_loss.kernels`)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from music_loss import reference
from music_loss._config import (
    Backend,
    LossConfig,
    MUSICTerms,
    Normalization,
    Precision,
    compute_dtype,
)
from music_loss._dispatch import run_backend
from music_loss._validate import (
    check_backend,
    check_chunk_size,
    check_flag,
    check_not_under_functorch,
    check_pair,
    check_precision,
    check_segment_dim,
    check_view,
    make_config,
)
from music_loss._validate import (
    check_finite as check_finite_values,
)
from music_loss.distributed import (
    agree,
    check_process_group,
    gather_agreed,
    owned_segments,
    sum_over_ranks,
)

__all__ = [
    "MUSICTerms",
    "invariance_term",
    "joint_entropy_terms",
    "make_config",
    "music_loss",
    "segment_softmax",
]


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def segment_softmax(
    z: Tensor, segment_dim: int = 80, temperature: float = 1.0, eps: float = 0.0
) -> Tensor:
    """Softmax over each segment of ``segment_dim`` features, optionally clamped below at eps.

    ``p = clamp_min(softmax(z.view(N, S, K) / t, dim=-1), eps)`` viewed back as ``(N, D)``;
    no clamp when ``eps == 0`` (the default here; the loss clamps at 1e-8). Computes in
    float32 (float64 for float64 inputs).

    Args:
        z: ``(N, D)`` features, ``D`` a multiple of ``segment_dim``.
        segment_dim: Segment size ``K`` (paper: 80).
        temperature: Softmax temperature ``t > 0``.
        eps: Lower clamp of the probabilities, ``0 <= eps < 1``.

    Returns:
        ``(N, D)`` probabilities; each segment sums to 1 (before the clamp).

    Example:
        >>> import torch
        >>> from music_loss import segment_softmax
        >>> p = segment_softmax(torch.randn(4, 6), segment_dim=3)
        >>> torch.allclose(p.view(4, 2, 3).sum(-1), torch.ones(4, 2))
        True
    """
    config = make_config(segment_dim, temperature=temperature, eps=eps)
    check_view("z", z, config.segment_dim)
    return reference.segment_softmax_reference(z, config.segment_dim, config.temperature,
                                               config.eps)


def joint_entropy_terms(p1: Tensor, p2: Tensor, segment_dim: int = 80) -> tuple[Tensor, Tensor]:
    """Raw entropy sums of the joint distribution ``P = p1^T p2 / N`` (materialises ``P``).

    ``H_diag = sum_a P[a,a] lg P[a,a]`` and ``H_off = sum_{seg(a) != seg(b)} P[a,b] lg P[a,b]``
    with ``lg(x) = log(max(x, tiny))``. Entries inside diagonal blocks off the diagonal are
    not used. For the loss itself use :func:`music_loss`, which never builds ``P`` on its
    fast paths.

    Args:
        p1: ``(N, D)`` segment probabilities of the first view.
        p2: ``(N, D)`` segment probabilities of the second view.
        segment_dim: Segment size ``K`` (paper: 80).

    Returns:
        ``(H_diag, H_off)``, two scalars (both <= 0).

    Example:
        >>> import torch
        >>> from music_loss import segment_softmax
        >>> from music_loss.functional import joint_entropy_terms
        >>> p = segment_softmax(torch.randn(8, 6), segment_dim=3)
        >>> h_diag, h_off = joint_entropy_terms(p, p, segment_dim=3)
        >>> bool(h_diag <= 0) and bool(h_off <= 0)
        True
    """
    check_segment_dim(segment_dim)
    check_pair(p1, p2, segment_dim, min_rows=1)
    p1c = p1.to(compute_dtype(p1.dtype))
    p2c = p2.to(p1c.dtype)
    return reference.joint_entropy_terms_reference(p1c, p2c, segment_dim)


def invariance_term(p1: Tensor, p2: Tensor, segment_dim: int = 80) -> Tensor:
    """Transform-invariance term ``L_inv = -(1/(N S)) sum_{i,s} lg(sum_k p1[i,s,k] p2[i,s,k])``.

    Args:
        p1: ``(N, D)`` segment probabilities of the first view.
        p2: ``(N, D)`` segment probabilities of the second view.
        segment_dim: Segment size ``K`` (paper: 80).

    Returns:
        A scalar >= 0; 0 when both views put all mass on the same bin of every segment.

    Example:
        >>> import torch
        >>> from music_loss.functional import invariance_term
        >>> p = torch.eye(3).repeat(1, 2)        # 3 samples, 2 one-hot segments of 3 bins
        >>> float(invariance_term(p, p, segment_dim=3))
        -0.0
    """
    check_segment_dim(segment_dim)
    check_pair(p1, p2, segment_dim, min_rows=1)
    p1c = p1.to(compute_dtype(p1.dtype))
    return reference.invariance_term_reference(p1c, p2.to(p1c.dtype), segment_dim)


@overload
def music_loss(
    z1: Tensor,
    z2: Tensor,
    segment_dim: int = ...,
    *,
    temperature: float = ...,
    eps: float = ...,
    diag_weight: float = ...,
    off_weight: float = ...,
    invariance_weight: float = ...,
    normalization: Normalization = ...,
    gather_distributed: bool = ...,
    process_group: Any = ...,
    backend: Backend = ...,
    precision: Precision = ...,
    return_terms: Literal[False] = ...,
    check_finite: bool = ...,
    chunk_size: int | None = ...,
    uneven_batches: bool = ...,
    shard: bool = ...,
) -> Tensor: ...


@overload
def music_loss(
    z1: Tensor,
    z2: Tensor,
    segment_dim: int = ...,
    *,
    temperature: float = ...,
    eps: float = ...,
    diag_weight: float = ...,
    off_weight: float = ...,
    invariance_weight: float = ...,
    normalization: Normalization = ...,
    gather_distributed: bool = ...,
    process_group: Any = ...,
    backend: Backend = ...,
    precision: Precision = ...,
    return_terms: Literal[True],
    check_finite: bool = ...,
    chunk_size: int | None = ...,
    uneven_batches: bool = ...,
    shard: bool = ...,
) -> MUSICTerms: ...


@overload
def music_loss(
    z1: Tensor,
    z2: Tensor,
    segment_dim: int = ...,
    *,
    temperature: float = ...,
    eps: float = ...,
    diag_weight: float = ...,
    off_weight: float = ...,
    invariance_weight: float = ...,
    normalization: Normalization = ...,
    gather_distributed: bool = ...,
    process_group: Any = ...,
    backend: Backend = ...,
    precision: Precision = ...,
    return_terms: bool = ...,
    check_finite: bool = ...,
    chunk_size: int | None = ...,
    uneven_batches: bool = ...,
    shard: bool = ...,
) -> Tensor | MUSICTerms: ...


def music_loss(
    z1: Tensor,
    z2: Tensor,
    segment_dim: int = 80,
    *,
    temperature: float = 1.0,
    eps: float = 1e-8,
    diag_weight: float = 1.0,
    off_weight: float = 1.0,
    invariance_weight: float = 1.0,
    normalization: Normalization = "blocks",
    gather_distributed: bool = False,
    process_group: Any = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
    return_terms: bool = False,
    check_finite: bool = False,
    chunk_size: int | None = None,
    uneven_batches: bool = False,
    shard: bool = True,
) -> Tensor | MUSICTerms:
    r"""MUSIC loss (Multi-Segmental Informational Coding) of two views of a batch.

    With ``p = clamp_min(softmax(z.view(N, S, K) / t), eps)`` per segment,
    ``P = p1^T p2 / N`` (``D x D``) and ``lg(x) = log(max(x, tiny))``::

        H_diag = sum_a P[a,a] lg P[a,a]
        H_off  = sum_{seg(a) != seg(b)} P[a,b] lg P[a,b]
        L_inv  = -(1 / (n S)) sum_{i,s} lg(sum_k p1[i,s,k] p2[i,s,k])     (local batch)
        blocks: L = w_diag H_diag / S + w_off H_off / (S (S-1)) + w_inv L_inv   (paper Eq. 5)
        joint:  L = (w_diag H_diag + w_off H_off) / S**2 + w_inv L_inv          (paper Eq. 3)

    The loss is a statistic of the whole batch: it cannot be accumulated over micro-batches.
    To grow the batch across GPUs use ``gather_distributed=True``.

    Args:
        z1: ``(N, D)`` projector output of the first view; ``D = S * segment_dim``.
        z2: ``(N, D)`` projector output of the second view.
        segment_dim: Bins per segment ``K`` (paper: 80).
        temperature: Softmax temperature ``t > 0``.
        eps: Lower clamp of the probabilities (``0`` disables it).
        diag_weight: Weight of the diagonal entropy term.
        off_weight: Weight of the off-diagonal-block entropy term.
        invariance_weight: Weight ``lambda`` of the transform-invariance term.
        normalization: ``"blocks"`` (Eq. 5, default) or ``"joint"`` (Eq. 3).
        gather_distributed: All-gather both views across the process group (with gradient)
            so the entropy terms see the global batch; the invariance term stays local.
        process_group: Group for ``gather_distributed`` (the default group when ``None``).
        backend: ``"auto"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (memory-light PyTorch) or ``"reference"`` (materialises ``P``).
        precision: Matmul operands: ``"auto"``, ``"ieee"``, ``"tf32"`` or ``"bf16"``
            (fp32 accumulation always). ``backend="reference"`` rounds its operands the same
            way when the precision is named, and stays exact under ``"auto"``; ``"tf32"``
            changes nothing on CPU, which has no tf32.
        return_terms: Return :class:`MUSICTerms` ``(loss, diag, off, invariance)``; on every
            backend only ``loss`` carries a gradient, the parts are detached logging values.
        check_finite: Raise if ``z1``/``z2`` hold NaN or inf (eager: a host sync; under
            ``torch.compile``: a device-side assertion). With ``gather_distributed`` every
            rank raises when any rank's views are non-finite. Otherwise a NaN or ``+inf``
            input gives a NaN loss, never a finite wrong one.
        chunk_size: Rows of ``P`` per block (``torch`` backend) or per chunk of the fused
            gradient products (``triton``); chosen from the shapes when ``None``. Smaller
            saves workspace memory, larger moves fewer bytes (see docs/backends).
        uneven_batches: With ``gather_distributed``, allow ranks to hold different (non-zero)
            batch sizes ``n_r``. Each rank then returns the global entropy part plus its own
            invariance term weighted by ``n_r W / N``, so the mean of the ranks' losses and
            DDP's averaged gradients equal one process on the concatenated batch. By default
            every rank must hold the same number of rows (as DDP with ``drop_last=True`` or a
            ``DistributedSampler`` gives). Either way the ranks exchange their sizes at every
            call and a mismatch raises the same clear error on every rank.
        shard: With ``gather_distributed``, split the work on ``P`` across the ranks:
            each computes the entropy entries of its own rows of ``P`` (``6 N D^2 / W``
            FLOPs instead of ``6 N D^2``), with the same values and gradients as
            ``shard=False`` (every rank computing all of ``P``). Ignored without
            ``gather_distributed``.

    Raises:
        ValueError: On a bad input or hyperparameter; with ``gather_distributed``, on every
            rank alike when any rank's inputs are bad (see docs/distributed).
        RuntimeError: On a double backward (``create_graph=True`` through the loss) with a
            backend other than ``"reference"``: those compute first derivatives only.
        NotImplementedError: Under ``torch.func`` transforms with a backend other than
            ``"reference"``.

    Returns:
        The scalar loss (float32; float64 for float64 inputs), or :class:`MUSICTerms`.

    Example:
        >>> import torch
        >>> from music_loss.functional import music_loss
        >>> z1, z2 = torch.randn(32, 160), torch.randn(32, 160)
        >>> loss = music_loss(z1, z2, segment_dim=80)
        >>> terms = music_loss(z1, z2, segment_dim=80, return_terms=True)
        >>> torch.allclose(terms.loss, terms.diag + terms.off + terms.invariance)
        True
    """
    config = make_config(segment_dim, temperature, eps, diag_weight, off_weight,
                         invariance_weight, normalization)
    terms = loss_with_config(
        z1, z2, config, gather_distributed=gather_distributed, process_group=process_group,
        backend=check_backend(backend), precision=check_precision(precision),
        check_finite=check_flag("check_finite", check_finite),
        chunk_size=check_chunk_size(chunk_size),
        uneven_batches=check_flag("uneven_batches", uneven_batches),
        shard=check_flag("shard", shard))
    return terms if return_terms else terms.loss


def loss_with_config(
    z1: Tensor,
    z2: Tensor,
    config: LossConfig,
    *,
    gather_distributed: bool,
    process_group: Any,
    backend: Backend,
    precision: Precision,
    check_finite: bool,
    chunk_size: int | None,
    uneven_batches: bool,
    shard: bool = True,
) -> MUSICTerms:
    """:func:`music_loss` with hyperparameters already validated (``MUSICLoss`` holds them):
    check the views, gather them if asked, dispatch.

    With ``gather_distributed``, every rank first agrees on its peers' inputs
    (:func:`music_loss.distributed.agree`): an error that depends on one rank's data reaches
    every rank at the same point, as the same clear error, before any other collective.
    """
    if not gather_distributed:
        check_pair(z1, z2, config.segment_dim, min_rows=2)
        check_not_under_functorch(backend, z1, z2)
        if check_finite:
            check_finite_values(z1, z2)
        return run_backend(z1, z2, config, None, backend, precision, chunk_size)

    check_process_group()
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor):
        check_pair(z1, z2, config.segment_dim)  # raises: a programming error on every rank
    local_error: Exception | None = None
    try:
        check_pair(z1, z2, config.segment_dim, min_rows=0)
        check_not_under_functorch(backend, z1, z2)
    except (ValueError, TypeError, NotImplementedError) as err:
        if torch.compiler.is_compiling():
            raise
        local_error = err
    agreement = agree(z1, z2, local_error, check_finite=check_finite, uneven=uneven_batches,
                      group=process_group)
    local_rows = agreement.local_rows
    if len(set(agreement.sizes)) > 1:
        # Each rank's invariance term is a mean over its own n_r rows; weighted by
        # n_r W / N, the mean over ranks is the mean over all N rows, as in one process.
        n_global, world = sum(agreement.sizes), len(agreement.sizes)
        share = agreement.sizes[agreement.rank] * world / n_global
        config = dataclasses.replace(config, invariance_weight=config.invariance_weight * share)
    dim = z1.shape[1]
    if z1.requires_grad == z2.requires_grad:
        both = gather_agreed(torch.cat([z1, z2], dim=1), agreement, process_group)
        z1, z2 = both[:, :dim], both[:, dim:]
    else:
        # A stop-gradient view gathers on its own, without gradient: the backend then skips
        # its gradient product and the backward has no reduce-scatter for it.
        z1 = gather_agreed(z1, agreement, process_group)
        z2 = gather_agreed(z2, agreement, process_group)
    if shard:
        return _sharded(z1, z2, config, local_rows, process_group, backend, precision,
                        chunk_size)
    return run_backend(z1, z2, config, local_rows, backend, precision, chunk_size)


def _sharded(
    z1: Tensor,
    z2: Tensor,
    config: LossConfig,
    local_rows: tuple[int, int],
    process_group: Any,
    backend: Backend,
    precision: Precision,
    chunk_size: int | None,
) -> MUSICTerms:
    """This rank's share of the entropy on the gathered views, plus its invariance.

    The backend runs with the entropy weights times ``W`` on this rank's rows of ``P``: its
    loss carries the gradient ``W x own entropy share + own invariance``, so the
    reduce-scatter of the gather's backward followed by DDP's mean over ranks gives the
    single-process gradient. The value returned is the global entropy (the ranks' partial
    sums, all-reduced and detached) plus this rank's invariance, as with ``shard=False``.
    """
    world = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    k = config.segment_dim
    s0, s1 = owned_segments(z1.shape[1] // k, rank, world)
    scaled = dataclasses.replace(config, diag_weight=config.diag_weight * world,
                                 off_weight=config.off_weight * world)
    terms = run_backend(z1, z2, scaled, local_rows, backend, precision, chunk_size,
                        p_rows=(s0 * k, s1 * k))
    diag, off = sum_over_ranks(torch.stack([terms.diag, terms.off]) / world, process_group)
    value = diag + off + terms.invariance
    # Value of the global loss, gradient of this rank's share (x - x.detach() is exactly 0).
    loss = value + (terms.loss - terms.loss.detach())
    return MUSICTerms(loss, diag, off, terms.invariance)

