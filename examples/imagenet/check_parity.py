"""Full-pipeline parity of the ImageNet example (CPU: about 1.5 minutes on 2 cores).

Builds a tiny ImageFolder of generated JPEGs, then runs the real ``pretrain.py`` pipeline
(JPEG decoding, the seeded asymmetric augmentations, torchvision ResNet-18 at 32 px, projector
512-480, ``segment_dim=80``, LARS with warm-up + cosine, checkpoints) for 2 epochs of 2 steps
and compares, after every step and at the end. The legs (``--legs``):

``backend``
    ``backend="torch"`` vs ``backend="reference"`` (one process, BatchNorm), in float64
    (model, images and loss: ``pretrain.py --dtype float64``).
``triton``
    ``backend="triton"`` (the fused kernels, in Triton's CPU interpreter) vs
    ``backend="reference"``, both float32 (the kernels compute in float32). SKIPPED, with the
    reason, only when Triton or its interpreter cannot be imported; ``--require-triton``
    (the CI twin) turns that skip into a failure.
``ranks``
    2 gloo ranks under torchrun vs 1 process, global batch 8 both ways, float64, for MUSIC
    (``gather_distributed=True``), Barlow Twins (global-batch form) and VICReg (``--losses``).
    BatchNorm statistics depend on the split and SyncBatchNorm is CUDA-only, so these runs use
    ``--norm group``; augmentations are seeded per sample, so both see the same images. The
    2-rank loss compared is the mean over ranks (equal to one process's), the parameters are
    rank 0's.
``resume``
    A run pre-empted after step 3 (mid-epoch) and resumed from its checkpoint vs an
    uninterrupted run, in one process and on 2 gloo ranks: must be bit-identical.

Why float64: the runs use 10x the recipe's base learning rate and 20x its LARS eta so that 4
steps move the weights measurably (the recipe's values move them by ~1e-5 of their norm per
step, which would hide a wrong gradient). At those rates Barlow Twins' biases and norm
parameters (no LARS scaling) move by ~2.6x their norm, which amplifies float32 summation-order
differences between 1 and 2 processes to 6.6e-4 on one x86 machine and 1.2e-5 on another. In
float64 the same amplification leaves ~1e-13, so one tolerance (1e-10) holds on any CPU. The
Triton leg cannot use float64; its float32 tolerance comes from the spread measured across
``ATEN_CPU_CAPABILITY`` and thread counts (README).

Loss difference: worst over steps of ``|a - b| / |b|``. Update difference:
``||w_a - w_b|| / ||w_b - w_0||``, the final weights' difference against how far training
moved them from their common start ``w_0``, over every floating tensor of the model state
(BatchNorm running statistics included); ``||w_a - w_b|| / ||w_b||`` is printed too. A leg
FAILS when a difference exceeds its tolerance or when any of its runs raises. Exits 1 on any
FAIL (or on a skipped Triton leg under ``--require-triton``).

``--mutation NAME`` injects a wrong gradient into the runs under test (never the reference
runs; see ``parity_mutations.py``); ``--mutation-table`` runs every mutation once and exits 0
only if each of them FAILS. ``--device cuda`` compares on GPUs (bf16 autocast, SyncBatchNorm
and NCCL with 2+ GPUs); ``--dry-run`` prints the runs and comparisons without training.

    python examples/imagenet/check_parity.py            # writes runs/check_parity/parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from imagenet_common import build_twin, load_checkpoint, write_image_folder  # noqa: E402
from parity_mutations import MUTATION_ENV, MUTATIONS  # noqa: E402

LEGS = ("backend", "triton", "ranks", "resume")
PEER_LOSSES = ("music", "barlow-twins", "vicreg")

#: (loss, training-update) relative tolerances per comparison; see the module docstring.
TOLERANCES = {
    # float64 end to end: what remains after 4 steps is ~1e-13 (measured; README), far below.
    "backend": (1e-10, 1e-10),
    "ranks": (1e-10, 1e-10),
    # float32 fused kernels vs the float32 reference: the measured spread over
    # ATEN_CPU_CAPABILITY default/avx2 x 1/2 threads is at most ~2e-7 (README); 1e-5 keeps a
    # 50x margin and still fails a 1 % gradient error (~1e-4).
    "triton": (1e-5, 1e-5),
    "resume": (0.0, 0.0),
    # GPU mode (bf16 autocast): provisional, not yet measured on a GPU; see README.
    "cuda-backend": (2e-2, 5e-2),
    "cuda-ranks": (2e-2, 5e-2),
}

#: 10x the recipe's base lr and 20x its LARS eta, so that 4 steps move the weights measurably
#: (the recipe's values move them by about 1e-5 of their norm per step: too little to see).
BASE_LR, ETA = 6.0, 0.02

#: Why a Triton leg was not run, when that reason is allowed to be a skip.
TritonSkip = str


def pipeline_args(data: Path, out: Path, **overrides: Any) -> list[str]:
    """``pretrain.py`` options of a parity run (small shapes, a log row every step)."""
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


@contextlib.contextmanager
def mutated(mutation: str | None) -> Iterator[None]:
    """Within the block, ``pretrain.py`` trains with the mutated criterion (if any)."""
    import imagenet_losses
    import pretrain

    if not mutation:
        yield
        return
    from parity_mutations import mutated_criterion_class

    saved = os.environ.get(MUTATION_ENV)
    os.environ[MUTATION_ENV] = mutation
    try:
        pretrain.Criterion = mutated_criterion_class(imagenet_losses.Criterion)
        yield
    finally:
        pretrain.Criterion = imagenet_losses.Criterion
        if saved is None:
            os.environ.pop(MUTATION_ENV, None)
        else:
            os.environ[MUTATION_ENV] = saved


def run_pipeline(argv: list[str], mutation: str | None = None) -> None:
    import pretrain

    with mutated(mutation):
        pretrain.main(argv)


def losses(out: Path) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(out / "checkpoint.pt")["model"]
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
    how far training moved the weights from their common start ``w_0``;
    ``param_rel_diff = ||w_run - w_ref|| / ||w_ref||`` is reported too.
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
            "final_loss": la[-1], "verdict": "PASS" if ok else "FAIL", "ok": ok}


def slim(out: Path) -> None:
    """Drop what no comparison reads (a float64 run's backbone.pt is ~90 MB)."""
    (out / "backbone.pt").unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def failed_row(name: str, err: BaseException) -> dict[str, Any]:
    """A comparison that could not be made because a run raised: a FAIL, with the reason."""
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}"
    return {"comparison": name, "steps": 0, "loss_rel_diff": None, "update_rel_diff": None,
            "param_rel_diff": None, "verdict": "FAIL", "ok": False, "error": reason[:300]}


