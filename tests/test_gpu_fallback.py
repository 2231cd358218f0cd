"""``backend="auto"``: a Triton compile failure falls back to the ``torch`` backend, once.

The failure is injected by replacing the Triton entry point with one that raises; ``auto``
is made to pick Triton for CPU tensors (as it does for CUDA tensors on sm_80 and newer).
The fallback's result must equal the ``torch`` backend's, exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from music_loss import _dispatch, _gpu_policy, music_loss

triton = pytest.importorskip("triton")
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402

FAILURES = {
    "compilation": lambda: CompilationError(None, None, "unsupported layout"),
    "out-of-resources": lambda: OutOfResources(232448, 101376, "shared memory"),
    "ptxas": lambda: PTXASError("Feature '.tf32' requires .target sm_80 or higher"),
    "ptxas-runtime-error": lambda: RuntimeError("ptxas fatal : Unresolved extern function"),
    # What Triton 3.6 raises for the joint kernel's tensor-core modes on sm_100 (an MLIR
    # pass, TritonNvidiaGPUOptimizeTMemLayoutsPass, fails).
    "mlir-pass": lambda: RuntimeError("PassManager::run failed"),
}


@pytest.fixture
def failing_triton(monkeypatch):
    """Auto picks Triton for CPU tensors, and the Triton entry point raises; returns the list
    of calls it received."""
    import music_loss.kernels

    _gpu_policy.clear_caches()
    original = _dispatch.resolve_backend
    monkeypatch.setattr(_dispatch, "resolve_backend",
                        lambda backend, *args: "triton" if backend == "auto"
                        else original(backend, *args))
    calls: list[str] = []
    state = {"error": FAILURES["compilation"]}

    def entry_point(*args, **kwargs):
        calls.append("triton")
        raise state["error"]()

    monkeypatch.setattr(music_loss.kernels, "music_loss_triton", entry_point)
    yield calls, state
    _gpu_policy.clear_caches()


def _views(seed=0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(16, 24, generator=gen, requires_grad=True)
    z2 = torch.randn(16, 24, generator=gen, requires_grad=True)
    return z1, z2


def _loss_and_grads(backend):
    z1, z2 = _views()
    loss = music_loss(z1, z2, segment_dim=4, backend=backend)
    loss.backward()
    return loss.detach(), z1.grad, z2.grad


@pytest.mark.parametrize("kind", list(FAILURES))
def test_auto_falls_back_once_with_one_warning(failing_triton, kind):
    calls, state = failing_triton
    state["error"] = FAILURES[kind]
    with pytest.warns(RuntimeWarning, match="failed to compile on cpu") as record:
        got = _loss_and_grads("auto")
    assert len([w for w in record if "failed to compile" in str(w.message)]) == 1
    assert type(state["error"]()).__name__ in str(record[0].message)
    want = _loss_and_grads("torch")
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert _gpu_policy.fallen_back(torch.device("cpu")) is not None
    # Remembered: the next step goes to torch directly, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _loss_and_grads("auto")
    assert calls == ["triton"]
    assert torch.equal(again[0], want[0])


def test_explicit_triton_raises_the_failure(failing_triton):
    with pytest.raises(CompilationError, match="unsupported layout"):
        _loss_and_grads("triton")
    assert _gpu_policy.fallen_back(torch.device("cpu")) is None


def test_other_errors_are_not_swallowed(failing_triton):
    calls, state = failing_triton
    state["error"] = lambda: RuntimeError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        _loss_and_grads("auto")
    assert _gpu_policy.fallen_back(torch.device("cpu")) is None
