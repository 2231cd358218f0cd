"""Functional MUSIC loss: validate the inputs, then dispatch to a backend.

Data flows one way: :func:`music_loss` -> ``_dispatch`` -> a backend
(``reference`` | ``torch`` (:mod:`music_loss.chunked`) | ``triton`` (:mod:`music_loss.kernels`)).
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor

from music_loss import reference
from music_loss._config import (
    BACKENDS,
    NORMALIZATIONS,
    PRECISIONS,
    LossConfig,
    MUSICTerms,
)
from music_loss._dispatch import resolve_backend, resolve_precision
from music_loss.distributed import gather_rows, is_distributed_ready

__all__ = [
    "MUSICTerms",
    "invariance_term",
    "joint_entropy_terms",
    "make_config",
    "music_loss",
    "segment_softmax",
]


# ---------------------------------------------------------------------------------------
# Validation: every check names the argument and says how to fix it.
# ---------------------------------------------------------------------------------------
def _check_segment_dim(segment_dim: Any) -> int:
    if isinstance(segment_dim, bool) or not isinstance(segment_dim, int):
        raise TypeError(f"segment_dim must be a positive int, got {type(segment_dim).__name__} "
                        f"{segment_dim!r}; pass e.g. segment_dim=80")
    if segment_dim < 1:
        raise ValueError(f"segment_dim must be >= 1, got {segment_dim}; pass e.g. segment_dim=80")
    return segment_dim


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def make_config(
    segment_dim: int,
    temperature: float = 1.0,
    eps: float = 1e-8,
    diag_weight: float = 1.0,
    off_weight: float = 1.0,
    invariance_weight: float = 1.0,
    normalization: str = "blocks",
) -> LossConfig:
    """Validate hyperparameters into a :class:`~music_loss._config.LossConfig`."""
    segment_dim = _check_segment_dim(segment_dim)
    temperature = _check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; the paper uses 1.0")
    eps = _check_real("eps", eps)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}; use the default 1e-8, or 0 for "
                         "no clamp")
    return LossConfig(
        segment_dim=segment_dim,
        temperature=temperature,
        eps=eps,
        diag_weight=_check_real("diag_weight", diag_weight),
        off_weight=_check_real("off_weight", off_weight),
        invariance_weight=_check_real("invariance_weight", invariance_weight),
        normalization=_check_choice("normalization", normalization, NORMALIZATIONS),
    )


def _check_view(name: str, z: Any, segment_dim: int) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got "
                        f"{type(z).__name__}")
    if not z.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {z.dtype}; convert it with {name}.float()")
    if z.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got {tuple(z.shape)}; flatten "
                         f"the features first, e.g. {name}.flatten(1)")
    if z.shape[1] % segment_dim != 0:
        raise ValueError(f"{name}.shape[1] = {z.shape[1]} is not a multiple of segment_dim = "
                         f"{segment_dim}; choose a projector output size D = S * segment_dim "
                         f"(e.g. {max(1, z.shape[1] // segment_dim) * segment_dim}) or a "
                         "segment_dim that divides D")


def _check_pair(z1: Any, z2: Any, segment_dim: int, *, min_rows: int = 2) -> None:
    _check_view("z1", z1, segment_dim)
    _check_view("z2", z2, segment_dim)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}; pass the two views of the same batch")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on the same device, got {z1.device} and "
                         f"{z2.device}; move both with .to(device)")
    if z1.shape[0] < min_rows:
        raise ValueError(f"the batch must hold at least {min_rows} samples, got "
                         f"{z1.shape[0]}; the loss is a statistic of the batch")


def _check_process_group() -> None:
    if not is_distributed_ready():
        raise ValueError("gather_distributed=True needs an initialised process group; call "
                         "torch.distributed.init_process_group first (e.g. under torchrun), "
                         "or pass gather_distributed=False")


def _check_finite(z1: Tensor, z2: Tensor) -> None:
    # Host sync: only when the caller asks for it (check_finite=True).
    if not bool(torch.isfinite(z1).all()) or not bool(torch.isfinite(z2).all()):
        raise ValueError("z1 or z2 contains NaN or inf; check the encoder's output (learning "
                         "rate, mixed-precision overflow) before the loss")


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def segment_softmax(
    z: Tensor, segment_dim: int, temperature: float = 1.0, eps: float = 0.0
) -> Tensor:
    """Softmax over each segment of ``segment_dim`` features, optionally clamped below at eps.

    ``p = clamp_min(softmax(z.view(N, S, K) / t, dim=-1), eps)`` viewed back as ``(N, D)``;
    no clamp when ``eps == 0`` (the default here; the loss clamps at 1e-8). Computes in
    float32 (float64 for float64 inputs).

    Args:
        z: ``(N, D)`` features, ``D`` a multiple of ``segment_dim``.
        segment_dim: Segment size ``K``.
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
    _check_view("z", z, config.segment_dim)
    return reference.segment_softmax_reference(z, config.segment_dim, config.temperature,
                                               config.eps)