# ---------------------------------------------------------------------------------------
# Sub-process entry points: the torchrun ranks and the Triton-interpreter run.
# ---------------------------------------------------------------------------------------
def triton_unavailable() -> TritonSkip | None:
    """Why Triton cannot run here (the only allowed reason to skip its leg), or None.

    Only a failed import of Triton, its CPU interpreter or the fused-kernel module counts;
    an error while running the kernels, or a wrong result, is the leg's FAIL.
    """
    try:
        import triton  # noqa: F401
        if not torch.cuda.is_available():
            import triton.runtime.interpreter  # noqa: F401
    except ImportError as err:
        return f"Triton or its interpreter cannot be imported ({err})"
    try:
        from music_loss.kernels import music_loss_triton  # noqa: F401
    except ImportError as err:
        return f"music_loss.kernels.music_loss_triton cannot be imported ({err})"
    return None


def worker(spec_path: str) -> None:
    """Run the pipelines listed in a JSON spec (under torchrun, or with TRITON_INTERPRET=1)."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(os.environ.get("MUSIC_PARITY_THREADS", "1")))
    if spec.get("triton"):
        reason = triton_unavailable()
        Path(spec["status"]).write_text(json.dumps({"skipped": reason}))
        if reason is not None:
            return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        cuda = spec.get("device") == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    for run in spec["runs"]:
        run_pipeline(run["argv"], run.get("mutation"))


def spawn(spec: dict[str, Any], work: Path, name: str, *, ranks: int = 1,
          env_extra: dict[str, str] | None = None) -> None:
    """Run ``worker`` in a fresh process (``ranks`` > 1: under torchrun); raise on failure."""
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps(spec, default=str))
    env = {**os.environ, **(env_extra or {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(HERE / "check_parity.py"), "--worker", str(spec_path)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={ranks}", *cmd[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------
# The plan: which runs each leg makes and compares.
# ---------------------------------------------------------------------------------------
class Parity:
    """Runs the selected legs into ``work`` and collects one row per comparison."""

    def __init__(self, args: argparse.Namespace, work: Path, data: Path) -> None:
        self.args, self.work, self.data = args, work, data
        self.cuda = args.device == "cuda"
        self.gpus = (args.gpus if args.gpus is not None else torch.cuda.device_count()) \
            if self.cuda else 0
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.plan: list[str] = []
        self._done: dict[str, Path] = {}
        self._music_ranks_run: Path | None = None  # reused by the resume leg

    # The options every run of a leg shares.
    def options(self, leg: str, **overrides: Any) -> dict[str, Any]:
        if self.cuda:
            # bf16 autocast (pretrain's default on CUDA), BatchNorm (SyncBatchNorm on 2+
            # ranks), --deterministic so that the resume leg can demand bit-exactness.
            base = {"device": "cuda", "workers": 2, "deterministic": True}
        elif leg == "triton":
            base = {"dtype": "float32"}
        else:
            base = {"dtype": "float64"}
        return {**base, **overrides}

    def run(self, name: str, leg: str, mutation: str | None = None, **overrides: Any) -> Path:
        """One in-process pipeline run (cached by name and mutation within a check)."""
        name = f"{name}-mutation-{mutation}" if mutation else name
        out = self.work / name
        argv = pipeline_args(self.data, out, **self.options(leg, **overrides))
        self.plan.append(f"run {name}: pretrain.py {' '.join(argv)}"
                         + (f"   [mutation {mutation}]" if mutation else ""))
        if self.args.dry_run:
            return out
        if name in self._done:
            return self._done[name]
        shutil.rmtree(out, ignore_errors=True)
        print(f"  run {name} ...", file=sys.stderr, flush=True)
        run_pipeline(argv, mutation)
        slim(out)
        self._done[name] = out
        return out

    def compare(self, name: str, kind: str, run: Path, ref: Path, norm: str) -> None:
        self.plan.append(f"compare {name} ({kind}: tolerances {TOLERANCES[kind]})")
        if not self.args.dry_run:
            self.results.append(compare(name, kind, run, ref, norm))

    def leg(self, name: str, body: Callable[[], None]) -> None:
        """Run one leg; an exception anywhere in it is that leg's FAIL, reported."""
        try:
            body()
        except Exception as err:  # noqa: BLE001 - every failure is reported as a FAIL row
            print(f"  leg {name} raised:\n{traceback.format_exc()}", file=sys.stderr)
            self.results.append(failed_row(f"{name}: exception", err))

    # -- the legs -----------------------------------------------------------------------
    def backend(self) -> None:
        mutation = self.args.mutation
        if self.cuda:
            reference = self.run("cuda-reference", "backend", backend="reference")
            fused = self.run("cuda-triton", "backend", mutation, backend="triton")
            self.compare("triton vs reference (1 GPU, bf16 autocast, BatchNorm)",
                         "cuda-backend", fused, reference, "batch")
            return
        tested = self.run("torch", "backend", mutation, backend="torch")
        reference = self.run("reference", "backend", backend="reference")
        self.compare("torch vs reference (1 process, float64, BatchNorm)", "backend", tested,
                     reference, "batch")

    def triton(self) -> None:
        if self.cuda:
            self.notes.append("triton: compared in the backend leg (on the GPU)")
            return
        out = self.work / "triton"
        status = self.work / "triton_status.json"
        argv = pipeline_args(self.data, out, **self.options("triton", backend="triton"))
        self.plan.append(f"run triton (TRITON_INTERPRET=1 subprocess): pretrain.py "
                         f"{' '.join(argv)}")
        if not self.args.dry_run:
            shutil.rmtree(out, ignore_errors=True)
            status.unlink(missing_ok=True)
            print("  run triton (TRITON_INTERPRET=1) ...", file=sys.stderr, flush=True)
            spawn({"triton": True, "status": str(status),
                   "runs": [{"argv": argv, "mutation": self.args.mutation}]}, self.work,
                  "triton", env_extra={"TRITON_INTERPRET": "1"})
            slim(out)
            reason = json.loads(status.read_text())["skipped"]
            if reason:
                self.notes.append(f"triton: SKIPPED ({reason})")
                return
        # After the Triton run: a skip costs no reference run.
        reference = self.run("reference-fp32", "triton", backend="reference")
        self.compare("triton (interpreter) vs reference (1 process, float32, BatchNorm)",
                     "triton", out, reference, "batch")

    def ranks(self) -> None:
        world = 2
        if self.cuda:
            if self.gpus < 2:
                self.notes.append(f"ranks: SKIPPED ({self.gpus} GPU: needs 2+)")
                return
            world = self.gpus
        kind, norm = ("cuda-ranks", "batch") if self.cuda else ("ranks", "group")
        singles, pairs, runs = {}, {}, []
        for loss in self.args.losses:
            singles[loss] = self.run(f"{loss}-{norm}-1proc", "ranks", loss=loss, norm=norm,
                                     backend="auto")
            pairs[loss] = self.work / f"{loss}-{norm}-{world}ranks"
            runs.append({"argv": pipeline_args(self.data, pairs[loss], **self.options(
                "ranks", loss=loss, norm=norm, backend="auto", batch_size=8)),
                "mutation": self.args.mutation})
        self._spawn_ranks("ranks", runs, world)
        if "music" in pairs and not self.args.mutation:
            self._music_ranks_run = pairs["music"]
        for loss in self.args.losses:
            what = ("SyncBatchNorm, NCCL" if self.cuda else "GroupNorm, float64")
            self.compare(f"{loss}: {world} {'GPUs' if self.cuda else 'gloo ranks'} vs 1 "
                         f"process ({what})", kind, pairs[loss], singles[loss], norm)

    def resume(self) -> None:
        leg = "resume"
        # The uninterrupted run: the backend leg's (float64, backend torch) when it ran.
        single_ref = self.run("torch", "backend", backend="torch")
        resumed = self.work / "resumed"
        self.plan.append(f"run resumed: the same as run torch, stopped after step 3, then "
                         f"resumed ({resumed})")
        if not self.args.dry_run:
            shutil.rmtree(resumed, ignore_errors=True)
            run_pipeline(pipeline_args(self.data, resumed,
                                       **self.options(leg, backend="torch", stop_after_steps=3)))
            run_pipeline(pipeline_args(self.data, resumed, **self.options(leg, backend="torch")))
        self.compare("resumed at step 3 vs uninterrupted (1 process, BatchNorm)", "resume",
                     resumed, single_ref, "batch")
        world = max(self.gpus, 2) if self.cuda else 2
        if self.cuda and self.gpus < 2:
            return
        norm = "batch" if self.cuda else "group"
        whole, cut = self.work / "resume-2ranks", self.work / "resume-2ranks-resumed"
        common = self.options(leg, norm=norm, backend="auto")
        runs = [{"argv": pipeline_args(self.data, cut, **common, stop_after_steps=3)},
                {"argv": pipeline_args(self.data, cut, **common)}]
        if self._music_ranks_run is not None:  # the ranks leg's MUSIC run: the same options
            whole = self._music_ranks_run
        else:
            runs.insert(0, {"argv": pipeline_args(self.data, whole, **common)})
        self._spawn_ranks("resume-ranks", runs, world,
                          fresh=[cut] if whole == self._music_ranks_run else [whole, cut])
        self.compare(f"{world} ranks resumed at step 3 vs uninterrupted ({norm} norm)",
                     "resume", cut, whole, norm)

    def _spawn_ranks(self, name: str, runs: list[dict[str, Any]], world: int,
                     fresh: list[Path] | None = None) -> None:
        for run in runs:
            self.plan.append(f"torchrun x{world} ({name}): pretrain.py {' '.join(run['argv'])}"
                             + (f"   [mutation {run['mutation']}]" if run.get("mutation")
                                else ""))
        if self.args.dry_run:
            return
        for path in fresh or [Path(r["argv"][r["argv"].index("--output-dir") + 1])
                              for r in runs]:
            shutil.rmtree(path, ignore_errors=True)
        print(f"  run {world} ranks ({name}, torchrun) ...", file=sys.stderr, flush=True)
        spawn({"runs": runs, "device": self.args.device}, self.work, name, ranks=world)
        for run in runs:
            slim(Path(run["argv"][run["argv"].index("--output-dir") + 1]))


