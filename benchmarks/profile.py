"""Phase-by-phase timing of the fused path on a GPU (for tuning; the benchmark suite in
``benchmarks/`` is where results against peers live).

Usage (GPU machine)::

    python -m benchmarks.profile --n 2048 --d 8160 --k 80 --precision tf32 bf16 \\
        --json kernels_profile.json

Prints, per precision: milliseconds of the softmax forward, the joint pass without and
with the gradient products, the backward kernel, the whole forward+backward, the matmul
floor (the same three ``N x D x D`` products by ``torch.matmul`` at the same precision), the
achieved TFLOP/s counting ``6 N D^2``, the extra peak memory, and the configs the
autotuners picked (:func:`chosen_configs`). Under
``TRITON_INTERPRET=1`` it runs on CPU tensors (a smoke check: the timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from music_loss._config import LossConfig
from music_loss.kernels import music_loss_triton
from music_loss.kernels._common import INTERPRET, emulate_tensor_cores, operand_dtype
from music_loss.kernels.launchers import (
    AUTOTUNERS,
    JointPlan,
    joint_entropy_pass,
    music_loss_backward,
    softmax_forward,
)


def chosen_configs(precision: str | None = None) -> dict[str, list[str]]:
    """The configs the GPU autotuners have picked so far, per tuner: ``str(config)`` of each
    tuning key's choice (keys of ``precision`` only, when given). Empty under the
    interpreter, which does not autotune. Recorded with each profile, so a GPU run shows
    which tiles win on its card.

    Example:
        >>> isinstance(chosen_configs("tf32"), dict)
        True
    """
    chosen = {}
    for name, tuner in AUTOTUNERS.items():
        picks = sorted({str(config) for key, config in getattr(tuner, "cache", {}).items()
                        if precision is None or precision in key})
        if picks:
            chosen[name] = picks
    return chosen


def _timer(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def _matmul_floor(p1: torch.Tensor, p2: torch.Tensor, precision: str) -> Callable[[], Any]:
    """The three products by torch.matmul at the same operand precision."""
    if precision == "bf16":
        a, b = p1.to(torch.bfloat16), p2.to(torch.bfloat16)
    else:
        a, b = p1.float(), p2.float()

    def run() -> Any:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            joint = a.T @ b
            return b @ joint.T, a @ joint
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    return run


def profile(n: int, d: int, k: int, precision: str, repeats: int = 5,
            device: str | None = None) -> dict[str, Any]:
    """Time each phase at one shape and precision; returns a JSON-ready dict.

    Example:
        >>> import os
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     row = profile(16, 40, 20, "ieee", repeats=1)
        ...     assert row["fused_fwd_bwd_ms"] > 0
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not INTERPRET
                                  else "cpu"))
    gen = torch.Generator(device=dev).manual_seed(0)
    z1 = torch.randn(n, d, device=dev, generator=gen)
    z2 = z1 + torch.randn(n, d, device=dev, generator=gen)
    config = LossConfig(segment_dim=k)
    c_diag, c_off = config.coefficients(d)
    out_dtype = operand_dtype(precision)
    round_bf16 = precision == "bf16" and emulate_tensor_cores()
    round_tf32 = precision == "tf32"
    p1, p2, _ = softmax_forward(z1, z2, k, 1.0, 1e-8, out_dtype, None, round_bf16, round_tf32)
    assert p2 is not None
    with_grad = JointPlan(k, c_off, precision, grads=(True, True))
    sums_only = JointPlan(k, c_off, precision)
    joint = joint_entropy_pass(p1, p2, with_grad)
    grad_terms = torch.tensor([1.0, 0, 0, 0], device=dev)
    rows = (0, n)

    def fused() -> None:
        a = z1.detach().requires_grad_(True)
        b = z2.detach().requires_grad_(True)
        music_loss_triton(a, b, config, None, precision).loss.backward()

    row: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
        "n": n, "d": d, "k": k, "precision": precision,
        "softmax_fwd_ms": _timer(lambda: softmax_forward(z1, z2, k, 1.0, 1e-8, out_dtype, None,
                                                         round_bf16, round_tf32),
                                 dev, repeats),
        "joint_no_grad_ms": _timer(lambda: joint_entropy_pass(p1, p2, sums_only),
                                   dev, repeats),
        "joint_with_grad_ms": _timer(lambda: joint_entropy_pass(p1, p2, with_grad),
                                     dev, repeats),
        "backward_kernel_ms": _timer(lambda: music_loss_backward(
            z1, z2, joint.dp1, joint.dp2, joint.p_diag, grad_terms, k, 1.0, 1e-8, c_diag,
            -1.0 / (n * (d // k)), rows, True), dev, repeats),
        "matmul_floor_ms": _timer(_matmul_floor(p1, p2, precision), dev, repeats),
    }
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    row["fused_fwd_bwd_ms"] = _timer(fused, dev, repeats)
    if dev.type == "cuda":
        row["extra_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    row["autotuned"] = chosen_configs(precision)
    flops = 6 * n * d * d
    row["fused_tflops"] = flops / (row["fused_fwd_bwd_ms"] * 1e-3) / 1e12
    row["fused_over_floor"] = row["fused_fwd_bwd_ms"] / row["matmul_floor_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=8160)
    parser.add_argument("--k", type=int, default=80)
    parser.add_argument("--precision", nargs="+", default=["tf32", "bf16"],
                        choices=["ieee", "tf32", "bf16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for precision in args.precision:
        row = profile(args.n, args.d, args.k, precision, args.repeats)
        rows.append(row)
        print(" ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
