"""The digits data, its fixed held-out split, and the two-view augmentation.

scikit-learn bundles the UCI handwritten digits (1797 images, 8x8, 16 grey levels, 10
classes), so the study needs no download. Augmentations run batched on tensors (one
``affine_grid``/``grid_sample`` call per view) so a training step stays milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor


@dataclass(frozen=True)
class DigitsSplit:
    """Images in ``[0, 1]`` as ``(N, 1, 8, 8)`` float32 tensors, labels as int64 numpy."""

    train_images: Tensor
    train_labels: np.ndarray
    test_images: Tensor
    test_labels: np.ndarray


def load_split(seed: int, test_fraction: float = 0.3) -> DigitsSplit:
    """Stratified train / held-out split of the digits, fixed by ``seed``.

    Example:
        >>> split = load_split(0)
        >>> tuple(split.train_images.shape), len(split.test_labels)
        ((1257, 1, 8, 8), 540)
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=test_fraction,
                                              stratify=labels, random_state=seed)
    return DigitsSplit(torch.from_numpy(tr_x)[:, None], tr_y, torch.from_numpy(te_x)[:, None],
                       te_y)


def load_fit_val_test(seed: int = 0, val_fraction: float = 0.2,
                      test_fraction: float = 0.3) -> tuple[DigitsSplit, DigitsSplit]:
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
    full = load_split(seed, test_fraction)
    idx = np.arange(len(full.train_labels))
    fit_idx, val_idx = train_test_split(idx, test_size=val_fraction,
                                        stratify=full.train_labels, random_state=seed)
    fit_images, fit_labels = full.train_images[fit_idx], full.train_labels[fit_idx]
    return (DigitsSplit(fit_images, fit_labels, full.train_images[val_idx],
                        full.train_labels[val_idx]),
            DigitsSplit(fit_images, fit_labels, full.test_images, full.test_labels))


@dataclass(frozen=True)
class Augment:
    """Random affine (rotation, scale, shift), contrast, noise and erasing, per sample.

    The same distribution for every method; two independent draws make the two views.
    The fair study picks one of :data:`AUGMENTS` on the validation split with every method
    and then uses it for all of them.
    """

    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift_px: float = 1.0
    contrast_range: tuple[float, float] = (0.7, 1.3)
    noise_std: float = 0.05
    erase_prob: float = 0.25
    erase_size_px: int = 3

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n = images.shape[0]

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        angle = uniform(-self.max_rotation_deg, self.max_rotation_deg) * (math.pi / 180)
        scale = uniform(*self.scale_range)
        # affine_grid works in [-1, 1] coordinates: one pixel of 8 is 2/8.
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * self.max_shift_px * 2 / 8
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
        top = torch.randint(0, 8 - size + 1, (n,), generator=generator)
        left = torch.randint(0, 8 - size + 1, (n,), generator=generator)
        rows = torch.arange(8)
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + size)
        in_cols = (rows[None] >= left[:, None]) & (rows[None] < left[:, None] + size)
        erase = (in_rows[:, :, None] & in_cols[:, None, :])
        erase &= (torch.rand(n, generator=generator) < self.erase_prob)[:, None, None]
        return out.masked_fill(erase[:, None], 0.0)


#: The augmentation strengths the fair study chooses from (once, with every method).
AUGMENTS: dict[str, Augment] = {
    "weak": Augment(max_rotation_deg=5.0, scale_range=(0.95, 1.05), max_shift_px=0.5,
                    contrast_range=(0.85, 1.15), noise_std=0.02, erase_prob=0.0),
    "medium": Augment(),
    "strong": Augment(max_rotation_deg=15.0, scale_range=(0.85, 1.15), max_shift_px=1.5,
                      contrast_range=(0.6, 1.4), noise_std=0.1, erase_prob=0.5),
}
