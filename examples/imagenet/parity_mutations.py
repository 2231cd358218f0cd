"""Test-only wrong gradients for ``check_parity.py``: each must make a parity leg FAIL.

A parity check that cannot fail proves nothing. ``check_parity.py --mutation NAME`` swaps
``pretrain.py``'s criterion, in the runs under test only (never in the reference runs), for
one of these deliberately wrong versions, chosen through the environment variable
:data:`MUTATION_ENV` so the torchrun / Triton worker processes pick it up too. Nothing
here touches the library: every mutation wraps it from outside.

* ``grad-x1.01``: both views' gradient x1.01 (a 1 % error), around any criterion and backend
  (the fused Triton path, Barlow Twins, VICReg, MUSIC);
* ``view1-grad-x1.01``: the first view's gradient x1.01;
* ``raise``: the criterion raises: an exception in a leg must be a FAIL, never a skip;
* MUSIC only, a re-implementation of the loss from ``music_loss.reference``'s pieces whose
  forward value is exact but whose backward is wrong in one place:
  ``diag-plus-one-dropped`` (``P lg(P).detach()`` on the diagonal: gradient ``lg P`` instead
  of ``1 + lg P``), ``invariance-grad-x0.99``, ``off-grad-x0.99``; and ``reimplemented``, the
  same re-implementation unmutated (a control that must PASS).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from music_loss._config import LossConfig
from music_loss.reference import (
    block_masks,
    invariance_term_reference,
    lg,
    segment_softmax_reference,
)

#: The environment variable that selects a mutation in every process of a run.
MUTATION_ENV = "MUSIC_PARITY_MUTATION"

#: Mutation name -> what it breaks (printed in the mutation table).
MUTATIONS = {
    "grad-x1.01": "both views' gradient x1.01 (any criterion, any backend)",
    "view1-grad-x1.01": "first view's gradient x1.01",
    "diag-plus-one-dropped": "MUSIC: diagonal entries' gradient lg P instead of 1 + lg P",
    "invariance-grad-x0.99": "MUSIC: invariance term's gradient x0.99",
    "off-grad-x0.99": "MUSIC: off-block entropy term's gradient x0.99",
    "raise": "the criterion raises RuntimeError (an exception must FAIL)",
    "reimplemented": "MUSIC re-implemented for the mutations, unmutated (control: PASS)",
}
_STRUCTURAL = ("diag-plus-one-dropped", "invariance-grad-x0.99", "off-grad-x0.99",
               "reimplemented")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged forward, its gradient times ``scale`` backward.

    Example:
        >>> x = torch.ones(2, dtype=torch.float64, requires_grad=True)
        >>> scale_grad(x, 1.01).sum().backward()
        >>> x.grad.tolist()
        [1.01, 1.01]
    """
    return _ScaleGrad.apply(x, scale)


def music_terms_mutated(z1: Tensor, z2: Tensor, config: LossConfig,
                        mutation: str) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss (one process), exact forward, one wrong piece of backward.

    Example:
        >>> from music_loss.functional import music_loss
        >>> z1, z2 = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)
        >>> loss, _ = music_terms_mutated(z1, z2, LossConfig(4), "diag-plus-one-dropped")
        >>> bool(torch.isclose(loss, music_loss(z1, z2, 4, backend="reference")))
        True
    """  # noqa: E501
    p1 = segment_softmax_reference(z1, config.segment_dim, config.temperature, config.eps)
    p2 = segment_softmax_reference(z2, config.segment_dim, config.temperature, config.eps)
    n, d = p1.shape
    joint = p1.T @ p2 / n
    log_joint = lg(joint)
    diag_mask, off_mask = block_masks(d, config.segment_dim, joint.device)
    diag_log = log_joint.detach() if mutation == "diag-plus-one-dropped" else log_joint
    h_diag = (joint * diag_log * diag_mask).sum()
    h_off = (joint * log_joint * off_mask).sum()
    c_diag, c_off = config.coefficients(d)
    diag = c_diag * h_diag
    off = c_off * h_off
    inv = config.invariance_weight * invariance_term_reference(p1, p2, config.segment_dim)
    if mutation == "off-grad-x0.99":
        off = scale_grad(off, 0.99)
    if mutation == "invariance-grad-x0.99":
        inv = scale_grad(inv, 0.99)
    return diag + off + inv, {"diag": diag, "off": off, "invariance": inv}


def mutated_criterion_class(base: type) -> type:
    """A subclass of ``imagenet_losses.Criterion`` applying the mutation named in the env."""
    mutation = os.environ.get(MUTATION_ENV, "")
    if mutation not in MUTATIONS:
        raise ValueError(f"{MUTATION_ENV}={mutation!r}: expected one of {sorted(MUTATIONS)}")

    class MutatedCriterion(base):  # type: ignore[misc, valid-type]
        def __init__(self, name: str, **kwargs: Any) -> None:
            super().__init__(name, **kwargs)
            if mutation in _STRUCTURAL:
                if name != "music" or self.music is None or self.music.gather_distributed:
                    raise ValueError(f"mutation {mutation} applies to one-process MUSIC runs")
                self.config = LossConfig(kwargs.get("segment_dim", 80),
                                         temperature=kwargs.get("temperature", 1.0),
                                         invariance_weight=kwargs.get("invariance_weight", 1.0),
                                         normalization=kwargs.get("normalization", "blocks"))

        def __call__(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            if mutation == "raise":
                raise RuntimeError("injected failure (mutation 'raise')")
            if mutation in _STRUCTURAL:
                return music_terms_mutated(z1, z2, self.config, mutation)
            if mutation == "grad-x1.01":
                z1, z2 = scale_grad(z1, 1.01), scale_grad(z2, 1.01)
            elif mutation == "view1-grad-x1.01":
                z1 = scale_grad(z1, 1.01)
            return super().__call__(z1, z2)

    return MutatedCriterion
