"""LARS and the warm-up + cosine learning-rate schedule of the paper's recipe (section 3).

LARS follows the VICReg / Barlow Twins code (facebookresearch/vicreg ``main_vicreg.py``):
weight decay is added to the gradient, the update is scaled by the trust ratio
``eta * ||w|| / ||g + wd w||`` (1 when either norm is 0), then heavy-ball momentum. Biases and
normalisation parameters (the 1-d tensors) get neither weight decay nor the trust ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as in VICReg / Barlow Twins.

    Each parameter group may set ``lars_exclude=True``: no weight decay and no trust ratio
    for its tensors (use :func:`lars_param_groups` for the usual bias/norm split).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (the schedule overwrites it every step).
        weight_decay: Weight decay (paper: 1e-6).
        momentum: Momentum (0.9).
        eta: Trust coefficient (0.001).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.0, eta=0.1)
        >>> w.grad = torch.full((2, 2), 5.0)
        >>> opt.step()
        >>> round(w.data[0, 0].item(), 6)  # 1 - lr eta |w| / |g| g = 1 - 0.1 * 2 / 10 * 5
        0.9
    """

    def __init__(self, params: Iterable[Any], lr: float, weight_decay: float = 1e-6,
                 momentum: float = 0.9, eta: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, "
                             f"eta > 0; got lr={lr}, weight_decay={weight_decay}, "
                             f"momentum={momentum}, eta={eta}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where(
                        param_norm > 0,
                        torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one),
                        one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def lars_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: weights (decay + trust ratio) and biases/norm parameters (neither).

    Example:
        >>> groups = lars_param_groups(torch.nn.Linear(3, 2))
        >>> [len(g["params"]) for g in groups], [g["lars_exclude"] for g in groups]
        ([1, 1], [False, True])
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "lars_exclude": False},
            {"params": [p for p in params if p.ndim <= 1], "lars_exclude": True}]


def peak_learning_rate(batch_size: int, base_lr: float) -> float:
    """The linear scaling rule ``lr = batch / 256 * base_lr`` (paper: 2048 / 256 * 0.6 = 4.8)."""
    return batch_size / 256 * base_lr


def learning_rate(step: int, *, total_steps: int, warmup_steps: int, peak: float,
                  final: float) -> float:
    """Linear warm-up from 0 to ``peak``, then cosine from ``peak`` to ``final`` at the end.

    The form of the VICReg code: ``lr = peak * q + final * (1 - q)``,
    ``q = (1 + cos(pi * t / T)) / 2`` over the steps after the warm-up.

    Example:
        >>> [round(learning_rate(s, total_steps=10, warmup_steps=2, peak=1.0, final=0.0), 3)
        ...  for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    q = 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    return peak * q + final * (1 - q)