def print_table(results: list[dict[str, Any]]) -> None:
    width = max([len(r["comparison"]) for r in results] + [10])
    print(f"\n{'comparison':<{width}}  steps  loss rel diff (tol)  update rel diff (tol)  "
          "param rel diff  verdict")
    for r in results:
        if r.get("error"):
            print(f"{r['comparison']:<{width}}  {'-':>5}  {r['error']}  FAIL")
            continue
        print(f"{r['comparison']:<{width}}  {r['steps']:>5}  {r['loss_rel_diff']:.2e} "
              f"({r['loss_tol']:.0e})   {r['update_rel_diff']:.2e} ({r['update_tol']:.0e})     "
              f"{r['param_rel_diff']:.2e}        {r['verdict']}")


def mutation_table(args: argparse.Namespace) -> int:
    """Run every mutation once (backend leg, plus the fused path and a peer) and tabulate."""
    cases = [("backend", None, name) for name in
             ("reimplemented", "diag-plus-one-dropped", "invariance-grad-x0.99",
              "off-grad-x0.99", "view1-grad-x1.01", "grad-x1.01", "raise")]
    cases += [("triton", None, "grad-x1.01"), ("ranks", "barlow-twins", "grad-x1.01")]
    rows = []
    for leg, loss, mutation in cases:
        argv = ["--legs", leg, "--mutation", mutation, "--json",
                str(args.json.with_name(f"mutation-{leg}-{mutation}.json"))]
        if loss:
            argv += ["--losses", loss]
        if args.workdir:
            argv += ["--workdir", str(args.workdir)]
        print(f"mutation {mutation} on leg {leg} ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):
            code = main(argv)
        report = json.loads(args.json.with_name(f"mutation-{leg}-{mutation}.json").read_text())
        worst = [r for r in report["results"] if r.get("update_rel_diff") is not None]
        rows.append({"leg": leg + (f" ({loss})" if loss else ""), "mutation": mutation,
                     "what": MUTATIONS[mutation], "exit": code,
                     "update_rel_diff": worst[0]["update_rel_diff"] if worst else None,
                     "update_tol": worst[0]["update_tol"] if worst else None,
                     "error": next((r["error"] for r in report["results"] if r.get("error")),
                                   None),
                     "expected": "PASS" if mutation == "reimplemented" else "FAIL",
                     "verdict": "PASS" if code == 0 else "FAIL"})
    print(f"\n{'leg':<22} {'mutation':<22} {'update rel diff (tol)':<24} verdict  expected")
    for r in rows:
        diff = (f"{r['update_rel_diff']:.2e} ({r['update_tol']:.0e})"
                if r["update_rel_diff"] is not None else (r["error"] or "-")[:40])
        print(f"{r['leg']:<22} {r['mutation']:<22} {diff:<24} {r['verdict']:<8} "
              f"{r['expected']}")
    ok = all(r["verdict"] == r["expected"] for r in rows)
    print("every mutation FAILS, the control PASSES" if ok else "SENSITIVITY CHECK FAILED")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"ok": ok, "mutations": rows}, indent=2))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where data and runs go (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, default=HERE / "runs" / "check_parity" /
                        "parity.json", help="results file")
    parser.add_argument("--legs", default=",".join(LEGS),
                        help=f"comma-separated legs to run, of {','.join(LEGS)}")
    parser.add_argument("--losses", default=",".join(PEER_LOSSES),
                        help="losses of the ranks leg (comma-separated)")
    parser.add_argument("--require-triton", action="store_true",
                        help="a skipped Triton leg is a failure (CI has the interpreter)")
    parser.add_argument("--mutation", choices=sorted(MUTATIONS), default=None,
                        help="inject this wrong gradient into the runs under test (must FAIL)")
    parser.add_argument("--mutation-table", action="store_true",
                        help="run every mutation once; exit 0 only if each one FAILS")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bf16 autocast, fused kernels vs reference, SyncBatchNorm "
                             "and NCCL on 2+ GPUs")
    parser.add_argument("--gpus", type=int, default=None,
                        help="with --device cuda: GPUs (ranks) to use; default all visible")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs and comparisons, train nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.legs = [leg for leg in args.legs.split(",") if leg]
    args.losses = [loss for loss in args.losses.split(",") if loss]
    bad = [leg for leg in args.legs if leg not in LEGS] or not args.legs
    if bad:
        parser.error(f"--legs: expected a comma-separated subset of {','.join(LEGS)}, "
                     f"got {','.join(args.legs) or 'nothing'}")
    if not args.losses or any(loss not in PEER_LOSSES for loss in args.losses):
        parser.error(f"--losses: expected a comma-separated subset of {','.join(PEER_LOSSES)}")
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible; use --dry-run to see the plan")
    if args.device == "cuda" and args.mutation in ("reimplemented", "diag-plus-one-dropped",
                                                   "invariance-grad-x0.99", "off-grad-x0.99"):
        parser.error(f"--mutation {args.mutation} replaces the MUSIC backend; the cuda mode "
                     "compares the fused kernels: use grad-x1.01, view1-grad-x1.01 or raise")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.mutation_table:
        return mutation_table(args)

    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="music_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not args.dry_run and not (data / "train").exists():
        write_image_folder(data / "train", num_classes=4, per_class=4, size=40)
    threads = torch.get_num_threads()
    # 2 shared cores: oversubscribed OpenMP threads only spin (MUSIC_PARITY_THREADS overrides,
    # for measuring the spread over thread counts).
    torch.set_num_threads(int(os.environ.get("MUSIC_PARITY_THREADS", "1")))
    parity = Parity(args, work, data)
    try:
        for leg in LEGS:
            if leg in args.legs:
                parity.leg(leg, getattr(parity, leg))
    finally:
        torch.set_num_threads(threads)
        if args.workdir is None:  # a temporary folder: several GB of float64 checkpoints
            shutil.rmtree(work, ignore_errors=True)

    if args.dry_run:
        print(f"check_parity.py --device {args.device} would run (nothing trained):")
        for line in parity.plan:
            print(f"  {line}")
        for note in parity.notes:
            print(f"  {note}")
        return 0
    results, notes = parity.results, parity.notes
    if args.require_triton and "triton" in args.legs:
        notes += [f"{n} -- a FAIL under --require-triton" for n in notes
                  if n.startswith("triton: SKIPPED")]
    triton_skip_fails = args.require_triton and any("a FAIL under --require-triton" in n
                                                    for n in notes)
    if results:
        print_table(results)
    for note in notes:
        print(note)
    ok = bool(results) and all(r["ok"] for r in results) and not triton_skip_fails
    elapsed = time.perf_counter() - start
    print(f"{'ALL PASS' if ok else 'FAILED'} in {elapsed:.0f} s"
          + (f" (workdir {work})" if args.workdir else "")
          + (f" [mutation {args.mutation}]" if args.mutation else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"ok": ok, "results": results, "notes": notes,
                                     "legs": args.legs, "mutation": args.mutation,
                                     "elapsed_s": elapsed, "tolerances": TOLERANCES},
                                    indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
