"""MUSIC pretraining with PyTorch Lightning: 2 DDP processes on the CPU, a linear-probe callback.

The ``LightningModule`` builds ``MUSICLoss(gather_distributed=True)`` in its ``__init__``,
before the trainer starts the processes and their process group (the order Lightning and
most trainers use); the loss checks for the group at its first call. Each rank then passes
its local views and the loss all-gathers them, so the entropy terms see the global batch.

Data: scikit-learn's bundled 8x8 digits (no download), 70 % for pretraining (labels unused),
30 % held out. After every epoch ``LinearProbe`` fits a logistic regression on the frozen
features of the training split (with labels) and reports its held-out accuracy, next to the
same probe on raw pixels.

    python examples/lightning/train.py                  # 10 epochs, about a minute on 2 cores
    python examples/lightning/train.py --max-steps 20   # a quick look

Needs ``pip install -e ".[integrations,examples]"`` (pytorch-lightning, scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from music_loss import MUSICLoss


def augment(x: torch.Tensor) -> torch.Tensor:
    """One random view of a batch of ``(n, 1, 8, 8)`` digits: shift by up to 1 px, contrast,
    noise."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,)).tolist()  # one shift per batch: cheap, still varied
    shifted = padded[:, :, dy:dy + 8, dx:dx + 8]
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1)
    return shifted * contrast + 0.1 * torch.randn_like(shifted)


class MUSICPretraining(pl.LightningModule):
    """A small CNN and a two-layer projector trained with the MUSIC loss."""

    def __init__(self, dim: int = 256, segment_dim: int = 16, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.projector = nn.Sequential(nn.Linear(128, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                       nn.Linear(512, dim, bias=False))
        # Built before any process group exists; the all-gather happens in each step.
        self.criterion = MUSICLoss(segment_dim=segment_dim, gather_distributed=True)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (images,) = batch
        z1 = self.projector(self.encoder(augment(images)))
        z2 = self.projector(self.encoder(augment(images)))
        terms = self.criterion(z1, z2, return_terms=True)
        # Every rank's loss carries the same global entropy part and its own invariance term:
        # sync_dist averages them, which is the single-process loss of the global batch.
        self.log("loss", terms.loss, prog_bar=True, sync_dist=True)
        self.log("invariance", terms.invariance, sync_dist=True)
        return terms.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=1e-4)


class LinearProbe(pl.Callback):
    """Before training and after each epoch: held-out accuracy of logistic-regression probes
    on the frozen encoder's features, with every training label and with 5 per class."""

    def __init__(self, train: tuple[torch.Tensor, np.ndarray],
                 test: tuple[torch.Tensor, np.ndarray]) -> None:
        self.train, self.test = train, test
        self.history: list[dict[str, float]] = []

    @staticmethod
    def fit_score(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                  test_y: np.ndarray, per_class: int | None = None, draws: int = 5) -> float:
        """Held-out accuracy with every training label, or with ``per_class`` labels per
        class (the mean over ``draws`` random draws of the labelled samples)."""
        accuracies = []
        for draw in range(1 if per_class is None else draws):
            if per_class is None:
                idx = np.arange(len(train_y))
            else:
                rng = np.random.default_rng(draw)
                idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), per_class,
                                                 replace=False) for c in np.unique(train_y)])
            scaler = StandardScaler().fit(train_f[idx])
            probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_f[idx]),
                                                          train_y[idx])
            accuracies.append(probe.score(scaler.transform(test_f), test_y))
        return float(np.mean(accuracies))

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._record(trainer, module)  # the network at initialisation, for comparison

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._record(trainer, module)

    def _record(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:  # the probe is cheap: one rank fits it
            return
        was_training = module.training
        module.eval()
        with torch.no_grad():
            train_f = module.encoder(self.train[0].to(module.device)).cpu().numpy()
            test_f = module.encoder(self.test[0].to(module.device)).cpu().numpy()
        module.train(was_training)
        labels = (self.train[1], test_f, self.test[1])
        loss = trainer.callback_metrics.get("loss")
        record = {"step": trainer.global_step,
                  "loss": float(loss) if loss is not None else None,
                  "probe_all_labels": self.fit_score(train_f, *labels),
                  "probe_5_per_class": self.fit_score(train_f, *labels, per_class=5)}
        self.history.append(record)
        print(f"step {record['step']:>4}: loss "
              + ("   --   " if loss is None else f"{record['loss']:8.4f}")
              + f"; held-out linear probe {100 * record['probe_all_labels']:.1f} % "
              f"(all labels), {100 * record['probe_5_per_class']:.1f} % (5 per class)",
              flush=True)


class FirstStepLoss(pl.Callback):
    """Keeps the first logged loss, to report where training started."""

    first: float | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.first is None:
            self.first = float(trainer.callback_metrics["loss"])  # mean over the ranks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop early (-1: no limit)")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--devices", type=int, default=2, help="DDP processes")
    parser.add_argument("--dim", type=int, default=256, help="projector output D")
    parser.add_argument("--segment-dim", type=int, default=16, help="bins per segment K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", type=Path, help="write the probe history here (JSON)")
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    torch.set_num_threads(1)  # 2 processes on 2 cores

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.3,
                                           stratify=digits.target, random_state=args.seed)
    loader = DataLoader(TensorDataset(images[train_idx]), batch_size=args.batch_size,
                        shuffle=True, drop_last=True)  # equal per-rank batches

    module = MUSICPretraining(args.dim, args.segment_dim)  # before the processes start
    probe = LinearProbe((images[train_idx], digits.target[train_idx]),
                        (images[test_idx], digits.target[test_idx]))
    first = FirstStepLoss()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=args.devices, max_epochs=args.epochs,
        max_steps=args.max_steps, callbacks=[probe, first], logger=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=5,
        enable_progress_bar=sys.stdout.isatty())  # plain per-epoch lines in logs
    trainer.fit(module, loader)

    if trainer.is_global_zero:
        raw = (images[train_idx].flatten(1).numpy(), digits.target[train_idx],
               images[test_idx].flatten(1).numpy(), digits.target[test_idx])
        pixels = {"probe_all_labels": LinearProbe.fit_score(*raw),
                  "probe_5_per_class": LinearProbe.fit_score(*raw, per_class=5)}
        print(f"world size {trainer.world_size}, global batch {trainer.world_size} x "
              f"{args.batch_size}; first-step loss {first.first:.4f}; raw pixels: "
              f"{100 * pixels['probe_all_labels']:.1f} % (all labels), "
              f"{100 * pixels['probe_5_per_class']:.1f} % (5 per class)")
        if args.summary:
            args.summary.write_text(json.dumps({
                "world_size": trainer.world_size, "first_step_loss": first.first,
                "raw_pixels": pixels, "epochs": probe.history}, indent=1))


if __name__ == "__main__":
    main()
