"""Does MUSIC learn? MUSIC vs Barlow Twins and VICReg on scikit-learn's digits.

Trains the same small CNN + two-layer projector, with identical augmentations and budget,
with each method (MUSIC blocks / joint / entropy only / invariance only (a collapse
control), Barlow Twins, VICReg), next to a random-init encoder and raw pixels; evaluates a
linear probe (all labels; 5 labels per class) and k-NN on a held-out split; sweeps
``segment_dim`` at fixed ``D`` and ``D`` at fixed ``segment_dim`` (small analogues of the
paper's Tables 7 and 8); logs the :mod:`music_loss.metrics` diagnostics during training.

Usage::

    python -m benchmarks.quality.digits                 # default study (60 epochs): ~14 min on
                                                        # 2 quiet cores (30 epochs took 6.9)
    python -m benchmarks.quality.digits --quick         # smoke run, about a minute
    python -m benchmarks.quality.digits --studies main --seeds 0 1 2 3 4 --epochs 60
    python -m benchmarks.quality.report benchmarks/results/quality-digits.json   # re-render

Writes ``<out-dir>/<name>.json`` (``{"meta", "records", "curves"}``; rewritten after every
run, so an interrupted study keeps what finished), ``<name>.md`` and ``<name>-*.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality.data import DigitsSplit, load_split
from benchmarks.quality.report import write_report
from benchmarks.quality.train import (
    BASELINES,
    METHODS,
    TrainConfig,
    config_dict,
    evaluate_baseline,
    train_run,
)
from examples._progress import PlainProgress, progress_bar

MAIN_METHODS = ("music_blocks", "music_joint", "music_entropy_only", "barlow_twins", "vicreg",
                "music_invariance_only")


@dataclass
class Job:
    """One unit of work; the same (method, seed, K, D) serves every study that needs it."""

    method: str
    seed: int
    segment_dim: int | None
    d: int | None
    studies: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int | None, int | None]:
        return (self.method, self.seed, self.segment_dim, self.d)


def plan(args: argparse.Namespace) -> list[Job]:
    """The deduplicated list of runs the chosen studies need, in the order they run."""
    jobs: dict[tuple[str, int, int | None, int | None], Job] = {}

    def add(method: str, seed: int, k: int | None, d: int | None, study: str) -> None:
        job = jobs.setdefault((method, seed, k, d), Job(method, seed, k, d))
        if study not in job.studies:
            job.studies.append(study)

    if "main" in args.studies:
        for seed in args.seeds:
            for baseline in BASELINES:
                add(baseline, seed, None, None, "main")
            for method in args.methods:
                add(method, seed, args.segment_dim, args.dim, "main")
    if "segment_dim" in args.studies:
        for seed in args.sweep_seeds:
            for k in args.segment_dims:
                add("music_blocks", seed, k, args.dim, "segment_dim")
    if "dim" in args.studies:
        for seed in args.sweep_seeds:
            for d in args.dims:
                add("music_blocks", seed, args.segment_dim, d, "dim")
                add("vicreg", seed, args.segment_dim, d, "dim")
    return list(jobs.values())  # main study first, seed by seed, then the sweeps


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", default="main,segment_dim,dim",
                        help="comma-separated subset of main,segment_dim,dim")
    parser.add_argument("--methods", default=",".join(MAIN_METHODS),
                        help=f"methods of the main study (from {', '.join(METHODS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=None,
                        help="seeds of the two sweeps (default: --seeds)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--dim", type=int, default=512, help="projector output D (main study)")
    parser.add_argument("--segment-dim", type=int, default=16, help="K (main study)")
    parser.add_argument("--segment-dims", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--backend", default=defaults.backend,
                        choices=["torch", "reference", "auto"], help="MUSIC backend")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="quality-digits", help="results file stem")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs, 1 seed, 2-point sweeps, small D")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or periodic progress lines")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report's Notes (e.g. how busy the machine was)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.studies = [s for s in args.studies.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    for study in args.studies:
        if study not in ("main", "segment_dim", "dim"):
            parser.error(f"unknown study {study!r}; choose from main, segment_dim, dim")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.epochs, args.seeds, args.dim, args.segment_dim = 2, [0], 64, 8
        args.segment_dims, args.dims = [8, 16], [32, 64]
        args.name = args.name if args.name != "quality-digits" else "quality-digits-quick"
    if args.sweep_seeds is None:
        args.sweep_seeds = list(args.seeds)
    for d in args.dims:
        if d % args.segment_dim:
            parser.error(f"--dims value {d} is not a multiple of --segment-dim {args.segment_dim}")
    for k in args.segment_dims:
        if args.dim % k:
            parser.error(f"--segment-dims value {k} does not divide --dim {args.dim}")
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study; returns the results dict that was written as JSON."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # leave a calling process (pytest) as it was


def _run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = replace(TrainConfig(), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  backend=args.backend)
    jobs = plan(args)
    splits: dict[int, DigitsSplit] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "command": "python -m benchmarks.quality.digits " + " ".join(args.argv),
        "studies": args.studies,
        "seeds": args.seeds,
        "sweep_seeds": args.sweep_seeds,
        "dim": args.dim,
        "segment_dim": args.segment_dim,
        "segment_dims": args.segment_dims,
        "dims": args.dims,
        "steps_per_epoch": None,
        "train_config": config_dict(cfg),
        "baselines": {"raw_pixels": "the 64 pixel values",
                      "random_init": f"the untrained encoder's {cfg.rep_dim}-d output"},
        "peer_hyperparameters": {"barlow_twins": {"lambd": 0.0051},
                                 "vicreg": {"sim_coeff": 25.0, "std_coeff": 25.0,
                                            "cov_coeff": 1.0}},
        "complete": False,
        "notes": list(args.note),
    }
    data: dict[str, Any] = {"meta": meta, "records": [], "curves": []}
    total_epochs = sum(cfg.epochs if j.method in METHODS else 0 for j in jobs)
    start = time.perf_counter()
    # A bar on a terminal, plain periodic lines in logs; --no-progress keeps only the results.
    bar = (PlainProgress(total_epochs, "epoch", every_seconds=math.inf) if args.no_progress
           else progress_bar(total_epochs, "epoch"))
    for i, job in enumerate(jobs, 1):
        bar.set_description(f"[{i}/{len(jobs)}] {job.method} seed={job.seed} "
                            f"K={job.segment_dim} D={job.d}")
        if job.seed not in splits:
            splits[job.seed] = load_split(job.seed)
        split = splits[job.seed]
        meta["steps_per_epoch"] = len(split.train_images) // cfg.batch_size
        record: dict[str, Any] = {"method": job.method, "seed": job.seed,
                                  "segment_dim": job.segment_dim, "d": job.d,
                                  "studies": job.studies}
        if job.method in BASELINES:
            record["d"] = 64 if job.method == "raw_pixels" else cfg.rep_dim
            record["epochs"] = 0
            record.update(evaluate_baseline(job.method, split, cfg, job.seed))
        else:
            assert job.segment_dim is not None and job.d is not None
            result = train_run(job.method, split, cfg, seed=job.seed, segment_dim=job.segment_dim,
                               dim=job.d, progress=lambda: bar.update(1))
            record["epochs"] = cfg.epochs
            record.update(result.metrics)
            data["curves"].append({"method": job.method, "seed": job.seed,
                                   "segment_dim": job.segment_dim, "d": job.d,
                                   "studies": job.studies, "points": result.curve})
        data["records"].append(record)
        bar.write(f"{job.method:>22} seed={job.seed} K={job.segment_dim} D={record['d']}: "
                  f"linear {100 * record['linear_probe_acc']:.1f}  "
                  f"5/class {100 * record['linear_probe_few_acc']:.1f}  "
                  f"k-NN {100 * record['knn_acc']:.1f}")
        meta["wall_seconds"] = time.perf_counter() - start
        json_path.write_text(json.dumps(data, indent=1) + "\n")
    bar.close()
    meta["complete"] = True
    meta["wall_seconds"] = time.perf_counter() - start
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    written = write_report(data, args.out_dir, args.name)
    print(f"done in {meta['wall_seconds'] / 60:.1f} min; wrote {json_path}, "
          + ", ".join(str(p) for p in written))
    print((args.out_dir / f"{args.name}.md").read_text())
    return data


if __name__ == "__main__":
    run()
