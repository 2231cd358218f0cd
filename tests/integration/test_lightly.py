"""MUSICLoss inside a lightly training set-up, built from lightly's own parts.

lightly's ``VICRegTransform`` (sized for 8x8 grey digits) with its ``MultiViewTransform``
views and ``MultiViewCollate`` batches, its ``BarlowTwinsProjectionHead``, and its
``BarlowTwinsLoss`` / ``VICRegLoss`` next to ``MUSICLoss`` and the memory-light Barlow Twins
of ``music_loss.baselines``: each criterion trains the same tiny model for a few steps on
scikit-learn's bundled digits and must lower its own loss on a fixed held-out batch. lightly's
two losses swapped for the memory-light ones give the same values and gradients on lightly's
inputs. Then ``gather_distributed=True`` with 2 gloo ranks, used as lightly's losses are
(each rank passes its local views; the gather happens inside the criterion).

Needs the ``integrations`` extra (``pip install -e ".[integrations]"``); CI installs it.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.integration._extras import require

require("lightly")

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from lightly.data.multi_view_collate import MultiViewCollate  # noqa: E402
from lightly.loss import BarlowTwinsLoss, VICRegLoss  # noqa: E402
from lightly.models.modules import BarlowTwinsProjectionHead  # noqa: E402
from lightly.transforms import VICRegTransform  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from music_loss import MUSICLoss  # noqa: E402
from music_loss.baselines import BarlowTwinsLoss as LightBarlowTwinsLoss  # noqa: E402
from music_loss.baselines import VICRegLoss as LightVICRegLoss  # noqa: E402
from tests.tolerances import DTYPE_TOL, relative_error  # noqa: E402

PROJECTION_DIM, SEGMENT_DIM = 128, 16  # S = 8 segments of 16 bins
STEPS, BATCH = 40, 128


class DigitViews(Dataset):
    """scikit-learn's 8x8 digits as grey PIL images, each returned as lightly's two views."""

    def __init__(self, indices: np.ndarray) -> None:
        digits = load_digits()
        self.images = [Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8))
                       for i in indices]
        self.labels = [int(digits.target[i]) for i in indices]
        # lightly's VICReg views, scaled to 8x8 grey digits: no colour (one channel), no
        # flips (a mirrored 2 is not a 2), no blur (sigma 0.1-2 px erases an 8x8 digit),
        # crops of at least half the image, grey values left unnormalised.
        self.transform = VICRegTransform(input_size=8, cj_prob=0.0, random_gray_scale=0.0,
                                         gaussian_blur=0.0, hf_prob=0.0, min_scale=0.5,
                                         solarize_prob=0.1, normalize=None)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i], str(i)


def make_model() -> nn.Module:
    """A tiny CNN backbone and lightly's Barlow Twins projection head."""
    backbone = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(backbone, BarlowTwinsProjectionHead(32, 128, PROJECTION_DIM))


CRITERIA = {
    "music": lambda: MUSICLoss(segment_dim=SEGMENT_DIM),
    "barlow_twins": lambda: BarlowTwinsLoss(),
    "vicreg": lambda: VICRegLoss(),
    # The memory-light Barlow Twins with lightly's lambda (5e-3; the paper's is 5.1e-3).
    "barlow_twins_light": lambda: LightBarlowTwinsLoss(lambd=5e-3),
}


@pytest.mark.parametrize("name", list(CRITERIA))
def test_lightly_parts_train_with_each_criterion(name):
    torch.manual_seed(0)
    indices = np.random.default_rng(0).permutation(len(load_digits().target))
    loader = DataLoader(DigitViews(indices[:1400]), batch_size=BATCH, shuffle=True,
                        drop_last=True, collate_fn=MultiViewCollate())
    held_out = MultiViewCollate()([DigitViews(indices[1400:])[i] for i in range(256)])
    (x0_eval, x1_eval), _, _ = held_out
    model, criterion = make_model(), CRITERIA[name]()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def held_out_loss() -> float:
        model.eval()  # batch-norm running statistics: the value depends on the model only
        with torch.no_grad():
            value = criterion(model(x0_eval), model(x1_eval)).item()
        model.train()
        return value

    before = held_out_loss()
    train_losses = []
    while len(train_losses) < STEPS:
        for (x0, x1), _, _ in loader:
            loss = criterion(model(x0), model(x1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_losses.append(loss.item())
            if len(train_losses) == STEPS:
                break
    after = held_out_loss()
    first, last = np.mean(train_losses[:5]), np.mean(train_losses[-5:])
    print(f"{name}: training loss (mean of 5 steps) {first:.4f} -> {last:.4f}; "
          f"held-out loss {before:.4f} -> {after:.4f} after {STEPS} steps")
    assert np.isfinite(train_losses).all()
    assert last < first
    # A clear drop, relative to the loss's own scale (MUSIC is negative at its optimum).
    assert after < before - 0.05 * abs(before), (before, after)


# ---- lightly's losses swapped for the memory-light ones ----------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_memory_light_losses_equal_lightlys_on_its_inputs(dtype):
    """lightly's BarlowTwinsLoss and VICRegLoss against music_loss.baselines, on projections
    of lightly's own views by its projection head: the same values and gradients."""
    torch.manual_seed(0)
    (x0, x1), _, _ = MultiViewCollate()([DigitViews(np.arange(64))[i] for i in range(64)])
    model = make_model().to(dtype)
    out0, out1 = model(x0.to(dtype)), model(x1.to(dtype))
    tol = DTYPE_TOL[dtype]
    for theirs, ours in ((BarlowTwinsLoss(), LightBarlowTwinsLoss(lambd=5e-3)),
                         (VICRegLoss(), LightVICRegLoss())):
        want = theirs(out0, out1)
        want_grads = torch.autograd.grad(want, list(model.parameters()), retain_graph=True)
        got = ours(out0, out1)
        got_grads = torch.autograd.grad(got, list(model.parameters()), retain_graph=True)
        assert relative_error(got, want) <= tol.loss, type(ours).__name__
        assert relative_error(torch.cat([g.flatten() for g in got_grads]),
                              torch.cat([g.flatten() for g in want_grads])) <= tol.grad


# ---- gather_distributed with 2 gloo ranks ------------------------------------------------

def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    (x0, x1), _, _ = MultiViewCollate()([DigitViews(np.arange(12))[i] for i in range(12)])
    return x0.double(), x1.double()


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str,
                 x0: torch.Tensor, x1: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = make_model().double().eval()  # eval: batch norm must not depend on the split
    criterion = MUSICLoss(segment_dim=SEGMENT_DIM, gather_distributed=True)
    ddp = DistributedDataParallel(model)
    rows = slice(rank * len(x0) // world, (rank + 1) * len(x0) // world)
    loss = criterion(ddp(x0[rows]), ddp(x1[rows]))
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_distributed_two_gloo_ranks_match_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    torch.manual_seed(0)
    x0, x1 = _batch()  # random views, made once and handed to both ranks
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), x0, x1), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    torch.manual_seed(0)
    model = make_model().double().eval()
    single = MUSICLoss(segment_dim=SEGMENT_DIM)(model(x0), model(x1))
    single.backward()
    tol = DTYPE_TOL[torch.float64]
    # Mean of the ranks' losses = one process on the whole batch; DDP-averaged gradients too.
    assert relative_error((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single) <= tol.loss
    for rank in ranks:
        for got, want in zip(rank["grads"], (p.grad for p in model.parameters())):
            assert relative_error(got, want) <= tol.grad
