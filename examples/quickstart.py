"""Quickstart: self-supervised pretraining with MUSIC on real images, on a CPU, in minutes.

Trains a small CNN on scikit-learn's bundled 8x8 digits (no download) with two augmented
views per image and ``MUSICLoss``, then fits linear probes on the frozen features with
1, 5, 10 labels per class and with every label, against the same network at random
initialisation and against raw pixels, on a held-out split.

    python examples/quickstart.py            # a few minutes on 2 CPU cores
    python examples/quickstart.py --epochs 5 # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _progress import progress_bar  # sibling module: a tqdm bar on a terminal, plain lines in logs
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from music_loss import MUSICLoss

LABELS_PER_CLASS = (1, 5, 10, None)  # None: every training label


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (pad 1, crop 8x8), contrast jitter, pixel noise and a 3x3 erased patch."""
    n = x.shape[0]
    padded = nn.functional.pad(x[:, 0], (1, 1, 1, 1))
    grid = torch.arange(8)
    dx, dy = torch.randint(0, 3, (2, n, 1, 1), generator=gen)
    rows, cols = dy + grid[None, :, None], dx + grid[None, None, :]
    shifted = padded[torch.arange(n)[:, None, None], rows, cols]
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, generator=gen)
    out = shifted * contrast + 0.1 * torch.randn(shifted.shape, generator=gen)
    ex, ey = torch.randint(0, 6, (2, n, 1, 1), generator=gen)
    erase = torch.rand(n, 1, 1, generator=gen) < 0.5
    r, c = grid[None, :, None] - ey, grid[None, None, :] - ex  # offsets from the patch corner
    inside = (r >= 0) & (r < 3) & (c >= 0) & (c < 3)
    return out.masked_fill(inside & erase, 0.0).unsqueeze(1)


class Encoder(nn.Module):
    """A small CNN for 8x8 images: 128-d features."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def projector(dim: int) -> nn.Module:
    """Two layers, as in the paper (Linear-BN-ReLU-Linear without bias)."""
    return nn.Sequential(nn.Linear(128, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, dim, bias=False))


@torch.no_grad()
def features(encoder: nn.Module, x: torch.Tensor) -> np.ndarray:
    encoder.eval()
    return encoder(x).numpy()


def probe_accuracy(train_f, train_y, test_f, test_y, per_class, seeds=5) -> float:
    """Held-out accuracy of a logistic-regression probe; few-label results average 5 draws."""
    draws = 1 if per_class is None else seeds
    accs = []
    for seed in range(draws):
        if per_class is None:
            idx = np.arange(len(train_y))
        else:
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), per_class,
                                             replace=False) for c in range(10)])
        scaler = StandardScaler().fit(train_f[idx])
        clf = LogisticRegression(max_iter=2000, C=1.0)
        clf.fit(scaler.transform(train_f[idx]), train_y[idx])
        accs.append(clf.score(scaler.transform(test_f), test_y))
    return float(np.mean(accs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512, help="projector output D")
    parser.add_argument("--segment-dim", type=int, default=16, help="bins per segment K")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()

    digits = load_digits()
    x_all = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y_all = digits.target
    train_idx, test_idx = train_test_split(np.arange(len(y_all)), test_size=0.3,
                                           stratify=y_all, random_state=args.seed)
    x_train, x_test = x_all[train_idx], x_all[test_idx]
    y_train, y_test = y_all[train_idx], y_all[test_idx]

    encoder, head = Encoder(), projector(args.dim)
    random_encoder = Encoder()
    random_encoder.load_state_dict(encoder.state_dict())  # the same network, untrained
    loss_fn = MUSICLoss(segment_dim=args.segment_dim)  # backend "auto": the torch path on CPU
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(x_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)

    print(f"MUSIC pretraining on {len(x_train)} digits (D={args.dim}, K={args.segment_dim}, "
          f"S={args.dim // args.segment_dim}), {args.epochs} epochs")
    bar = progress_bar(steps, "step", every_seconds=5)
    for _ in range(args.epochs):
        encoder.train()
        head.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(len(x_train) // args.batch_size):
            batch = x_train[order[i * args.batch_size:(i + 1) * args.batch_size]]
            z1 = head(encoder(augment(batch, gen)))
            z2 = head(encoder(augment(batch, gen)))
            terms = loss_fn(z1, z2, return_terms=True)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            schedule.step()
            entropy = (terms.diag + terms.off).item()
            bar.set_postfix(loss=f"{terms.loss.item():.3f}", entropy=f"{entropy:.3f}",
                            invariance=f"{terms.invariance.item():.3f}")
            bar.update()
    bar.close()

    rows = {
        "MUSIC (pretrained)": (features(encoder, x_train), features(encoder, x_test)),
        "random init": (features(random_encoder, x_train), features(random_encoder, x_test)),
        "raw pixels": (x_train.flatten(1).numpy(), x_test.flatten(1).numpy()),
    }
    header = ["features"] + [f"{k}/class" if k else "all labels" for k in LABELS_PER_CLASS]
    print("\nHeld-out linear-probe accuracy (%), digits test split of "
          f"{len(y_test)} images:")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (train_f, test_f) in rows.items():
        accs = [probe_accuracy(train_f, y_train, test_f, y_test, k) for k in LABELS_PER_CLASS]
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f}" for a in accs) + " |")
    print(f"\nwall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
