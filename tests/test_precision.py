"""Backend and precision resolution: every rule, with both of PyTorch's precision APIs.

PyTorch 2.9+ has a second precision API (``torch.backends.fp32_precision``,
``torch.backends.cuda.matmul.fp32_precision``); with it set, the legacy getters raise "mix of
the legacy and new APIs". ``precision="auto"`` must read the new API first and never raise,
and no call may write either global. Every test restores the globals it sets.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from music_loss import music_loss
from music_loss._config import round_to_tf32
from music_loss._dispatch import float32_matmul_mode, resolve_backend, resolve_precision

LEGACY = ["highest", "high", "medium"]
NEW = ["none", "ieee", "tf32"]


def _snapshot():
    return (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.fp32_precision, torch.backends.mkldnn.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


@pytest.fixture
def restore_precision_globals():
    before = _snapshot()
    legacy_before = torch.get_float32_matmul_precision()
    yield
    # Back through the new API (the legacy setter would raise while it is set): every
    # setting to "none", then each to its value before the test (earlier tests may have set
    # some, e.g. the benchmarks' set_float32_matmul_precision).
    names = [(torch.backends, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision"),
             (torch.backends.cudnn, "fp32_precision"), (torch.backends.mkldnn, "fp32_precision"),
             (torch.backends.mkldnn.matmul, "fp32_precision")]
    for owner, name in reversed(names):
        setattr(owner, name, "none")
    torch.set_float32_matmul_precision(legacy_before)  # the legacy setting is a third global
    for (owner, name), value in zip(names, before):
        setattr(owner, name, value)
    assert _snapshot() == before
    assert torch.get_float32_matmul_precision() == legacy_before


def _expected(legacy: str, generic: str, cuda_matmul: str) -> str:
    """The rule, written out: cuda.matmul first, then the generic new API, then legacy."""
    if cuda_matmul != "none":
        return cuda_matmul
    if generic != "none":
        return generic
    return "ieee" if legacy == "highest" else "tf32"


COMBOS = list(itertools.product(LEGACY, NEW, NEW))


@pytest.mark.parametrize("legacy,generic,cuda_matmul", COMBOS,
                         ids=[f"legacy={a}-generic={b}-cuda={c}" for a, b, c in COMBOS])
def test_auto_precision_with_every_combination_of_the_two_apis(
        restore_precision_globals, legacy, generic, cuda_matmul):
    torch.set_float32_matmul_precision(legacy)
    torch.backends.fp32_precision = generic
    torch.backends.cuda.matmul.fp32_precision = cuda_matmul
    state = _snapshot()
    want = _expected(legacy, generic, cuda_matmul)
    assert float32_matmul_mode() == want
    assert resolve_precision("auto", "cuda", torch.float32) == want
    assert resolve_precision("auto", "cpu", torch.float32) == want
    # float64 and 16-bit inputs do not depend on the setting.
    assert resolve_precision("auto", "cuda", torch.float64) == "ieee"
    assert resolve_precision("auto", "cuda", torch.bfloat16) == "bf16"
    # A whole call on every backend: no "mix of the legacy and new APIs", no write.
    z1, z2 = torch.randn(6, 12), torch.randn(6, 12)
    for backend in ("reference", "torch", "triton"):
        z1.requires_grad_(True)
        music_loss(z1, z2, 3, backend=backend).backward()
        assert _snapshot() == state, backend


def test_new_api_set_to_tf32_does_not_crash_a_float32_call(restore_precision_globals):
    # The reported crash: every float32 call raised from get_float32_matmul_precision().
    torch.backends.fp32_precision = "tf32"
    z1, z2 = torch.randn(6, 12, requires_grad=True), torch.randn(6, 12)
    music_loss(z1, z2, 3).backward()
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    music_loss(z1, z2, 3, backend="torch").backward()
    assert resolve_precision("auto", "cuda", torch.float32) == "tf32"


@pytest.mark.parametrize("legacy,want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_legacy_setting_maps_as_pytorch_does_on_cuda(restore_precision_globals, legacy, want):
    torch.set_float32_matmul_precision(legacy)
    assert resolve_precision("auto", "cuda", torch.float32) == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sixteen_bit_inputs_use_bf16_operands(dtype):
    assert resolve_precision("auto", "cuda", dtype) == "bf16"
    assert resolve_precision("auto", "cpu", dtype) == "bf16"


def test_autocast_uses_bf16_operands_and_explicit_precision_wins():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_precision("auto", "cpu", torch.float32) == "bf16"
        assert resolve_precision("ieee", "cpu", torch.float32) == "ieee"
    assert resolve_precision("auto", "cpu", torch.float32) in ("ieee", "tf32")
    for explicit in ("ieee", "tf32", "bf16"):
        assert resolve_precision(explicit, "cuda", torch.float16) == explicit


def test_backend_auto_rules(monkeypatch):
    assert resolve_backend("auto", "cpu", torch.float32) == "torch"
    assert resolve_backend("auto", "mps", torch.float32) == "torch"  # MPS: the PyTorch path
    assert resolve_backend("auto", "cuda", torch.float32) == "triton"
    assert resolve_backend("auto", "cuda", torch.float64) == "torch"  # Triton is float32
    for explicit in ("torch", "reference"):
        assert resolve_backend(explicit, "cuda", torch.float32) == explicit
    monkeypatch.setattr(torch.version, "hip", "6.2.0")  # a ROCm build
    assert resolve_backend("auto", "cuda", torch.float32) == "torch"
    with pytest.raises(ValueError, match="ROCm"):
        resolve_backend("triton", "cuda", torch.float32)


def test_backend_triton_without_triton_says_why(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert resolve_backend("auto", "cuda", torch.float32) == "torch"
    with pytest.raises(ValueError, match="Triton does not import"):
        resolve_backend("triton", "cuda", torch.float32)


def test_backend_triton_on_mps_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="needs CUDA tensors.*'mps'"):
        resolve_backend("triton", "mps", torch.float32)


def test_tf32_operand_rounding_is_nearest_even_to_10_bits():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4096, generator=gen) * torch.logspace(-30, 3, 4096)
    # Exact ties and their neighbours: 1 + (2j+1) * 2^-11 lies halfway between tf32 values.
    ties = 1 + (2 * torch.arange(64, dtype=torch.float64) + 1) * 2.0**-11
    x = torch.cat([x, ties.float()])
    r = round_to_tf32(x)
    bits = r.view(torch.int32)
    assert (bits & 0x1FFF == 0).all()  # 10 explicit mantissa bits left
    x64, r64 = x.double(), r.double()
    ulp = torch.ldexp(torch.ones_like(x64), torch.frexp(x64).exponent - 11)
    assert ((r64 - x64).abs() <= ulp / 2).all()  # nearest
    tie_r = r[-64:].double()
    tie_mantissa = ((tie_r - 1) * 2**10).round().long()
    assert (tie_mantissa % 2 == 0).all()  # ties to even