def joint_entropy_terms(p1: Tensor, p2: Tensor, segment_dim: int) -> tuple[Tensor, Tensor]:
    """Raw entropy sums of the joint distribution ``P = p1^T p2 / N`` (materialises ``P``).

    ``H_diag = sum_a P[a,a] lg P[a,a]`` and ``H_off = sum_{seg(a) != seg(b)} P[a,b] lg P[a,b]``
    with ``lg(x) = log(max(x, tiny))``. Entries inside diagonal blocks off the diagonal are
    not used. For the loss itself use :func:`music_loss`, which never builds ``P`` on its
    fast paths.

    Args:
        p1: ``(N, D)`` segment probabilities of the first view.
        p2: ``(N, D)`` segment probabilities of the second view.
        segment_dim: Segment size ``K``.

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
    _check_segment_dim(segment_dim)
    _check_pair(p1, p2, segment_dim, min_rows=1)
    p1c = p1.to(reference.compute_dtype(p1.dtype))
    p2c = p2.to(p1c.dtype)
    return reference.joint_entropy_terms_reference(p1c, p2c, segment_dim)


def invariance_term(p1: Tensor, p2: Tensor, segment_dim: int) -> Tensor:
    """Transform-invariance term ``L_inv = -(1/(N S)) sum_{i,s} lg(sum_k p1[i,s,k] p2[i,s,k])``.

    Args:
        p1: ``(N, D)`` segment probabilities of the first view.
        p2: ``(N, D)`` segment probabilities of the second view.
        segment_dim: Segment size ``K``.

    Returns:
        A scalar >= 0; 0 when both views put all mass on the same bin of every segment.

    Example:
        >>> import torch
        >>> from music_loss.functional import invariance_term
        >>> p = torch.eye(3).repeat(1, 2)        # 3 samples, 2 one-hot segments of 3 bins
        >>> float(invariance_term(p, p, segment_dim=3))
        -0.0
    """
    _check_segment_dim(segment_dim)
    _check_pair(p1, p2, segment_dim, min_rows=1)
    p1c = p1.to(reference.compute_dtype(p1.dtype))
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
    normalization: str = ...,
    gather_distributed: bool = ...,
    process_group: Any = ...,
    backend: str = ...,
    precision: str = ...,
    return_terms: Literal[False] = ...,
    check_finite: bool = ...,
    chunk_size: int | None = ...,
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
    normalization: str = ...,
    gather_distributed: bool = ...,
    process_group: Any = ...,
    backend: str = ...,
    precision: str = ...,
    return_terms: Literal[True],
    check_finite: bool = ...,
    chunk_size: int | None = ...,
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
    normalization: str = ...,
    gather_distributed: bool = ...,
    process_group: Any = ...,
    backend: str = ...,
    precision: str = ...,
    return_terms: bool = ...,
    check_finite: bool = ...,
    chunk_size: int | None = ...,
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
    normalization: str = "blocks",
    gather_distributed: bool = False,
    process_group: Any = None,
    backend: str = "auto",
    precision: str = "auto",
    return_terms: bool = False,
    check_finite: bool = False,
    chunk_size: int | None = None,
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
            (fp32 accumulation always).
        return_terms: Return :class:`MUSICTerms` ``(loss, diag, off, invariance)``.
        check_finite: Raise if ``z1``/``z2`` hold NaN or inf (costs a host sync). Otherwise a
            NaN or ``+inf`` input gives a NaN loss, never a finite wrong one.
        chunk_size: Rows of ``P`` per block in the ``torch`` backend (chosen from the shapes
            when ``None``).

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
    _check_choice("backend", backend, BACKENDS)
    _check_choice("precision", precision, PRECISIONS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_pair(z1, z2, config.segment_dim, min_rows=1 if gather_distributed else 2)
    if check_finite:
        _check_finite(z1, z2)

    local_rows: tuple[int, int] | None = None
    if gather_distributed:
        _check_process_group()
        dim = z1.shape[1]
        both, local_rows = gather_rows(torch.cat([z1, z2], dim=1), process_group)
        z1, z2 = both[:, :dim], both[:, dim:]
        if z1.shape[0] < 2:
            raise ValueError(f"the global batch must hold at least 2 samples, got {z1.shape[0]}")

    chosen = resolve_backend(backend, z1)
    mode = resolve_precision(precision, z1)
    if chosen == "reference":
        terms = reference.music_loss_reference(z1, z2, config, local_rows)
    elif chosen == "torch":
        from music_loss.chunked import music_loss_chunked

        terms = music_loss_chunked(z1, z2, config, local_rows, precision=mode,
                                   chunk_size=chunk_size)
    else:
        from music_loss.kernels import music_loss_triton

        terms = music_loss_triton(z1, z2, config, local_rows, precision=mode)
    return terms if return_terms else terms.loss
