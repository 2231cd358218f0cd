"""Throughput of the real pretraining step at the paper's shapes: fused kernels vs reference.

Runs ``pretrain.py --synthetic --synthetic-on-device`` (ResNet-50, projector 8192-8160,
bf16 autocast, channels_last, LARS; random already-augmented images made on the GPU, so the
CPU data pipeline is out of the measurement) for a few steps per MUSIC backend, plus Barlow
Twins and VICReg on the same pipeline, and prints images/s and the loss's share of the step
time (loss forward + backward, timed with CUDA events). Needs no data and no network::

    python examples/imagenet/bench_synthetic.py                      # 1 GPU, batch 256
    torchrun --nproc_per_node 8 examples/imagenet/bench_synthetic.py --batch-size 2048

Results go to ``runs/bench_synthetic/results.json`` (one entry per configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = {
    "music-triton": ["--loss", "music", "--backend", "triton"],
    "music-torch": ["--loss", "music", "--backend", "torch"],
    "music-reference": ["--loss", "music", "--backend", "reference"],
    "barlow-twins": ["--loss", "barlow-twins"],
    "vicreg": ["--loss", "vicreg"],
}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--steps", type=int, default=30,
                        help="steps per configuration (the first 5 are not timed)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--projector", default="8192-8160")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--output-dir", type=Path, default=HERE / "runs" / "bench_synthetic")
    args = parser.parse_args(argv)
    try:  # pretrain needs torchvision; import it only when a benchmark runs (--help works)
        import pretrain
    except ImportError as err:
        raise SystemExit(f"bench_synthetic needs torchvision for the ResNet step: {err}; "
                         "install it (pip install torchvision)") from err
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # One process group for every configuration (pretrain.main reuses it).
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    results = []
    for name in args.configs.split(","):
        common = ["--synthetic", "--synthetic-on-device", "--synthetic-images",
                  str(args.batch_size * (args.steps + 1)), "--batch-size", str(args.batch_size),
                  "--epochs", "1", "--stop-after-steps", str(args.steps), "--no-save",
                  "--resume", "none", "--arch", args.arch, "--projector", args.projector,
                  "--image-size", str(args.image_size), "--device", args.device,
                  "--log-every", "10", "--no-progress", "--warmup-epochs", "0",
                  "--output-dir", str(args.output_dir / name)]
        try:
            summary = pretrain.main(common + CONFIGS[name])
            summary["config"] = name
        except Exception as err:  # noqa: BLE001 - report the failure, go on with the others
            summary = {"config": name, "error": f"{type(err).__name__}: {err}"}
        results.append(summary)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if main_rank:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\n{'config':<16} {'images/s':>10} {'loss share':>11} {'loss ms':>9} "
              f"{'step ms':>9}   device")
        for r in results:
            if "error" in r:
                print(f"{r['config']:<16} ERROR {r['error'][:200]}")
                continue
            print(f"{r['config']:<16} {r['images_per_s']:>10.1f} {r['loss_share']:>10.1%} "
                  f"{1e3 * r['mean_loss_time_s']:>9.2f} {1e3 * r['mean_step_time_s']:>9.2f}   "
                  f"{r['gpu'] or r['device']} x{r['world_size']}, global batch "
                  f"{r['global_batch']}, amp {r['amp']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
