"""The benchmark's peers: what each one computes, its FLOP count, and its float64 check.

Every peer is a callable on two views ``z1, z2`` of shape ``(N, D)`` (the ``matmul-floor``
works on the segment probabilities instead and runs the three dense products that any exact
MUSIC forward+backward must do). Before a peer is timed, :func:`check_peer` compares its value
and gradient on a small case with the same formula in float64 (compiled code can drift from
float64, and being fast is worth nothing if the number is wrong).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from benchmarks.baselines import barlow_twins_loss, vicreg_loss
from music_loss._config import LossConfig
from music_loss.reference import music_loss_reference

MODES: tuple[str, ...] = ("forward", "forward+backward")
PRECISION_DTYPE: dict[str, torch.dtype] = {
    "ieee": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
}
#: Tolerances of the float64 check, per precision: (loss relative error, gradient relative
#: Frobenius error). ieee float32 must be close to float64; tf32 (10-bit mantissa) and bf16
#: (8-bit) operands only have to be in the right place, and the measured errors are recorded.
CHECK_TOLERANCE: dict[str, tuple[float, float]] = {
    "ieee": (1e-5, 1e-4), "tf32": (1e-2, 5e-2), "bf16": (5e-2, 2.5e-1),
}
#: The small case of the float64 check: 3 segments of 80 bins, odd batch.
CHECK_SHAPE: tuple[int, int, int] = (61, 240, 80)

LossFn = Callable[[Tensor, Tensor, int, str], Tensor]


@dataclass(frozen=True)
class Peer:
    """One benchmarked method.

    Attributes:
        name: Name in the results (``music-torch``, ``barlow-twins``, ...).
        loss: ``loss(z1, z2, segment_dim, precision) -> scalar``; ``None`` for the floor.
        oracle: The same formula, run in float64 for the check.
        flops_forward: FLOPs of the dense products in forward, in units of ``N D^2``.
        flops_backward: Same for forward+backward.
        dd_buffers: Rough count of ``D x D`` float32 buffers alive at the peak of
            forward+backward, to skip cases that cannot fit (0 for O(N D) peers).
        description: One line for the tables.
    """

    name: str
    loss: LossFn | None
    oracle: Callable[[Tensor, Tensor, int], Tensor] | None
    flops_forward: float
    flops_backward: float
    dd_buffers: float
    description: str

    def flops(self, n: int, d: int, mode: str) -> float:
        """Dense-product FLOPs of one call: ``factor * N * D^2``."""
        factor = self.flops_forward if mode == "forward" else self.flops_backward
        return factor * n * d * d


def _music(backend: str) -> LossFn:
    def run(z1: Tensor, z2: Tensor, segment_dim: int, precision: str) -> Tensor:
        from music_loss.functional import music_loss

        return music_loss(z1, z2, segment_dim, backend=backend, precision=precision)

    return run


def _music_oracle(z1: Tensor, z2: Tensor, segment_dim: int) -> Tensor:
    return music_loss_reference(z1, z2, LossConfig(segment_dim)).loss


def _compiled_reference() -> LossFn:
    """``torch.compile(fullgraph=True)`` of the reference; a fresh compile per (shape, dtype)."""
    cache: dict[Any, Callable[[Tensor, Tensor], Tensor]] = {}

    def raise_recompile_limit() -> None:
        # Every (shape, dtype) is one more compile of the same code object: past dynamo's
        # limit (8) it would silently run eagerly, and be timed under the wrong name.
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))

    def run(z1: Tensor, z2: Tensor, segment_dim: int, precision: str) -> Tensor:
        key = (segment_dim, z1.shape, z1.dtype, z1.device)
        if key not in cache:
            raise_recompile_limit()
            config = LossConfig(segment_dim)

            def reference_loss(a: Tensor, b: Tensor) -> Tensor:
                return music_loss_reference(a, b, config).loss

            # A new function object per key, static shapes: no silent fallback to eager
            # after dynamo's recompile limit, no dynamic-shape kernels.
            cache[key] = torch.compile(reference_loss, fullgraph=True, dynamic=False)
        return cache[key](z1, z2)

    return run


def _barlow(z1: Tensor, z2: Tensor, segment_dim: int, precision: str = "ieee") -> Tensor:
    return barlow_twins_loss(z1, z2)


def _vicreg(z1: Tensor, z2: Tensor, segment_dim: int, precision: str = "ieee") -> Tensor:
    return vicreg_loss(z1, z2)


def _barlow_light(z1: Tensor, z2: Tensor, segment_dim: int, precision: str = "ieee") -> Tensor:
    from music_loss.baselines import barlow_twins_loss as light

    return light(z1, z2)


def _vicreg_light(z1: Tensor, z2: Tensor, segment_dim: int, precision: str = "ieee") -> Tensor:
    from music_loss.baselines import vicreg_loss as light

    return light(z1, z2)


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("music-triton", _music("triton"), _music_oracle, 2, 6, 0,
             "MUSIC, fused Triton kernels (backend='triton')"),
        Peer("music-torch", _music("torch"), _music_oracle, 2, 6, 0,
             "MUSIC, memory-light PyTorch path (backend='torch')"),
        Peer("music-reference", _music("reference"), _music_oracle, 2, 6, 12,
             "MUSIC, materialising reference (backend='reference'), eager"),
        Peer("music-reference-compiled", _compiled_reference(), _music_oracle, 2, 6, 12,
             "MUSIC reference under torch.compile(fullgraph=True)"),
        Peer("barlow-twins", _barlow, _barlow, 2, 6, 6,
             "Barlow Twins loss (official formula, lambda=0.0051)"),
        Peer("vicreg", _vicreg, _vicreg, 4, 8, 8,
             "VICReg loss (official formula, 25/25/1)"),
        # Checked against the official formulas above, in float64.
        Peer("barlow-twins-light", _barlow_light, _barlow, 2, 6, 0,
             "Barlow Twins, memory-light (music_loss.baselines, blocks of rows)"),
        Peer("vicreg-light", _vicreg_light, _vicreg, 4, 8, 0,
             "VICReg, memory-light (music_loss.baselines, blocks of rows)"),
        Peer("matmul-floor", None, None, 2, 6, 1,
             "the three N x D x D products alone (torch.matmul)"),
    )
}


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why a peer cannot run on ``device`` (``None`` when it can)."""
    if name == "music-triton":
        if device.type != "cuda":
            return "no CUDA: the Triton kernels run on NVIDIA GPUs"
        try:
            from music_loss.kernels import music_loss_triton  # noqa: F401
        except ImportError as err:
            return f"music_loss.kernels.music_loss_triton does not import ({err})"
    if name == "music-torch":
        try:
            from music_loss.torch_backend import music_loss_torch  # noqa: F401
        except ImportError as err:
            return f"music_loss.torch_backend does not import ({err})"
    if name == "music-reference-compiled" and device.type == "cpu":
        import shutil

        if shutil.which("g++") is None and shutil.which("c++") is None:
            return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return None


