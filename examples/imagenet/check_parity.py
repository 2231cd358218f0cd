"""Full-pipeline parity of the ImageNet example on CPU (a few minutes on 2 cores).

Builds a tiny ImageFolder of generated JPEGs, then runs the real ``pretrain.py`` pipeline
(JPEG decoding, the seeded asymmetric augmentations, torchvision ResNet-18 at 32 px, projector
512-480, ``segment_dim=80``, LARS with warm-up + cosine, checkpoints) for 2 epochs of 2 steps
and compares, after every step and at the end:

1. ``backend="torch"`` vs ``backend="reference"`` (same process, BatchNorm): the fast path
   trains like the materialising oracle.
2. ``backend="triton"`` (fused kernels, Triton's CPU interpreter) vs ``"reference"``, when
   ``music_loss.kernels.music_loss_triton`` exists and runs; otherwise printed as SKIPPED.
3. 2 gloo ranks under torchrun vs 1 process, global batch 8 both ways, for MUSIC
   (``gather_distributed=True``), Barlow Twins and VICReg in their multi-GPU forms. BatchNorm
   statistics depend on the split and SyncBatchNorm is CUDA-only, so these runs use
   ``--norm group``; augmentations are seeded per sample, so both see the same images. The
   2-rank loss compared is the mean over ranks (SPEC 3), the parameters are rank 0's.
4. A run pre-empted after step 3 (mid-epoch) and resumed from its checkpoint vs an
   uninterrupted run, in one process and on 2 gloo ranks: must be bit-identical.

The runs use 10x the recipe's base learning rate and 20x its LARS eta so that 4 steps move
the weights measurably (the recipe's values move them by ~1e-5 of their norm per step, which
would hide a wrong gradient). Loss difference: worst over steps of ``|a - b| / |b|`` (the
2-rank loss is the mean over ranks). Update difference, the one with a tolerance:
``||w_a - w_b|| / ||w_b - w_0||``, the final weights' difference against how far training
moved them from their common start ``w_0``, over every floating tensor of the model state
(BatchNorm running statistics included); ``||w_a - w_b|| / ||w_b||`` is printed too. Exits 1
when a comparison exceeds its tolerance.

    python examples/imagenet/check_parity.py            # writes runs/check_parity/parity.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from imagenet_common import build_twin, write_image_folder  # noqa: E402

#: (loss, training-update) relative tolerances per comparison; see the module docstring.
TOLERANCES = {
    "backend": (1e-5, 1e-5),
    "ranks": (1e-5, 1e-4),
    # Barlow Twins' loss is a sum of D^2 = 230400 squared correlations (about 500 here), and at
    # the parity learning rate its unadapted biases/norm weights move 2-3x their norm: the
    # different fp32 summation orders of 2 ranks show ~4e-6 in its loss.
    "ranks-barlow-twins": (1e-4, 1e-4),
    "resume": (0.0, 0.0),
}


#: 10x the recipe's base lr and 20x its LARS eta, so that 4 steps move the weights measurably
#: (the recipe's values move them by about 1e-5 of their norm per step: too little to see).
BASE_LR, ETA = 6.0, 0.02


def pipeline_args(data: Path, out: Path, **overrides: Any) -> list[str]:
    """``pretrain.py`` options of a parity run (small shapes, CPU, a log row every step)."""
    options = {"data": data, "output_dir": out, "arch": "resnet18", "image_size": 32,
               "projector": "512-480", "segment_dim": 80, "batch_size": 8, "epochs": 2,
               "warmup_epochs": 1, "workers": 0, "log_every": 1, "device": "cpu",
               "resume": "auto", "seed": 0, "base_lr": BASE_LR, "eta": ETA, **overrides}
    argv = []
    for key, value in options.items():
        if value is True:
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return [*argv, "--no-progress"]


def run_pipeline(argv: list[str]) -> None:
    import pretrain

    pretrain.main(argv)


def losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def initial_state(norm: str) -> dict[str, torch.Tensor]:
    """The weights every parity run starts from (pretrain.py builds them the same way)."""
    model = build_twin("resnet18", "512-480", norm, seed=0)
    return {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return sum(float(t.pow(2).sum()) for t in tensors.values()) ** 0.5


def compare(name: str, kind: str, run: Path, ref: Path, norm: str) -> dict[str, Any]:
    """Worst per-step loss difference and the final weights' difference of two runs.

    ``update_rel_diff = ||w_run - w_ref|| / ||w_ref - w_0||``: the difference measured against
    how far training moved the weights from their common start ``w_0`` (the tolerance applies
    to it); ``param_rel_diff = ||w_run - w_ref|| / ||w_ref||`` is reported too.
    """
    la, lb = losses(run), losses(ref)
    if len(la) != len(lb):
        raise RuntimeError(f"{name}: {len(la)} vs {len(lb)} logged steps")
    loss_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(la, lb))
    sa, sb, s0 = final_state(run), final_state(ref), initial_state(norm)
    diff = _norm({k: sa[k] - sb[k] for k in sb})
    moved = _norm({k: sb[k] - s0[k] for k in sb})
    update_diff = diff / moved
    loss_tol, update_tol = TOLERANCES[kind]
    ok = loss_diff <= loss_tol and update_diff <= update_tol
    return {"comparison": name, "steps": len(la), "loss_rel_diff": loss_diff,
            "loss_tol": loss_tol, "update_rel_diff": update_diff, "update_tol": update_tol,
            "param_rel_diff": diff / _norm(sb), "moved_rel": moved / _norm(s0),
            "final_loss": la[-1], "ok": ok}


# ---------------------------------------------------------------------------------------
# Sub-process entry points: the torchrun ranks and the Triton-interpreter run.
# ---------------------------------------------------------------------------------------
def triton_probe() -> str | None:
    """Why the fused kernels cannot run here (None when they run and match the reference)."""
    try:
        from music_loss.kernels import music_loss_triton  # noqa: F401
    except ImportError as err:
        return f"music_loss.kernels.music_loss_triton not importable ({err})"
    try:
        from music_loss.functional import music_loss

        z1, z2 = torch.randn(8, 160), torch.randn(8, 160)
        fused = music_loss(z1, z2, 80, backend="triton")
        oracle = music_loss(z1, z2, 80, backend="reference")
    except Exception as err:  # noqa: BLE001 - any failure is a reason to skip, reported
        return f"backend='triton' failed under TRITON_INTERPRET=1: {type(err).__name__}: {err}"
    if not torch.isclose(fused, oracle, rtol=1e-4, atol=1e-6):
        return f"backend='triton' gives {float(fused)} where the reference gives {float(oracle)}"
    return None


def worker(spec_path: str) -> None:
    """Run the pipelines listed in a JSON spec (under torchrun, or with TRITON_INTERPRET=1)."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    if spec.get("triton"):
        reason = triton_probe()
        if reason is not None:
            Path(spec["status"]).write_text(json.dumps({"skipped": reason}))
            return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for argv in spec["runs"]:
        run_pipeline(argv)
    if spec.get("status"):
        Path(spec["status"]).write_text(json.dumps({"skipped": None}))


