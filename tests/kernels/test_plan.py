"""The fused path's launch plan: chunk sizes, workspace, launches and gradient traffic.

``music_loss.kernels.configs.chunk_size_for`` sizes the chunks; ``benchmarks.plan`` states
what the launcher then does (``workspace_bytes``, ``launches_per_step``,
``gradient_phase_bytes``);
these tests hold them to their promises (memory ``O(N D)``, traffic per FLOP falling with the
batch) and hold the launcher to the plan (it passes the batch, and launches what the plan
counts, counted in the interpreter).
"""

from __future__ import annotations

import pytest
import torch

from music_loss._config import LossConfig

kernels = pytest.importorskip("music_loss.kernels")
from benchmarks import plan  # noqa: E402
from music_loss.kernels import _common, launchers  # noqa: E402
from music_loss.kernels import configs as cf  # noqa: E402
from music_loss.kernels.triton_backend import music_loss_triton  # noqa: E402

PRECISIONS = ["ieee", "tf32", "bf16"]
OPERAND_BYTES = {"ieee": 4, "tf32": 4, "bf16": 2}  # on a GPU (the interpreter keeps fp32)


def _round_up(x: int, multiple: int = 128) -> int:
    return -(-x // multiple) * multiple


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n", [64, 256, 1000, 2048, 4096])
@pytest.mark.parametrize("d", [960, 8160, 16320, 131072])
def test_chunks_hold_a_batch_of_rows_and_stay_order_n_d(precision, n, d):
    rows = cf.chunk_size_for(d, precision, n)
    assert rows % cf.CHUNK_MULTIPLE == 0
    # At least the batch (or all of D), at least the 32 MiB floor's rows.
    assert rows >= min(_round_up(n), _round_up(d))
    assert rows >= cf.chunk_size_for(d, precision)
    # The G chunk is no larger than one (N, D) operand array, or the floor: O(N D), not D^2.
    op = _common.operand_dtype(precision).itemsize
    g_chunk = min(rows, d) * d * op
    assert g_chunk <= max(cf.WORKSPACE_BYTES, _round_up(n) * d * op)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_traffic_per_flop_falls_with_the_batch(precision):
    d = 8160
    per_flop = {n: plan.gradient_phase_bytes(n, d, precision) / (4 * n * d * d)
                for n in (512, 1024, 2048, 4096, 8192)}
    values = list(per_flop.values())
    assert all(later < earlier for earlier, later in zip(values, values[1:])), per_flop
    # ~1/N: doubling the batch halves the bytes per FLOP, give or take the G traffic.
    assert per_flop[8192] * 8192 < 1.5 * per_flop[2048] * 2048
    # With the 32 MiB rule alone the chunks shrink as D grows and traffic per FLOP does not
    # fall with N (each chunk read-modify-writes the whole dp2): the batch rule beats it.
    fixed = plan.gradient_phase_bytes(4096, d, precision, cf.chunk_size_for(d, precision))
    assert plan.gradient_phase_bytes(4096, d, precision) < 0.8 * fixed


@pytest.mark.parametrize("precision", PRECISIONS)
def test_memory_plan_is_order_n_d(precision):
    # Peak bytes per (N D) element stay bounded as D grows at a fixed batch.
    n = 2048
    ratios = [plan.fused_memory_bytes(n, d, precision)["peak"] / (n * d)
              for d in (8160, 16320, 32640, 65280, 130560)]
    assert max(ratios) < 1.05 * ratios[0] + 1, ratios
    # The G chunk is the workspace; without a gradient it is not allocated.
    with_grad = plan.fused_memory_bytes(n, 8160, precision)
    no_grad = plan.fused_memory_bytes(n, 8160, precision, need_grad=False)
    assert no_grad["workspace"] < with_grad["workspace"] // 8


def test_launcher_sizes_chunks_from_the_batch(monkeypatch):
    calls = []
    real = cf.chunk_size_for

    def spy(dim, precision, n=None, workspace_bytes=cf.WORKSPACE_BYTES):
        calls.append((dim, precision, n))
        return real(dim, precision, n, workspace_bytes)

    monkeypatch.setattr(launchers, "chunk_size_for", spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _common.INTERPRET:
        pytest.skip("needs CUDA or the interpreter")
    z1, z2 = (torch.randn(21, 30, device=device, requires_grad=True) for _ in range(2))
    music_loss_triton(z1, z2, LossConfig(segment_dim=10), None, "ieee").loss.backward()
    assert calls == [(30, "ieee", 21)]


@pytest.mark.skipif(not _common.INTERPRET, reason="counts interpreter launches (a GPU's "
                    "autotuner launches each config while it benchmarks)")
@pytest.mark.parametrize("precision,chunk_size", [("ieee", 16), ("tf32", 32), ("bf16", 0)])
def test_launches_per_step_counts_what_runs(monkeypatch, precision, chunk_size):
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    real_run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    n, d, k = 19, 70, 7
    z1, z2 = (torch.randn(n, d, requires_grad=True) for _ in range(2))
    terms = music_loss_triton(z1, z2, LossConfig(segment_dim=k), None, precision,
                              chunk_size=chunk_size or None)
    terms.loss.backward()
    assert len(launched) == plan.launches_per_step(d, precision, chunk_size or None, n=n), launched


def test_kernel_module_doctests():
    """The docstring examples of the kernel modules (the plan numbers above among them) run:
    ``--doctest-modules music_loss`` does not reach ``kernels/``, which installs as
    ``music_loss.kernels``, nor ``benchmarks/``."""
    import doctest

    from music_loss.kernels import segment_softmax, triton_backend

    for module in (cf, launchers, triton_backend, segment_softmax, _common, plan):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)


class _TrackedAllocations:
    """The arrays the launchers allocate (``torch.empty``, ``torch.zeros``,
    ``Tensor.new_empty``), live bytes and their peak; each counts until its storage is freed
    (a weak-reference finaliser on the storage, which views and autograd's saved tensors
    share). ATen's scalar temporaries are not counted."""

    def __init__(self, monkeypatch):
        self.live = 0
        self.peak = 0
        self.count = 0
        for owner, name in ((torch, "empty"), (torch, "zeros"), (torch.Tensor, "new_empty")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        import weakref

        def allocate(*args, **kwargs):
            out = real(*args, **kwargs)
            storage = out.untyped_storage()  # one Python object per storage, views included
            self.live += storage.nbytes()
            self.count += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, storage.nbytes())
            return out

        return allocate

    def _release(self, size):
        self.live -= size


@pytest.mark.skipif(not _common.INTERPRET, reason="measures the interpreter's CPU arrays")
@pytest.mark.parametrize("need_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_memory_plan_is_what_the_launchers_allocate(monkeypatch, precision, need_grad):
    n, d, k, chunk = 64, 240, 80, 64  # 4 chunks of rows of P, 64-wide tiles
    z1, z2 = (torch.randn(n, d, requires_grad=need_grad) for _ in range(2))
    tracked = _TrackedAllocations(monkeypatch)
    terms = music_loss_triton(z1, z2, LossConfig(segment_dim=k), None, precision,
                              chunk_size=chunk)
    forward_peak, forward_count = tracked.peak, tracked.count
    if need_grad:
        terms.loss.backward()
        assert tracked.count == forward_count  # the backward only scales: no launcher arrays
    want = plan.fused_memory_bytes(n, d, precision, need_grad=need_grad, chunk_size=chunk,
                                   segment_dim=k)
    gradients = 2 * n * d * 4 if need_grad else 0  # the fp32 arrays the gradients fill
    assert forward_peak - gradients == want["forward"], (forward_peak - gradients, want)
