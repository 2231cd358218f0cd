"""Check music-loss on this machine's GPU (or CPU): ``python -m music_loss.check``.

Prints the environment, what ``backend="auto"`` picks for each kind of input and why, the
error of every backend and precision that can run here against a float64 reference (forward
and backward, small shapes), and a forward+backward timing against the reference and the
matmul floor. ``--json FILE`` writes it all (keys ``environment`` and ``results``) to attach
to a bug report. Exits 1 if any accuracy check fails.

``--plan-for 7.5`` prints what ``auto`` would pick on a card of that compute capability,
without a GPU (``--json FILE``: ``{"capability": "7.5", "choices": [...]}``).

Examples::

    python -m music_loss.check --json check.json
    python -m music_loss.check --n 1024 --dim 4096 --segment-dim 64
    python -m music_loss.check --plan-for 8.6
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch

from music_loss import _gpu_policy
from music_loss._config import Backend, Precision
from music_loss._dispatch import float32_matmul_mode, triton_unavailable_reason
from music_loss.functional import music_loss


class Tol(NamedTuple):
    loss: float
    grad: float


#: Accuracy targets per matmul precision, float32 inputs, against float64 on the same inputs
#: (the test suite's table; its tests keep the two equal). The loss error is relative to the
#: sum of the parts' sizes, the gradient error is ``||g - g64|| / ||g64||``.
TOLERANCES: dict[str, Tol] = {
    "ieee": Tol(loss=1e-6, grad=1e-5),
    "tf32": Tol(loss=2e-3, grad=2e-2),
    "bf16": Tol(loss=5e-3, grad=3e-2),
}

#: The paper's ImageNet shape (batch, dimension, segment size); scaled down to fit the card.
PAPER_SHAPE = (2048, 8160, 80)
CPU_SHAPE = (256, 640, 80)
#: Accuracy shapes: small on GPUs, tiny under Triton's (slow) CPU interpreter.
ACCURACY_SHAPE = {"cuda": (256, 960, 80), "cpu": (32, 48, 8)}
INPUT_KINDS = list(itertools.product(_gpu_policy.DTYPES, _gpu_policy.MATMUL_PRECISIONS,
                                     (False, True)))


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, the device, its compute capability and shared memory per block."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
        "triton": None, "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "device": str(device), "float32_matmul_precision": float32_matmul_mode(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as err:
        env["triton_error"] = str(err)
    if device.type == "cuda":
        card = _gpu_policy.device_card(_index(device))
        props = torch.cuda.get_device_properties(device)
        env.update(card=card.name, capability=f"{card.capability[0]}.{card.capability[1]}",
                   smem_per_block_kib=card.smem_per_block // 1024,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    else:
        env["card"] = platform.processor() or "CPU"
    return env


def plan_for(capability: str) -> dict[str, Any]:
    """What ``auto`` picks on a card of ``capability`` for every input kind (no GPU needed).

    Example:
        >>> plan_for("7.5")["choices"][0]["backend"]
        'torch'
    """
    cc = _gpu_policy.parse_capability(capability)
    return {"capability": f"{cc[0]}.{cc[1]}",
            "choices": choices_for(_gpu_policy.card_for_capability(cc))}


def auto_choices(device: torch.device) -> list[dict[str, Any]]:
    """What ``auto`` picks on ``device`` for every input kind, and why."""
    if device.type == "cuda":
        return choices_for(_gpu_policy.device_card(_index(device)))
    choices = []
    for dtype, matmul, autocast in INPUT_KINDS:
        precision = _gpu_policy.wanted_precision(dtype, matmul, autocast)
        choices.append({"dtype": dtype, "matmul_precision": matmul, "autocast": autocast,
                        "backend": "torch", "precision": precision,
                        "reason": f"{device.type} tensors: the PyTorch path"
                                  + ("; CPUs have no tf32: fp32 products"
                                     if precision == "tf32" else "")})
    return choices


def choices_for(card: _gpu_policy.Card) -> list[dict[str, Any]]:
    """What ``auto`` picks on ``card`` for every input kind (dtype x matmul x autocast)."""
    return [{"dtype": dtype, "matmul_precision": matmul, "autocast": autocast,
             **_gpu_policy.plan(card, dtype, matmul, autocast)._asdict()}
            for dtype, matmul, autocast in INPUT_KINDS]


def runnable(device: torch.device) -> list[tuple[str, str, str | None]]:
    """``(backend, precision, why not)`` for every backend and precision; ``None``: runs."""
    combos = []
    triton_reason = triton_unavailable_reason(device.type, torch.float32)
    card = _gpu_policy.device_card(_index(device)) if device.type == "cuda" else None
    for backend, precision in itertools.product(("torch", "triton"), ("ieee", "tf32", "bf16")):
        why = triton_reason if backend == "triton" else None
        if why is None and card is not None:
            try:
                _gpu_policy.check_explicit(card, backend, precision, precision)
            except ValueError as err:
                why = str(err)
        if why is None and precision == "tf32" and backend == "torch" and card is None:
            why = "CPUs have no tf32 (the torch backend computes fp32 there)"
        if (why is None and (backend, precision) == ("torch", "ieee") and card is not None
                and _gpu_policy.has_tf32(device) and float32_matmul_mode() == "tf32"):
            why = ("PyTorch's float32 matmul precision is tf32 here, and the torch backend "
                   "does not change it: run with torch.set_float32_matmul_precision('highest')")
        combos.append((backend, precision, why))
    return combos


def accuracy(device: torch.device, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Loss and gradient errors of every runnable backend and precision against float64."""
    n, dim, k = shape
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (2 * torch.randn(n, dim, generator=gen) for _ in range(2))
    want = _loss_and_grads(z1.double().to(device), z2.double().to(device), k, "reference",
                           "ieee")
    results = []
    for backend, precision, why in runnable(device):
        entry: dict[str, Any] = {"backend": backend, "precision": precision,
                                 "shape": list(shape)}
        if why is not None:
            results.append({**entry, "status": "skipped", "reason": why})
            continue
        try:
            got = _loss_and_grads(z1.to(device), z2.to(device), k, backend, precision)
        except Exception as err:  # a failure here is what the user must report
            results.append({**entry, "status": "error", "error": f"{type(err).__name__}: {err}"})
            continue
        tol = TOLERANCES[precision]
        loss_err = abs(got[0] - want[0]) / max(abs(want[0]), want[1])
        grad_err = max(float((g - w).norm() / w.norm()) for g, w in zip(got[2:], want[2:]))
        ok = loss_err <= tol.loss and grad_err <= tol.grad
        results.append({**entry, "status": "ok" if ok else "FAILED", "loss_error": loss_err,
                        "grad_error": grad_err, "loss_tol": tol.loss, "grad_tol": tol.grad})
    return results