def spawn(spec: dict[str, Any], work: Path, name: str, *, ranks: int = 1,
          env_extra: dict[str, str] | None = None) -> None:
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(HERE / "check_parity.py"), "--worker", str(spec_path)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", *cmd[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-6000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where data and runs go (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, default=HERE / "runs" / "check_parity" /
                        "parity.json", help="results file")
    parser.add_argument("--no-peers", action="store_true",
                        help="2-vs-1 ranks for MUSIC only (skip Barlow Twins / VICReg)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton leg")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="music_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "train").exists():
        write_image_folder(data / "train", num_classes=4, per_class=4, size=40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed OpenMP threads only spin
    results: list[dict[str, Any]] = []
    notes: list[str] = []

    def run(name: str, **overrides: Any) -> Path:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        print(f"  run {name} ...", file=sys.stderr, flush=True)
        run_pipeline(pipeline_args(data, out, **overrides))
        return out

    try:
        # 1. Fast path vs oracle, real BatchNorm pipeline.
        reference = run("reference", backend="reference")
        fast = run("torch", backend="torch")
        results.append(compare("torch vs reference (1 process, BatchNorm)", "backend", fast,
                               reference, "batch"))

        # 2. Fused kernels under the interpreter, in a process that sets TRITON_INTERPRET=1.
        if args.no_triton:
            notes.append("triton: SKIPPED (--no-triton)")
        else:
            out = work / "triton"
            shutil.rmtree(out, ignore_errors=True)
            status = work / "triton_status.json"
            print("  run triton (TRITON_INTERPRET=1) ...", file=sys.stderr, flush=True)
            spawn({"triton": True, "status": str(status),
                   "runs": [pipeline_args(data, out, backend="triton")]}, work, "triton",
                  env_extra={"TRITON_INTERPRET": "1"})
            reason = json.loads(status.read_text())["skipped"]
            if reason:
                notes.append(f"triton: SKIPPED ({reason})")
            else:
                results.append(compare("triton (interpreter) vs reference (1 process, "
                                       "BatchNorm)", "backend", out, reference, "batch"))

        # 3. 2 gloo ranks vs 1 process, split-independent GroupNorm.
        losses_to_check = ["music"] if args.no_peers else ["music", "barlow-twins", "vicreg"]
        singles, pairs = {}, {}
        for loss in losses_to_check:
            singles[loss] = run(f"{loss}-group-1proc", loss=loss, norm="group")
            pairs[loss] = work / f"{loss}-group-2ranks"
            shutil.rmtree(pairs[loss], ignore_errors=True)
        print("  run 2 gloo ranks (torchrun) ...", file=sys.stderr, flush=True)
        # The same torchrun also runs the 2-rank MUSIC pipeline pre-empted after step 3, then
        # resumed (comparison 4b).
        resumed_2 = work / "music-group-2ranks-resumed"
        shutil.rmtree(resumed_2, ignore_errors=True)
        spawn({"runs": [*(pipeline_args(data, pairs[loss], loss=loss, norm="group")
                          for loss in losses_to_check),
                        pipeline_args(data, resumed_2, norm="group", stop_after_steps=3),
                        pipeline_args(data, resumed_2, norm="group")]},
              work, "ranks", ranks=2)
        for loss in losses_to_check:
            kind = "ranks-barlow-twins" if loss == "barlow-twins" else "ranks"
            results.append(compare(f"{loss}: 2 gloo ranks vs 1 process (GroupNorm)", kind,
                                   pairs[loss], singles[loss], "group"))

        # 4. Pre-empted after step 3 (epoch 1, batch 1), resumed with the same command.
        resumed = run("resumed", backend="torch", stop_after_steps=3)
        first_part = losses(resumed)
        run_pipeline(pipeline_args(data, resumed, backend="torch"))
        results.append(compare(f"resumed at step {len(first_part)} vs uninterrupted "
                               "(torch, BatchNorm)", "resume", resumed, fast, "batch"))
        results.append(compare("2 ranks resumed at step 3 vs uninterrupted (GroupNorm)",
                               "resume", resumed_2, pairs["music"], "group"))
    finally:
        torch.set_num_threads(threads)

    width = max(len(r["comparison"]) for r in results)
    print(f"\n{'comparison':<{width}}  steps  loss rel diff (tol)  update rel diff (tol)  "
          "param rel diff  verdict")
    for r in results:
        print(f"{r['comparison']:<{width}}  {r['steps']:>5}  {r['loss_rel_diff']:.2e} "
              f"({r['loss_tol']:.0e})   {r['update_rel_diff']:.2e} ({r['update_tol']:.0e})     "
              f"{r['param_rel_diff']:.2e}        {'PASS' if r['ok'] else 'FAIL'}")
    for note in notes:
        print(note)
    ok = all(r["ok"] for r in results)
    elapsed = time.perf_counter() - start
    print(f"{'ALL PASS' if ok else 'FAILED'} in {elapsed:.0f} s (workdir {work})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"ok": ok, "results": results, "notes": notes,
                                     "elapsed_s": elapsed, "tolerances": TOLERANCES},
                                    indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
