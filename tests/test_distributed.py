"""``gather_distributed=True`` with 2 gloo processes against one process on the whole batch.

Each rank's loss is the global entropy part plus its own invariance term, so the
mean over ranks equals the single-process loss, and DDP's gradient averaging reproduces the
single-process parameter gradients. Ranks may hold different batch sizes with
``uneven_batches=True``: the entropy part stays exact, each invariance term covers its own
rows weighted by the rank's share of the global batch, so the mean loss and the DDP
gradients are again single-process ones. Without it, unequal sizes raise a clear error on
every rank (``tests/test_rank_agreement.py`` covers sizes that change between steps).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from music_loss import MUSICLoss
from tests.tolerances import DTYPE_TOL, relative_error

pytestmark = pytest.mark.distributed

N, IN, D, K = 10, 6, 24, 4
BACKENDS = ("reference", "torch")


def _data():
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(N, IN, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(N, IN, generator=gen, dtype=torch.float64)
    model = nn.Linear(IN, D).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(D, IN, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
    return x1, x2, model


def _worker(rank: int, world: int, init_file: str, out_dir: str, splits) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    x1, x2, base = _data()
    results = {}
    for split_name, sizes in splits.items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        uneven = split_name == "unequal"
        for backend in BACKENDS:
            model = DistributedDataParallel(_clone(base))
            # Built before use, as trainers do; the group exists by the first call.
            loss_fn = MUSICLoss(K, gather_distributed=True, backend=backend,
                                uneven_batches=uneven)
            for _step in range(3):  # repeated steps
                model.zero_grad()
                terms = loss_fn(model(x1[rows]), model(x2[rows]), return_terms=True)
                terms.loss.backward()
            results[(split_name, backend)] = {
                "terms": [t.detach() for t in terms],
                "grads": [p.grad.detach().clone() for p in model.parameters()],
            }
    # Unequal sizes without the option: a clear error on every rank, never a hang.
    sizes = splits["unequal"]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    try:
        MUSICLoss(K, gather_distributed=True)(base(x1[rows]), base(x2[rows]))
        results["unequal-default-error"] = None
    except ValueError as err:
        results["unequal-default-error"] = str(err)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _clone(model: nn.Module) -> nn.Module:
    copy = nn.Linear(IN, D).double()
    copy.load_state_dict(model.state_dict())
    return copy


def test_two_gloo_ranks_match_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    splits = {"equal": [5, 5], "unequal": [7, 3]}
    sys.path.insert(0, os.getcwd())
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), splits), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x1, x2, base = _data()
    tol = DTYPE_TOL[torch.float64]
    for backend in BACKENDS:
        model = _clone(base)
        single = MUSICLoss(K, backend=backend)(model(x1), model(x2), return_terms=True)
        single.loss.backward()
        single_grads = [p.grad for p in model.parameters()]

        # Equal split: the mean loss and the averaged gradients equal one process.
        equal = [r[("equal", backend)] for r in ranks]
        mean_loss = sum(r["terms"][0] for r in equal) / 2
        assert relative_error(mean_loss, single.loss) <= tol.loss
        for i, want in enumerate(single_grads):
            # DDP already averaged: every rank holds the same gradient.
            assert relative_error(equal[0]["grads"][i], want) <= tol.grad
            assert relative_error(equal[1]["grads"][i], want) <= tol.grad

        # Unequal split (uneven_batches=True): the entropy part is global and exact; each
        # rank's invariance term is its own rows' weighted by n_r W / N, so the mean loss and
        # the averaged gradients are again those of one process.
        unequal = [r[("unequal", backend)] for r in ranks]
        assert relative_error(sum(r["terms"][0] for r in unequal) / 2, single.loss) <= tol.loss
        for rank, (rows, result) in enumerate(zip([slice(0, 7), slice(7, 10)], unequal)):
            _, diag, off, inv = result["terms"]
            assert relative_error(diag + off, single.diag + single.off) <= tol.loss
            local = MUSICLoss(K, backend="reference", diag_weight=0.0, off_weight=0.0)
            share = (rows.stop - rows.start) * 2 / N
            want_inv = local(base(x1[rows]), base(x2[rows])) * share
            assert relative_error(inv, want_inv) <= tol.loss, rank
            for i, want in enumerate(single_grads):
                assert relative_error(result["grads"][i], want) <= tol.grad, (rank, i)

    # Unequal sizes without uneven_batches=True: a clear error naming the fix, on every rank.
    for r in ranks:
        message = r["unequal-default-error"]
        assert message is not None and "uneven_batches=True" in message and "[7, 3]" in message