def _loss_and_grads(z1: torch.Tensor, z2: torch.Tensor, k: int, backend: str,
                    precision: str) -> tuple[Any, ...]:
    """``(loss, sum of |parts|, dz1, dz2)`` with float64 gradients on the CPU."""
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    terms = music_loss(z1, z2, segment_dim=k, backend=cast(Backend, backend),
                       precision=cast(Precision, precision), return_terms=True)
    terms.loss.backward()
    size = sum(abs(float(part)) for part in terms[1:])
    assert z1.grad is not None and z2.grad is not None
    return (float(terms.loss.detach()), size, z1.grad.double().cpu(), z2.grad.double().cpu())


def default_shape(device: torch.device) -> tuple[int, int, int]:
    """The paper's shape on a GPU, halved until the reference (``D x D`` buffers) fits in
    half the free memory; a small one on the CPU."""
    if device.type != "cuda":
        return CPU_SHAPE
    n, dim, k = PAPER_SHAPE
    free, _ = torch.cuda.mem_get_info(device)
    while (8 * dim * dim + 16 * n * dim) * 4 > free // 2 and dim > 8 * k:
        n, dim = n // 2, (dim // 2 // k) * k
    return n, dim, k


def timing(device: torch.device, shape: tuple[int, int, int], repeats: int) -> list[dict]:
    """Forward+backward time of ``auto``, the ``torch`` backend and the reference, and of
    the three ``N x D x D`` products alone (torch.matmul: the floor), float32 inputs."""
    n, dim, k = shape
    z1, z2 = (torch.randn(n, dim, device=device, requires_grad=True) for _ in range(2))
    results = []
    for backend in ("auto", "torch", "reference"):
        def step(backend: str = backend) -> None:
            music_loss(z1, z2, segment_dim=k, backend=cast(Backend, backend)).backward()

        results.append({"what": f"music_loss backend={backend!r}", "shape": list(shape),
                        "ms": _time(step, device, repeats)})
    a, b = z1.detach(), z2.detach()
    g = torch.randn(dim, dim, device=device)

    def products() -> None:
        torch.matmul(a.t(), b), torch.matmul(b, g.t()), torch.matmul(a, g)

    results.append({"what": "matmul floor (3 products, torch.matmul)", "shape": list(shape),
                    "ms": _time(products, device, repeats)})
    return results


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median milliseconds per call after one warm-up call (compiles, autotunes)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


