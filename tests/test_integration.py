"""The loss inside the training machinery users combine it with."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from music_loss import MUSICLoss
from tests.tolerances import DTYPE_TOL, relative_error


def _setup(backend: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 120)).double()
    loss_fn = MUSICLoss(segment_dim=24, backend=backend)
    x1, x2 = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 12, dtype=torch.float64)
    return model, loss_fn, x1, x2


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(backend, use_reentrant):
    model, loss_fn, x1, x2 = _setup(backend)
    step = lambda a, b: loss_fn(model(a), model(b))
    plain = step(x1, x2)
    plain.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x1.requires_grad_(use_reentrant)  # the reentrant variant needs an input that requires grad
    got = checkpoint(step, x1, x2, use_reentrant=use_reentrant)
    got.backward()
    assert relative_error(got, plain) <= DTYPE_TOL[torch.float64].loss
    for p, w in zip(model.parameters(), want):
        assert relative_error(p.grad, w) <= DTYPE_TOL[torch.float64].grad


def _poison_the_allocator():
    """Fill freed memory with NaN and noise at the sizes the loss allocates: a result that
    reads memory it did not write (torch.empty) then changes from run to run."""
    gen = torch.Generator().manual_seed(123)
    for numel in (1, 2, 4, 8, 16, 64, 120, 256, 1024, 1920, 4096, 16 * 120, 120 * 120):
        junk = [torch.full((numel,), float("nan")) for _ in range(8)]
        junk += [torch.randn(numel, generator=gen) * 1e6 for _ in range(8)]
        del junk


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_deterministic_algorithms_give_identical_results(backend):
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for run in range(3):
            if run:
                _poison_the_allocator()
            model, loss_fn, x1, x2 = _setup(backend)
            model.float()
            loss = loss_fn(model(x1.float()), model(x2.float()))
            loss.backward()
            results.append([loss.detach()] + [p.grad for p in model.parameters()])
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
