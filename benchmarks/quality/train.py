"""One self-supervised run: the backbone, the methods, the training loop and the probes.

Every method trains the same encoder + projector with the same augmentations, optimiser,
schedule, batch size and number of steps; only the loss differs. Evaluation freezes the
encoder and reads its representation (not the projector output) on un-augmented images.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from benchmarks.baselines import barlow_twins_loss, vicreg_loss
from benchmarks.quality.data import Augment, ImageSplit
from music_loss import MUSICLoss, MUSICTerms
from music_loss.metrics import diagnostics

#: Methods that train (the loss name -> a human label); the two baselines do not train.
METHODS: dict[str, str] = {
    "music_blocks": "MUSIC (blocks, Eq. 5)",
    "music_joint": "MUSIC (joint, Eq. 3)",
    "music_entropy_only": "MUSIC entropy only (w_inv = 0)",
    "music_invariance_only": "MUSIC invariance only (collapse control)",
    "barlow_twins": "Barlow Twins",
    "vicreg": "VICReg",
}
BASELINES: dict[str, str] = {
    "random_init": "random-init encoder",
    "raw_pixels": "raw pixels",
}
MUSIC_METHODS = tuple(m for m in METHODS if m.startswith("music"))


@dataclass(frozen=True)
class TrainConfig:
    """The budget and optimiser every method shares."""

    epochs: int = 60
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_epochs: int = 5
    rep_dim: int = 128
    hidden_dim: int = 512
    temperature: float = 1.0
    backend: str = "torch"
    log_every: int = 5  # epochs between k-NN points on the training curve (0: none)
    few_labels_per_class: tuple[int, ...] = (1, 5)
    few_label_draws: int = 10
    knn_ks: tuple[int, ...] = (1, 5, 20)
    augment: Augment = field(default_factory=Augment)
    projector_depth: int = 2
    #: Keyword arguments of the method's loss (MUSIC: temperature via ``temperature``
    #: above; Barlow Twins: ``lambd``; VICReg: ``sim_coeff``, ``std_coeff``, ``cov_coeff``).
    loss_params: dict[str, float] = field(default_factory=dict)
    diagnostics: bool = True  # MUSIC's per-step metrics on the curve (costs time)

    @property
    def knn_k(self) -> int:
        """The k of the training curve's k-NN point (the middle of ``knn_ks``)."""
        return sorted(self.knn_ks)[len(self.knn_ks) // 2]


class Encoder(nn.Module):
    """A small CNN: conv layers (BatchNorm, ReLU), then a linear layer to ``rep_dim``.

    8x8 digits: 4 conv layers, 8x8 -> 2x2x128. 28x28 MNIST: 3 stride-2 conv layers and one
    stride-1, 28 -> 14 -> 7 -> 4 (x128): about twice the multiply-adds per image.

    Example:
        >>> Encoder(16, image_size=28)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 16])
    """

    def __init__(self, rep_dim: int = 128, image_size: int = 8) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        if image_size == 8:
            layers = [*block(1, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2)]
            flat = 128 * 2 * 2
        elif image_size == 28:
            layers = [*block(1, 32, 2), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2)]
            flat = 128 * 4 * 4
        else:
            raise ValueError(f"image_size must be 8 or 28, got {image_size}")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(flat, rep_dim, bias=False), nn.BatchNorm1d(rep_dim),
                                  nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def projector(rep_dim: int, hidden_dim: int, out_dim: int, depth: int = 2) -> nn.Module:
    """An MLP projector of ``depth`` linear layers (the paper's depth counting, Table 5).

    ``depth - 1`` hidden layers (Linear, BatchNorm, ReLU) of ``hidden_dim``, then a linear
    layer to ``out_dim``. Depth 2 is the paper's best for MUSIC; peers often prefer 3.

    Example:
        >>> sum(isinstance(m, nn.Linear) for m in projector(8, 16, 32, depth=3))
        3
    """
    if depth < 1:
        raise ValueError(f"projector depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    width = rep_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                   nn.ReLU(inplace=True)]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


def images_side(split: ImageSplit) -> int:
    """The side length of the (square) images of ``split``."""
    return int(split.train_images.shape[-1])


LossFn = Callable[[Tensor, Tensor], Tensor]


def make_loss(method: str, segment_dim: int, cfg: TrainConfig) -> LossFn:
    """The loss of ``method`` as ``f(z1, z2) -> scalar`` (peers: ``cfg.loss_params`` over their
    paper defaults)."""
    common: dict[str, Any] = {"temperature": cfg.temperature, "backend": cfg.backend}
    params = dict(cfg.loss_params)
    if method == "music_blocks":
        return MUSICLoss(segment_dim, normalization="blocks", **common)
    if method == "music_joint":
        return MUSICLoss(segment_dim, normalization="joint", **common)
    if method == "music_entropy_only":
        return MUSICLoss(segment_dim, invariance_weight=0.0, **common)
    if method == "music_invariance_only":
        return MUSICLoss(segment_dim, diag_weight=0.0, off_weight=0.0, **common)
    if method == "barlow_twins":
        return functools.partial(barlow_twins_loss, **params)
    if method == "vicreg":
        return functools.partial(vicreg_loss, **params)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@torch.no_grad()
def encode(encoder: nn.Module, images: Tensor, batch_size: int = 512) -> np.ndarray:
    """Frozen representations of un-augmented images (eval mode: BN running statistics)."""
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    encoder.train(was_training)
    return out.numpy()


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, k: int) -> float:
    """k-NN (cosine distance, majority vote) accuracy on the held-out split."""
    with threadpool_limits(limits=1, user_api="blas"):
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
        return float(knn.score(test_x, test_y))


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray) -> float:
    """Logistic regression on standardised features (scaler fit on the probe's train set).

    BLAS runs single-threaded here: these problems are tiny, and a multi-threaded BLAS on
    shared cores made each fit 20x slower (2 s instead of 0.1 s).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        scaler = StandardScaler().fit(train_x)
        probe = LogisticRegression(max_iter=2000, C=1.0)
        probe.fit(scaler.transform(train_x), train_y)
        return float(probe.score(scaler.transform(test_x), test_y))


def few_label_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator
                      ) -> np.ndarray:
    """``per_class`` random training indices of each class."""
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                           for c in np.unique(labels)])


def evaluate_features(train_x: np.ndarray, test_x: np.ndarray, split: ImageSplit,
                      cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Linear probe (all labels; n labels per class, averaged over draws) and k-NN per k.

    Keys: ``linear_probe_acc``, ``linear_probe_<n>_acc`` (and ``..._draw_std``) for each n of
    ``cfg.few_labels_per_class``, ``knn_<k>_acc`` for each k of ``cfg.knn_ks``. The label
    draws depend only on ``seed``, so two methods of the same seed see the same labels.
    """
    result = {"linear_probe_acc": linear_probe_accuracy(train_x, split.train_labels, test_x,
                                                        split.test_labels)}
    for per_class in cfg.few_labels_per_class:
        rng = np.random.default_rng([seed, per_class])
        few = []
        for _ in range(cfg.few_label_draws):
            idx = few_label_indices(split.train_labels, per_class, rng)
            few.append(linear_probe_accuracy(train_x[idx], split.train_labels[idx], test_x,
                                             split.test_labels))
        result[f"linear_probe_{per_class}_acc"] = float(np.mean(few))
        result[f"linear_probe_{per_class}_acc_draw_std"] = float(np.std(few))
    for k in cfg.knn_ks:
        result[f"knn_{k}_acc"] = knn_accuracy(train_x, split.train_labels, test_x,
                                              split.test_labels, k)
    return result