#: The four kinds of input the choices differ by (every entry of a kind gets the same).
KINDS = ("float32, matmul 'highest'", "float32, matmul 'high'/'medium'",
         "float32 under autocast", "float16/bfloat16 inputs")


def kind_of(choice: dict[str, Any]) -> str:
    """Which of :data:`KINDS` an entry of the choices belongs to."""
    if choice["dtype"] != "float32":
        return KINDS[3]
    if choice["autocast"]:
        return KINDS[2]
    return KINDS[0] if choice["matmul_precision"] == "highest" else KINDS[1]


def summarize(choices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One choice per kind of input (:data:`KINDS`); raises if a kind's entries differ.

    Example:
        >>> summarize(plan_for("9.0")["choices"])[KINDS[1]]["precision"]
        'tf32'
    """
    by_kind: dict[str, dict[str, Any]] = {}
    for c in choices:
        pick = {key: c[key] for key in ("backend", "precision", "reason")}
        if by_kind.setdefault(kind_of(c), pick) != pick:
            raise ValueError(f"inputs of kind {kind_of(c)!r} get different choices: "
                             f"{by_kind[kind_of(c)]} and {pick}")
    return {kind: by_kind[kind] for kind in KINDS if kind in by_kind}


def _print_choices(choices: list[dict[str, Any]]) -> None:
    for kind, c in summarize(choices).items():
        print(f"  {kind:32s} -> {c['backend']:6s} {c['precision']:4s} ({c['reason']})")


def _capability(text: str) -> str:
    try:
        major, minor = _gpu_policy.parse_capability(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return f"{major}.{minor}"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m music_loss.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan-for", metavar="CC", type=_capability,
                        help="print what auto picks on a card of this compute capability "
                             "(e.g. 7.5, 8.6, 12.0) and exit; no GPU needed")
    parser.add_argument("--device", default=None,
                        help="device to check (default: cuda if available, else cpu)")
    parser.add_argument("--n", type=int, help="timing batch size N")
    parser.add_argument("--dim", type=int, help="timing dimension D")
    parser.add_argument("--segment-dim", type=int, help="timing segment size K")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing")
    parser.add_argument("--json", metavar="FILE", help="write everything to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; the exit status is 1 if any accuracy check failed."""
    args = _parse(argv)
    if args.plan_for is not None:
        report: dict[str, Any] = plan_for(args.plan_for)
        print(f"backend='auto' on a compute capability {report['capability']} card:")
        _print_choices(report["choices"])
        failed = False
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        env = environment(device)
        print("environment:")
        for key, value in env.items():
            print(f"  {key}: {value}")
        choices = auto_choices(device)
        print("backend='auto' picks:")
        _print_choices(choices)
        checks = accuracy(device, ACCURACY_SHAPE["cuda" if device.type == "cuda" else "cpu"])
        print("accuracy against float64 (forward and backward):")
        for r in checks:
            detail = (f"loss {r['loss_error']:.1e} (tol {r['loss_tol']:.0e})  grad "
                      f"{r['grad_error']:.1e} (tol {r['grad_tol']:.0e})" if "loss_error" in r
                      else r.get("reason") or r.get("error"))
            print(f"  {r['backend']:6s} {r['precision']:4s} {r['status']:7s} {detail}")
        timings: list[dict[str, Any]] = []
        if not args.no_timing:
            n, dim, k = default_shape(device)
            shape = (args.n or n, args.dim or dim, args.segment_dim or k)
            timings = timing(device, shape, args.repeats)
            print(f"forward+backward, N={shape[0]} D={shape[1]} K={shape[2]}, float32:")
            for t in timings:
                print(f"  {t['what']:42s} {t['ms']:9.2f} ms")
        failed = any(r["status"] in ("FAILED", "error") for r in checks)
        print("accuracy: FAILED" if failed else "accuracy: ok")
        report = {"environment": env, "results": {"auto": choices, "accuracy": checks,
                                                  "timing": timings}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
