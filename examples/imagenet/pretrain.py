"""Self-supervised ResNet pretraining on ImageNet with the MUSIC loss (or Barlow Twins / VICReg).

The paper's recipe (MUSIC, section 3) is the default: torchvision ResNet-50 (2048-d), projector
2048 -> 8192 (BatchNorm, ReLU) -> 8160 without bias, ``segment_dim=80`` (S = 102), LARS
(momentum 0.9, eta 0.001, weight decay 1e-6; no decay or adaptation on biases and norm
parameters), lr = batch / 256 x 0.6 with 10 warm-up epochs and a cosine decay to 0.001 x the
peak (the authors' released code and VICReg's; 0.0048 at batch 2048), the VICReg / Barlow
Twins asymmetric augmentations, global batch 2048.

Run with torchrun (NCCL + SyncBatchNorm + bf16 autocast + channels_last on GPU, gloo on CPU)::

    torchrun --nproc_per_node 8 examples/imagenet/pretrain.py --data /path/to/imagenet
    torchrun --nproc_per_node 2 examples/imagenet/pretrain.py --synthetic --device cpu \\
        --synthetic-images 64 --arch resnet18 --image-size 32 --projector 512-480 \\
        --batch-size 16 --epochs 2 --warmup-epochs 1 --norm group

Every epoch (and every ``--ckpt-every-steps``) writes ``checkpoint.pt``; a new run with the same
``--output-dir`` resumes where it stopped (model, optimizer, schedule step, sampler position,
random state of every rank, grad scaler): bit-exactly on CPU, and on GPU with
``--deterministic`` (cuDNN autotuning may pick other kernels after a restart). Logs:
``metrics.csv`` (loss terms, lr, images/s, the loss's share of step time), TensorBoard when
installed, ``summary.json`` (kept as it is when a finished job is run again).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imagenet_common import (  # noqa: E402
    ARCHS,
    NORMS,
    DatasetError,
    DistEnv,
    GlobalBatchSampler,
    SyntheticImages,
    TwoViewDataset,
    all_rng_states,
    build_twin,
    check_image_folder,
    fault_due,
    init_distributed,
    kill_self,
    load_checkpoint,
    mean_over_ranks,
    parse_projector,
    save_atomic,
    set_rng_state,
)
from imagenet_lars import (  # noqa: E402
    LARS,
    lars_param_groups,
    learning_rate,
    peak_learning_rate,
)
from imagenet_losses import LOSSES, Criterion  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "runs" / "pretrain"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; the defaults are the paper's ImageNet recipe."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, help="ImageNet root holding train/<class>/<image>")
    data.add_argument("--synthetic", action="store_true",
                      help="generated images instead of --data (no files, no network)")
    data.add_argument("--synthetic-images", type=int, default=1_281_167,
                      help="length of the synthetic dataset (ImageNet's train size)")
    data.add_argument("--synthetic-resolution", type=int, default=256,
                      help="side of the generated images before augmentation")
    data.add_argument("--synthetic-on-device", action="store_true",
                      help="with --synthetic: random already-augmented tensors made on the device "
                           "(measures model + loss throughput without the CPU data pipeline)")
    data.add_argument("--image-size", type=int, default=224, help="crop size of the views")
    data.add_argument("--workers", type=int, default=None,
                      help="data-loading processes per rank (default: min(8, CPUs per rank))")
    model = p.add_argument_group("model and loss")
    model.add_argument("--arch", default="resnet50", choices=ARCHS)
    model.add_argument("--projector", default="8192-8160",
                       help="projector widths; the last is the embedding dimension D")
    model.add_argument("--norm", default="batch", choices=NORMS,
                       help="batch: BatchNorm (SyncBatchNorm on multi-GPU); group: GroupNorm, "
                            "whose statistics do not depend on the batch split (CPU parity)")
    model.add_argument("--loss", default="music", choices=LOSSES)
    model.add_argument("--segment-dim", type=int, default=80, help="MUSIC segment size K")
    model.add_argument("--normalization", default="blocks", choices=("blocks", "joint"))
    model.add_argument("--invariance-weight", type=float, default=1.0)
    model.add_argument("--temperature", type=float, default=1.0)
    model.add_argument("--backend", default="auto",
                       choices=("auto", "triton", "torch", "reference"),
                       help="MUSIC backend: auto = fused Triton kernels on CUDA, else torch")
    model.add_argument("--precision", default="auto", choices=("auto", "ieee", "tf32", "bf16"))
    model.add_argument("--no-shard", action="store_true",
                       help="every rank computes the whole MUSIC loss (default: each rank its "
                            "1/W share of the D x D joint distribution; same values and gradients)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=100)
    opt.add_argument("--batch-size", type=int, default=2048, help="global batch (all ranks)")
    opt.add_argument("--base-lr", type=float, default=0.6, help="lr = batch / 256 x base-lr")
    opt.add_argument("--final-lr-ratio", type=float, default=0.001,
                     help="lr at the end of the cosine decay, as a fraction of the peak (the "
                          "authors' released code and VICReg's: 0.001)")
    opt.add_argument("--final-lr", type=float, default=None,
                     help="an absolute final lr instead of --final-lr-ratio (the paper's text "
                          "says 0.002, VICReg's sentence)")
    opt.add_argument("--warmup-epochs", type=float, default=10.0)
    opt.add_argument("--weight-decay", type=float, default=1e-6)
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--eta", type=float, default=0.001, help="LARS trust coefficient")
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    run.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                     help="autocast dtype; auto = bf16 on CUDA, none on CPU")
    run.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                     help="auto = on for CUDA")
    run.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                     help="parameters and images (float64: check_parity's well-conditioned "
                          "comparisons on CPU; needs --amp none)")
    run.add_argument("--deterministic", action="store_true",
                     help="cudnn.benchmark off and torch.use_deterministic_algorithms(True): "
                          "the setting under which a resume continues bit-exactly on GPU")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    run.add_argument("--resume", default="auto",
                     help="auto: OUTPUT_DIR/checkpoint.pt when present; none; or a path")
    run.add_argument("--ckpt-every-steps", type=int, default=0,
                     help="also checkpoint every N steps (0: at epoch ends only)")
    run.add_argument("--stop-after-steps", type=int, default=0,
                     help="checkpoint and stop after this global step (a pre-emption; resume "
                          "with the same command)")
    run.add_argument("--no-save", action="store_true",
                     help="write no checkpoints (benchmarks)")
    run.add_argument("--log-every", type=int, default=50, help="steps between log rows")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject bad options and a missing/malformed dataset before any process group or GPU."""
    if args.synthetic == (args.data is not None):
        raise ValueError("pass exactly one of --data DIR (an ImageFolder) or --synthetic")
    if args.synthetic_on_device and not args.synthetic:
        raise ValueError("--synthetic-on-device needs --synthetic")
    if args.data is not None:
        check_image_folder(args.data, "train")
    dims = parse_projector(args.projector)
    if args.loss == "music" and dims[-1] % args.segment_dim:
        raise ValueError(f"the projector's output {dims[-1]} is not a multiple of "
                         f"--segment-dim {args.segment_dim}; e.g. --projector 8192-8160 with "
                         "--segment-dim 80")
    for name in ("epochs", "batch_size", "image_size", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_epochs < 0 or (args.workers is not None and args.workers < 0):
        raise ValueError("--warmup-epochs and --workers must be >= 0")
    if args.amp == "fp16" and args.device == "cpu":
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    if args.dtype == "float64" and args.amp not in ("none", "auto"):
        raise ValueError(f"--dtype float64 runs without autocast; drop --amp {args.amp} or "
                         "pass --amp none")
    if args.final_lr_ratio < 0 or (args.final_lr is not None and args.final_lr < 0):
        raise ValueError("--final-lr-ratio and --final-lr must be >= 0")
    if args.resume not in ("auto", "none") and not Path(args.resume).is_file():
        raise ValueError(f"--resume {args.resume} is not a file; pass a checkpoint.pt, 'auto' "
                         "(OUTPUT_DIR/checkpoint.pt when present) or 'none'")


class StepTimer:
    """Wall time of a window of steps and the time spent in the loss (CUDA events on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._sync()
        self.start = time.perf_counter()
        self.steps, self.data_s, self.loss_cpu_s = 0, 0.0, 0.0
        self.events: list[tuple[Any, Any]] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def loss_begin(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True),
                                torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def loss_end(self) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.loss_cpu_s += time.perf_counter() - self._t0

    def read(self) -> dict[str, float]:
        """Seconds per step, loss seconds per step, data-wait seconds per step."""
        self._sync()
        wall = time.perf_counter() - self.start
        loss = (sum(a.elapsed_time(b) for a, b in self.events) / 1e3 if self.cuda
                else self.loss_cpu_s)
        n = max(self.steps, 1)
        return {"step_time_s": wall / n, "loss_time_s": loss / n, "data_time_s": self.data_s / n}


class MetricsLog:
    """``metrics.csv`` (kept in step with the checkpoint on resume) and TensorBoard if present."""

    def __init__(self, out: Path, enabled: bool, resume_step: int) -> None:
        self.enabled, self.path = enabled, out / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        self.writer: Any = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop rows logged after the checkpoint
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.writer = None

    def add(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(self.rows)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.writer.add_scalar(key, float(value), int(row["step"]))


def on_device_batches(env: DistEnv, local_batch: int, size: int, seed: int,
                      start_step: int, channels_last: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless random 'augmented' view pairs made on the device (``--synthetic-on-device``)."""
    step = start_step
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    while True:
        g = torch.Generator(env.device).manual_seed(seed * 1_000_003 + step * 1009 + env.rank)
        views = torch.randn(2, local_batch, 3, size, size, device=env.device, generator=g)
        yield (views[0].contiguous(memory_format=fmt), views[1].contiguous(memory_format=fmt))
        step += 1


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss terms, learning rate and throughput against the step, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    skip = {"step", "epoch", "lr", "images_per_s", "loss_share", "step_time_s", "loss_time_s",
            "data_time_s"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in (k for k in rows[0] if k not in skip):
        axes[0].plot(steps, [float(r[key]) for r in rows], label=key)
    axes[0].set(title="loss and its terms", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [float(r["lr"]) for r in rows])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(steps, [float(r["images_per_s"]) for r in rows], label="images/s")
    axes[2].set(title="throughput (images/s)", xlabel="step")
    share = axes[2].twinx()
    share.plot(steps, [100 * float(r["loss_share"]) for r in rows], color="tab:red")
    share.set_ylabel("loss share of step time (%)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_checkpoint(path: Path, env: DistEnv, model: nn.Module, optimizer: LARS,
                    scaler: Any, step: int, steps_per_epoch: int,
                    args: argparse.Namespace) -> None:
    """Everything an exact resume needs; every rank sends its random state, rank 0 writes."""
    rng = all_rng_states(env)
    if env.main:
        save_atomic({"step": step, "steps_per_epoch": steps_per_epoch,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": rng, "args": {k: str(v) for k, v in vars(args).items()}}, path,
                    step=step)
    if env.distributed:
        dist.barrier()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; return (and write to ``summary.json``) throughput and the last losses."""
    args = build_parser().parse_args(argv)
    check_args(args)
    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(args.device)
    # --deterministic changes process-wide switches: put them back for in-process callers.
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    try:
        return _train(args, env)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if owns_group and env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, env: DistEnv) -> dict[str, Any]:
    cuda = env.device.type == "cuda"
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    amp = ("bf16" if cuda and dtype == torch.float32 else "none") if args.amp == "auto" \
        else args.amp
    if amp == "fp16" and not cuda:
        raise ValueError("--amp fp16 needs CUDA; use --amp bf16 or none")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    channels_last = cuda if args.channels_last == "auto" else args.channels_last == "on"
    if args.deterministic:
        # cuBLAS needs a fixed workspace for reproducible results; set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    elif cuda:
        # Fixed shapes: let cuDNN pick its fastest kernels (its choice may differ between
        # runs, so a resume is not bit-exact; --deterministic turns this off).
        torch.backends.cudnn.benchmark = True
    out: Path = args.output_dir
    if env.main:
        out.mkdir(parents=True, exist_ok=True)

    # Same initial weights on every rank (DDP broadcasts rank 0's anyway).
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 - seed the legacy global generator user code uses
    random.seed(args.seed)
    model: nn.Module = build_twin(args.arch, args.projector, args.norm, args.seed)
    if args.norm == "batch" and env.distributed:
        if cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.main:
            print("note: BatchNorm on CPU ranks uses per-rank statistics (SyncBatchNorm is "
                  "CUDA-only); --norm group makes them split-independent", file=sys.stderr)
    model.to(env.device, dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    plain_model = model
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if cuda else None)
    optimizer = LARS(lars_param_groups(plain_model), lr=0.0, weight_decay=args.weight_decay,
                     momentum=args.momentum, eta=args.eta)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    criterion = Criterion(args.loss, segment_dim=args.segment_dim, backend=args.backend,
                          precision=args.precision, normalization=args.normalization,
                          invariance_weight=args.invariance_weight,
                          temperature=args.temperature, shard=not args.no_shard)

    images = (SyntheticImages(args.synthetic_images, args.synthetic_resolution, seed=args.seed)
              if args.synthetic else torchvision.datasets.ImageFolder(str(args.data / "train")))
    sampler = GlobalBatchSampler(len(images), args.batch_size, env.rank, env.world_size,
                                 args.seed)
    workers = args.workers
    if workers is None:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = min(8, max(1, (os.cpu_count() or 1) // per_node - 1))
    loader = None if args.synthetic_on_device else torch.utils.data.DataLoader(
        TwoViewDataset(images, args.image_size, args.seed), batch_size=sampler.local_batch,
        sampler=sampler, num_workers=workers, pin_memory=cuda, drop_last=True,
        persistent_workers=workers > 0)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak = peak_learning_rate(args.batch_size, args.base_lr)
    final = args.final_lr if args.final_lr is not None else peak * args.final_lr_ratio

    step = 0
    ckpt_path = out / "checkpoint.pt"
    resume = (ckpt_path if args.resume == "auto" and ckpt_path.exists()
              else None if args.resume in ("auto", "none") else Path(args.resume))
    if resume is not None:
        state = load_checkpoint(resume)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(f"{resume} was written with {state['steps_per_epoch']} steps per "
                             f"epoch, this run has {steps_per_epoch}: same --batch-size and "
                             "dataset needed to resume")
        plain_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][env.rank % len(state["rng"])])
        step = state["step"]
        if env.main:
            print(f"resumed from {resume} at step {step} (epoch {step // steps_per_epoch}, "
                  f"batch {step % steps_per_epoch})", file=sys.stderr)
    started_at = step
    log = MetricsLog(out, env.main, step)
    if env.main:
        print(f"{args.loss} | {args.arch} {args.projector} norm={args.norm} | "
              f"{env.world_size} x {sampler.local_batch} = {args.batch_size} per step, "
              f"{steps_per_epoch} steps/epoch, {args.epochs} epochs | lr peak {peak:g} -> "
              f"{final:g} | device {env.device} amp={amp} backend={args.backend}",
              file=sys.stderr)

    timer, window_timer = StepTimer(env.device), StepTimer(env.device)
    bench_from = step + min(5, max(0, (total_steps - step) // 4))  # steady-state window start
    last: dict[str, float] = {}
    stop = args.stop_after_steps or total_steps
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    while step < min(stop, total_steps):
        epoch, first = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, first)
        batches: Any = (on_device_batches(env, sampler.local_batch, args.image_size, args.seed,
                                          step, channels_last)
                        if loader is None else iter(loader))
        bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch}",
                   disable=not env.main or args.no_progress, dynamic_ncols=True)
        for _ in range(first, steps_per_epoch):
            if step == bench_from:
                timer.reset()
            t_data = time.perf_counter()
            x1, x2 = next(batches)
            x1 = x1.to(env.device, dtype, non_blocking=True, memory_format=fmt)
            x2 = x2.to(env.device, dtype, non_blocking=True, memory_format=fmt)
            waited = time.perf_counter() - t_data
            timer.data_s += waited
            window_timer.data_s += waited
            lr = learning_rate(step, total_steps=total_steps, warmup_steps=warmup_steps,
                               peak=peak, final=final)
            for group in optimizer.param_groups:
                group["lr"] = lr

            with torch.autocast(env.device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                z1, z2 = model(x1, x2)
            # The loss runs on detached copies so its forward + backward can be timed apart;
            # the chain rule then continues into the network: the same gradients.
            z1_leaf, z2_leaf = z1.detach().requires_grad_(), z2.detach().requires_grad_()
            timer.loss_begin()
            window_timer.loss_begin()
            with torch.autocast(env.device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                loss, terms = criterion(z1_leaf, z2_leaf)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            timer.loss_end()
            window_timer.loss_end()
            torch.autograd.backward((z1, z2), (z1_leaf.grad, z2_leaf.grad))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if fault_due("step", step, env.rank):
                kill_self(f"rank {env.rank} after step {step}")
            timer.steps += 1
            window_timer.steps += 1
            bar.update(1)

            if step % args.log_every == 0 or step == min(stop, total_steps):
                values = mean_over_ranks(torch.stack([loss.detach().double(),
                                                      *[t.detach().double()
                                                        for t in terms.values()]]))
                numbers = values.tolist()
                if not all(math.isfinite(v) for v in numbers):
                    raise FloatingPointError(f"non-finite loss {numbers} at step {step}; lower "
                                             "--base-lr or check --amp")
                times = window_timer.read()
                window_timer.reset()
                last = {"loss": numbers[0], **dict(zip(terms, numbers[1:]))}
                row = {"step": step, "epoch": epoch, "lr": lr, **last,
                       "images_per_s": args.batch_size / times["step_time_s"],
                       "loss_share": times["loss_time_s"] / times["step_time_s"], **times}
                log.add(row)
                bar.set_postfix(loss=f"{numbers[0]:.4f}", lr=f"{lr:.3g}",
                                img_s=f"{row['images_per_s']:.0f}")
                if env.main and args.no_progress:
                    print(f"step {step}/{total_steps} epoch {epoch} loss {numbers[0]:.6f} "
                          f"lr {lr:.4g} {row['images_per_s']:.1f} img/s loss share "
                          f"{row['loss_share']:.1%}", file=sys.stderr)
            at_epoch_end = step % steps_per_epoch == 0
            periodic = args.ckpt_every_steps and step % args.ckpt_every_steps == 0
            if not args.no_save and (at_epoch_end or periodic or step == stop):
                save_checkpoint(ckpt_path, env, plain_model, optimizer, scaler, step,
                                steps_per_epoch, args)
            if step >= stop:
                break
        bar.close()

    times = timer.read()
    summary_path = out / "summary.json"
    if step == started_at and step >= total_steps and summary_path.exists():
        # Re-running a finished job trains nothing: keep the summary of the run that did.
        finished: dict[str, Any] = json.loads(summary_path.read_text())
        if env.main:
            print(f"already finished: {step}/{total_steps} steps; kept {summary_path}",
                  file=sys.stderr)
        return finished
    summary = {
        "loss_name": args.loss, "backend": args.backend, "arch": args.arch,
        "projector": args.projector, "norm": args.norm, "device": str(env.device),
        "gpu": torch.cuda.get_device_name(env.device) if cuda else None,
        "world_size": env.world_size, "global_batch": args.batch_size, "amp": amp,
        "dtype": args.dtype, "deterministic": args.deterministic,
        "steps": step, "total_steps": total_steps, "finished": step >= total_steps,
        "timed_steps": timer.steps,
        "images_per_s": args.batch_size / times["step_time_s"] if timer.steps else None,
        "loss_share": times["loss_time_s"] / times["step_time_s"] if timer.steps else None,
        **{f"mean_{k}": v for k, v in times.items()},
        "last": last,
    }
    if env.main:
        if step >= total_steps and not args.no_save:
            save_atomic({"arch": args.arch, "norm": args.norm,
                         "state_dict": plain_model.backbone.state_dict()},  # type: ignore[union-attr]
                        out / "backbone.pt")
        summary_path.write_text(json.dumps(summary, indent=2))
        plot_metrics(log.rows, out / "metrics.png")
        print(f"done: {step}/{total_steps} steps | {summary['images_per_s'] or 0:.1f} images/s "
              f"| loss share of step time {summary['loss_share'] or 0:.1%} | last {last} | "
              f"{out}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main()
    except DatasetError as err:
        sys.exit(f"pretrain.py: error: {err}")
