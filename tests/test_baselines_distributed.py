"""``gather_distributed=True`` of the memory-light Barlow Twins and VICReg on 2 and 3 gloo ranks.

Global-batch semantics: every rank's Barlow Twins loss is the loss of the concatenated batch;
VICReg's variance and covariance terms are global and its invariance term is the rank's own
(as the official ``FullGatherLayer`` code computes it), so the mean of the ranks' losses is the
loss of the concatenated batch. Under DDP's gradient averaging the parameter gradients equal
one process on the concatenated batch, computed here by the official formulas in float64.
Each case runs with a deadline of seconds: a hang fails fast instead of waiting for gloo.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.baselines import barlow_twins_loss as official_barlow_twins
from benchmarks.baselines import vicreg_loss as official_vicreg
from music_loss.baselines import BarlowTwinsLoss, VICRegLoss
from tests.tolerances import DTYPE_TOL, relative_error

pytestmark = pytest.mark.distributed

N, IN, D = 12, 5, 18
DEADLINE_S = 90.0
CRITERIA: dict[str, tuple[Any, Any]] = {"barlow_twins": (BarlowTwinsLoss, official_barlow_twins),
            "vicreg": (VICRegLoss, official_vicreg)}


def _data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, IN, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(N, IN, generator=gen, dtype=torch.float64)
    model = nn.Linear(IN, D).double()
    with torch.no_grad():
        # Small weights: VICReg's std hinge is active for some features.
        model.weight.copy_(0.4 * torch.randn(D, IN, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
    return x1, x2, model


def _clone(model: nn.Module) -> nn.Module:
    copy = nn.Linear(IN, D).double()
    copy.load_state_dict(model.state_dict())
    return copy


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    x1, x2, base = _data()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    results: dict[str, object] = {}
    for name, (cls, _) in CRITERIA.items():
        model = DistributedDataParallel(_clone(base))
        loss_fn = cls(gather_distributed=True, chunk_size=5)  # blocks split the diagonal
        for _step in range(2):  # repeated steps: the same result each time
            model.zero_grad()
            loss = loss_fn(model(x1[rows]), model(x2[rows]))
            loss.backward()
        results[name] = {"loss": loss.detach(),
                         "grads": [p.grad.detach().clone() for p in model.parameters()
                                   if p.grad is not None]}
        # Unequal batch sizes: the same clear error on every rank, never a hang. (Sizes no
        # rank has used yet: the size check runs once per size, per rank.)
        cut = slice(rows.start, rows.stop - (1 if rank == 0 else 2))
        try:
            loss_fn(base(x1[cut]), base(x2[cut]))
            results[name + "-unequal"] = None
        except ValueError as err:
            results[name + "-unequal"] = str(err)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn_with_deadline(world: int, tmp_path) -> list[dict]:  # type: ignore[no-untyped-def]
    context = mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{world} gloo ranks did not finish within {DEADLINE_S:.0f} s (hang?)")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_match_one_process_on_the_global_batch(world: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ranks = _spawn_with_deadline(world, tmp_path)
    x1, x2, base = _data()
    tol = DTYPE_TOL[torch.float64]
    for name, (_cls, official) in CRITERIA.items():
        # One process on the concatenated batch, by the official formula (autograd).
        model = _clone(base)
        single = official(model(x1), model(x2))
        single.backward()
        # All parameters as one vector: Barlow Twins' bias gradient is 0 (the batch norm
        # removes it), rounding noise that no relative measure of its own can judge.
        want_grads = torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None])
        losses = [r[name]["loss"] for r in ranks]
        if name == "barlow_twins":  # every rank returns the global loss itself
            for loss in losses:
                assert relative_error(loss, single) <= tol.loss
        assert relative_error(sum(losses) / world, single) <= tol.loss
        for r in ranks:
            got_grads = torch.cat([g.flatten() for g in r[name]["grads"]])
            assert relative_error(got_grads, want_grads) <= tol.grad, name
            message = r[name + "-unequal"]
            assert message is not None and "different batch sizes" in message