def set_matmul_precision(precision: str) -> None:
    """``ieee`` -> "highest"; ``tf32`` and ``bf16`` -> "high" (float32 matmuls use TF32)."""
    torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")


def random_views(n: int, d: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two correlated views (a shared signal plus noise), as an encoder would produce.

    Drawn on ``device`` in its compute dtype (float64 stays float64), then cast.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    shared = torch.randn(n, d, generator=gen, dtype=work, device=device)
    z1 = shared + 0.5 * torch.randn(n, d, generator=gen, dtype=work, device=device)
    z2 = shared.add_(0.5 * torch.randn(n, d, generator=gen, dtype=work, device=device))
    return z1.to(dtype), z2.to(dtype)


def segment_probabilities(z: Tensor, segment_dim: int) -> Tensor:
    """Per-segment softmax, the operands of the matmul floor."""
    n, d = z.shape
    return torch.softmax(z.float().view(n, d // segment_dim, segment_dim), -1).view(n, d)


def floor_products(a: Tensor, b: Tensor, mode: str) -> tuple[Tensor, ...]:
    """``P = a^T b`` (forward) and, for forward+backward, ``b P^T`` and ``a P`` (the two
    gradient products, with ``P`` standing in for the ``D x D`` gradient weights)."""
    joint = torch.matmul(a.T, b)
    if mode == "forward":
        return (joint,)
    return joint, torch.matmul(b, joint.T), torch.matmul(a, joint)


def relative_error(value: Tensor, expected: Tensor) -> float:
    """``||value - expected||_F / ||expected||_F`` in float64 (absolute when expected is 0)."""
    diff = float(torch.linalg.vector_norm((value.double() - expected.double()).flatten()))
    scale = float(torch.linalg.vector_norm(expected.double().flatten()))
    return diff / scale if scale > 0 else diff


@dataclass
class CheckResult:
    """Outcome of the float64 check of one peer at one device and precision."""

    value_rel_err: float
    grad_rel_err: float
    passed: bool
    tolerance: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return {"check_value_rel_err": self.value_rel_err,
                "check_grad_rel_err": self.grad_rel_err, "check_passed": self.passed}


def check_peer(name: str, device: torch.device, precision: str,
               shape: tuple[int, int, int] = CHECK_SHAPE) -> CheckResult:
    """Compare a peer's value and gradient at ``precision`` with its formula in float64.

    For a loss: the loss value (relative error) and the gradient with respect to both views
    (relative Frobenius norm). For the matmul floor: ``P`` and the two gradient products.

    Example:
        >>> check_peer("barlow-twins", torch.device("cpu"), "ieee").passed
        True
    """
    n, d, k = shape
    peer = PEERS[name]
    dtype = PRECISION_DTYPE[precision]
    tol = CHECK_TOLERANCE[precision]
    z1_64, z2_64 = random_views(n, d, torch.float64, torch.device("cpu"), seed=1234)
    set_matmul_precision(precision)
    if peer.loss is None:
        # float32 probabilities, exactly representable in float64: both sides get the same
        # operands, so the error is the products' alone.
        a64 = segment_probabilities(z1_64, k).double()
        b64 = segment_probabilities(z2_64, k).double()
        expected = floor_products(a64, b64, "forward+backward")
        got = floor_products(a64.to(device, dtype), b64.to(device, dtype), "forward+backward")
        value_err = relative_error(got[0].cpu(), expected[0])
        grad_err = max(relative_error(g.cpu(), e) for g, e in zip(got[1:], expected[1:]))
    else:
        assert peer.oracle is not None
        x1, x2 = z1_64.clone().requires_grad_(), z2_64.clone().requires_grad_()
        expected_loss = peer.oracle(x1, x2, k)
        expected_grads = torch.autograd.grad(expected_loss, (x1, x2))
        y1 = z1_64.to(device, dtype).requires_grad_()
        y2 = z2_64.to(device, dtype).requires_grad_()
        loss = peer.loss(y1, y2, k, precision)
        grads = torch.autograd.grad(loss, (y1, y2))
        value_err = relative_error(loss.detach().cpu(), expected_loss.detach())
        grad_err = relative_error(torch.cat([g.cpu().flatten() for g in grads]),
                                  torch.cat([g.flatten() for g in expected_grads]))
    passed = (math.isfinite(value_err) and math.isfinite(grad_err)
              and value_err <= tol[0] and grad_err <= tol[1])
    return CheckResult(value_err, grad_err, passed, tol)
