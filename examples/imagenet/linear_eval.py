"""Linear evaluation of a pretrained backbone on ImageNet (the standard protocol).

Frozen backbone (eval mode) and a linear head trained with SGD (momentum 0.9) and a cosine
schedule over the epochs, the VICReg evaluation settings (100 epochs, head lr 0.02, weight
decay 1e-6): random resized crop 224 + flip for training, resize 256 + centre crop 224 for
validation, top-1 and top-5 accuracy on ``val/``.

``--weights finetune`` also trains the backbone: the semi-supervised protocol of the paper's
Table 2, which used Barlow Twins' settings, the defaults in that mode: 20 epochs, backbone lr
0.005, head lr 0.5, weight decay 0. Table 2 trains on the SimCLR 1 % / 10 % subsets: pass
them with ``--subset-file`` (one training file name per line, e.g. ``n01440764_10026.JPEG``,
as in SimCLR's ``1percent.txt`` / ``10percent.txt``). ``--train-percent`` without a subset
file draws a seeded class-balanced subset instead, whose results are not comparable to
Table 2.

    torchrun --nproc_per_node 8 examples/imagenet/linear_eval.py --data /path/to/imagenet \\
        --pretrained examples/imagenet/runs/pretrain/backbone.pt
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imagenet_common import (  # noqa: E402
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMS,
    DatasetError,
    DistEnv,
    build_backbone,
    check_image_folder,
    init_distributed,
    load_checkpoint,
    save_atomic,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "runs" / "linear_eval"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="root with train/ and val/")
    p.add_argument("--pretrained", type=Path, required=True,
                   help="backbone.pt or checkpoint.pt from pretrain.py, or a torchvision "
                        "ResNet state dict")
    p.add_argument("--arch", default=None, choices=ARCHS,
                   help="default: read from backbone.pt, else resnet50")
    p.add_argument("--norm", default=None, choices=NORMS,
                   help="default: read from backbone.pt, else batch")
    p.add_argument("--weights", default="freeze", choices=("freeze", "finetune"))
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 100 (freeze), 20 (finetune)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch")
    p.add_argument("--lr-head", type=float, default=None,
                   help="default: 0.02 (freeze, VICReg), 0.5 (finetune, Barlow Twins)")
    p.add_argument("--lr-backbone", type=float, default=None,
                   help="with --weights finetune; default 0.005 (Barlow Twins)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="default: 1e-6 (freeze), 0 (finetune)")
    p.add_argument("--train-percent", type=int, default=100, choices=(1, 10, 100))
    p.add_argument("--subset-file", type=Path, default=None,
                   help="training file names to keep, one a line (SimCLR's 1percent.txt / "
                        "10percent.txt, e.g. n01440764_10026.JPEG): Table 2's subsets")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256, help="validation resize before the crop")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--no-progress", action="store_true")
    return p


def load_backbone(path: Path, arch: str | None, norm: str | None) -> tuple[nn.Module, int]:
    """Build the encoder and load pretrained weights from any of the three file kinds."""
    if not path.is_file():
        raise ValueError(f"--pretrained {path} is not a file; pass backbone.pt from pretrain.py")
    blob = load_checkpoint(path)
    if isinstance(blob, dict) and "state_dict" in blob and "arch" in blob:
        state = blob["state_dict"]
        arch, norm = arch or blob["arch"], norm or blob["norm"]
    elif isinstance(blob, dict) and "model" in blob:
        state = {k[len("backbone."):]: v for k, v in blob["model"].items()
                 if k.startswith("backbone.")}
        saved = blob.get("args", {})
        arch, norm = arch or saved.get("arch", "resnet50"), norm or saved.get("norm", "batch")
    else:
        state = {k.removeprefix("module."): v for k, v in blob.items()
                 if not k.removeprefix("module.").startswith("fc.")}
    net, width = build_backbone(arch or "resnet50", norm or "batch")
    net.load_state_dict(state)
    return net, width


def subset_indices(dataset: torchvision.datasets.ImageFolder, percent: int,
                   subset_file: Path | None, seed: int) -> list[int]:
    """Indices of the training subset: the listed files, or ``percent`` % of every class."""
    if subset_file is not None:
        keep = {line.strip() for line in subset_file.read_text().splitlines() if line.strip()}
        chosen = [i for i, (path, _) in enumerate(dataset.samples) if Path(path).name in keep]
        if not chosen:
            raise ValueError(f"no training image of {dataset.root} is named in {subset_file}")
        return chosen
    if percent == 100:
        return list(range(len(dataset)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, target in enumerate(dataset.targets):
        by_class[target].append(i)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for members in by_class.values():
        take = max(1, math.ceil(len(members) * percent / 100))
        order = torch.randperm(len(members), generator=generator)[:take].tolist()
        chosen += [members[j] for j in order]
    return sorted(chosen)


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, k: int) -> tuple[int, int]:
    """Correct top-1 and top-k predictions in a batch.

    Example:
        >>> accuracy_counts(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]), 2)
        (1, 2)
    """
    top = logits.topk(k, dim=1).indices
    hits = top == target[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


#: Defaults per ``--weights``: VICReg's linear probe; Barlow Twins' semi-supervised fine-tuning
#: (the settings the paper's Table 2 used).
PROTOCOL_DEFAULTS = {
    "freeze": {"epochs": 100, "lr_head": 0.02, "lr_backbone": 0.0, "weight_decay": 1e-6},
    "finetune": {"epochs": 20, "lr_head": 0.5, "lr_backbone": 0.005, "weight_decay": 0.0},
}


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset with the defaults of the chosen protocol.

    Example:
        >>> args = resolve_defaults(build_parser().parse_args(
        ...     ["--data", "d", "--pretrained", "p", "--weights", "finetune"]))
        >>> args.epochs, args.lr_backbone, args.lr_head, args.weight_decay
        (20, 0.005, 0.5, 0.0)
    """
    for key, value in PROTOCOL_DEFAULTS[args.weights].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = resolve_defaults(build_parser().parse_args(argv))
    train_dir = check_image_folder(args.data, "train")
    val_dir = check_image_folder(args.data, "val")
    if args.batch_size < 1 or args.epochs < 1:
        raise ValueError("--batch-size and --epochs must be >= 1")
    if not args.pretrained.is_file():
        raise ValueError(f"--pretrained {args.pretrained} is not a file; pass backbone.pt "
                         "from pretrain.py")
    if args.subset_file is not None and not args.subset_file.is_file():
        raise ValueError(f"--subset-file {args.subset_file} is not a file")
    if args.train_percent < 100 and args.subset_file is None:
        print(f"note: --train-percent {args.train_percent} without --subset-file draws a seeded "
              "class-balanced subset: results are not comparable to the paper's Table 2, which "
              "used SimCLR's 1percent.txt / 10percent.txt", file=sys.stderr)
    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(args.device)
    try:
        return _run(args, env, train_dir, val_dir)
    finally:
        if owns_group and env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, env: DistEnv, train_dir: Path,
         val_dir: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if args.batch_size % env.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of "
                         f"{env.world_size} processes")
    backbone, width = load_backbone(args.pretrained, args.arch, args.norm)
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_set = torchvision.datasets.ImageFolder(str(train_dir), transforms.Compose([
        transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    val_set = torchvision.datasets.ImageFolder(str(val_dir), transforms.Compose([
        transforms.Resize(args.resize), transforms.CenterCrop(args.image_size),
        transforms.ToTensor(), normalize]))
    if train_set.classes != val_set.classes:
        raise DatasetError(f"{train_dir} and {val_dir} hold different class folders")
    num_classes = len(train_set.classes)
    train_subset = torch.utils.data.Subset(
        train_set, subset_indices(train_set, args.train_percent, args.subset_file, args.seed))

    head = nn.Linear(width, num_classes)
    head.weight.data.normal_(mean=0.0, std=0.01)
    head.bias.data.zero_()
    model = nn.Sequential(backbone, head).to(env.device)
    frozen = args.weights == "freeze"
    backbone.requires_grad_(not frozen)
    groups = [{"params": head.parameters(), "lr": args.lr_head}]
    if not frozen:
        groups.append({"params": backbone.parameters(), "lr": args.lr_backbone})
    ddp_model: nn.Module = model
    if env.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)

    local = args.batch_size // env.world_size
    kwargs: dict[str, Any] = {"num_workers": args.workers,
                              "pin_memory": env.device.type == "cuda"}
    train_sampler: torch.utils.data.distributed.DistributedSampler[Any] = (
        torch.utils.data.distributed.DistributedSampler(
            train_subset, env.world_size, env.rank, shuffle=True, seed=args.seed))
    val_sampler: torch.utils.data.distributed.DistributedSampler[Any] = (
        torch.utils.data.distributed.DistributedSampler(val_set, env.world_size, env.rank,
                                                        shuffle=False))
    train_loader = torch.utils.data.DataLoader(train_subset, local, sampler=train_sampler,
                                               **kwargs)
    val_loader = torch.utils.data.DataLoader(val_set, local, sampler=val_sampler, **kwargs)

    out: Path = args.output_dir
    ckpt_path = out / "checkpoint.pt"
    start_epoch = 0
    k = min(5, num_classes)
    rows: list[dict[str, Any]] = []
    best = {"top1": 0.0, "top5": 0.0}
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        best = state.get("best", best)  # the best accuracy so far survives a resume
        rows = state.get("rows", rows)
    summary_path = out / "summary.json"
    if start_epoch >= args.epochs and summary_path.exists():
        # Re-running a finished job evaluates nothing: keep the summary of the run that did.
        finished: dict[str, Any] = json.loads(summary_path.read_text())
        if env.main:
            print(f"already finished ({start_epoch} epochs); kept {summary_path}",
                  file=sys.stderr)
        return finished
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"linear eval ({args.weights}) | {num_classes} classes | "
              f"{len(train_subset)} train / {len(val_set)} val images | "
              f"{env.world_size} x {local} per step", file=sys.stderr)
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        ddp_model.train()
        if frozen:
            backbone.eval()  # frozen statistics too
        total_loss, seen = 0.0, 0
        for images, target in tqdm(train_loader, desc=f"epoch {epoch}",
                                   disable=not env.main or args.no_progress):
            images, target = images.to(env.device), target.to(env.device)
            loss = F.cross_entropy(ddp_model(images), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(target)
            seen += len(target)
        scheduler.step()

        model.eval()
        counts = torch.zeros(4, dtype=torch.float64, device=env.device)
        with torch.no_grad():
            for images, target in val_loader:
                images, target = images.to(env.device), target.to(env.device)
                top1, topk = accuracy_counts(model(images), target, k)
                counts += torch.tensor([top1, topk, len(target), 0.0], dtype=torch.float64,
                                       device=env.device)
        counts[3] = total_loss
        if env.distributed:
            dist.all_reduce(counts)
        # DistributedSampler pads the validation set to a multiple of the ranks: exact on one
        # process, at most world_size - 1 repeated images otherwise.
        row = {"epoch": epoch + 1, "train_loss": float(counts[3]) / max(seen * env.world_size,
                                                                          1),
               "top1": 100 * float(counts[0] / counts[2]),
               f"top{k}": 100 * float(counts[1] / counts[2])}
        rows.append(row)
        best["top1"] = max(best["top1"], row["top1"])
        best["top5"] = max(best["top5"], row[f"top{k}"])
        if env.main:
            print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f} top-1 {row['top1']:.2f} "
                  f"top-{k} {row[f'top{k}']:.2f}", file=sys.stderr)
            with (out / "metrics.csv").open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if f.tell() == 0:
                    writer.writeheader()
                writer.writerow(row)
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                         "best": best, "rows": rows}, ckpt_path)
        if env.distributed:
            dist.barrier()
    summary = {"weights": args.weights, "train_images": len(train_subset),
               "subset_file": str(args.subset_file) if args.subset_file else None,
               "val_images": len(val_set), "epochs": args.epochs,
               "final": rows[-1] if rows else None, "best_top1": best["top1"],
               f"best_top{k}": best["top5"]}
    if env.main:
        summary_path.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except DatasetError as err:
        sys.exit(f"linear_eval.py: error: {err}")