def evaluate_baseline(method: str, split: ImageSplit, cfg: TrainConfig, seed: int
                      ) -> dict[str, Any]:
    """Probes on raw pixels, or on an untrained encoder initialised with ``seed``."""
    if method == "raw_pixels":
        train_x = split.train_images.flatten(1).numpy()
        test_x = split.test_images.flatten(1).numpy()
    elif method == "random_init":
        torch.manual_seed(seed)
        encoder = Encoder(cfg.rep_dim, image_size=images_side(split))
        train_x, test_x = encode(encoder, split.train_images), encode(encoder, split.test_images)
    else:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    return evaluate_features(train_x, test_x, split, cfg, seed)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to 0 (as the paper, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class RunResult:
    """What one training run produced: final probe accuracies, timing, and its curves."""

    metrics: dict[str, Any]
    curve: list[dict[str, float]]


def train_run(method: str, split: ImageSplit, cfg: TrainConfig, *, seed: int, segment_dim: int,
              dim: int, progress: Callable[[], None] | None = None) -> RunResult:
    """Train encoder + projector with ``method`` for ``cfg.epochs``, then probe the encoder.

    The curve holds, per epoch: the mean loss (and for MUSIC its three parts and the four
    :mod:`music_loss.metrics` diagnostics, averaged over the epoch's steps), plus the held-out
    k-NN accuracy every ``cfg.log_every`` epochs. ``progress`` is called once per epoch.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    encoder = Encoder(cfg.rep_dim, image_size=images_side(split))
    head = projector(cfg.rep_dim, cfg.hidden_dim, dim, cfg.projector_depth)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(method, segment_dim, cfg)
    is_music = method in MUSIC_METHODS

    images = split.train_images
    steps_per_epoch = len(images) // cfg.batch_size  # drop the last partial batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(images)} training images")
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    curve: list[dict[str, float]] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        sums: dict[str, float] = {}
        order = torch.randperm(len(images), generator=generator)
        for b in range(steps_per_epoch):
            batch = images[order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
            x1, x2 = cfg.augment(batch, generator), cfg.augment(batch, generator)
            z1, z2 = head(encoder(x1)), head(encoder(x2))
            values: dict[str, float] = {}
            if is_music:
                terms = cast(MUSICTerms, cast(MUSICLoss, loss_fn)(z1, z2, return_terms=True))
                loss = terms.loss
                values.update(diag=float(terms.diag), off=float(terms.off),
                              invariance=float(terms.invariance))
                if cfg.diagnostics:
                    values.update(diagnostics(z1, z2, segment_dim, cfg.temperature)._asdict())
            else:
                loss = loss_fn(z1, z2)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            values["loss"] = loss.item()
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
        point: dict[str, float] = {"epoch": epoch}
        point.update({k: v / steps_per_epoch for k, v in sums.items()})
        if not math.isfinite(point["loss"]):
            raise FloatingPointError(f"{method} seed {seed}: loss became {point['loss']} at "
                                     f"epoch {epoch}")
        if cfg.log_every and (epoch % cfg.log_every == 0 or epoch == cfg.epochs):
            point["knn_acc"] = knn_accuracy(encode(encoder, images), split.train_labels,
                                            encode(encoder, split.test_images),
                                            split.test_labels, cfg.knn_k)
        curve.append(point)
        if progress is not None:
            progress()
    train_seconds = time.perf_counter() - start

    result = evaluate_features(encode(encoder, images), encode(encoder, split.test_images),
                               split, cfg, seed)
    result["train_seconds"] = train_seconds
    result["final_loss"] = curve[-1]["loss"]
    if is_music:
        # Diagnostics of the trained code on two augmented views of the held-out images.
        head.eval()
        encoder.eval()
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 2000)
            t1 = head(encoder(cfg.augment(split.test_images, g)))
            t2 = head(encoder(cfg.augment(split.test_images, g)))
        result.update({f"heldout_{k}": v
                       for k, v in diagnostics(t1, t2, segment_dim, cfg.temperature)
                       ._asdict().items()})
    return RunResult(result, curve)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON-ready data (the augmentation parameters included)."""
    return asdict(cfg)
