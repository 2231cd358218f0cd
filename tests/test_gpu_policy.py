"""What ``auto`` runs on each GPU generation, with mocked device properties (no GPU needed).

The expected table below is written out by hand from the rules (tf32/bf16 tensor cores from
sm_80; Triton precisions only where a kernel config fits the card's shared memory per
block); the kernels' own shared-memory model is checked against the thresholds separately.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from music_loss import _dispatch, _gpu_policy
from music_loss._gpu_policy import SMEM_PER_BLOCK_KIB, TRITON_MIN_SMEM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: (backend, precision) per card class and input kind; "16-bit": fp16/bf16 inputs or autocast.
PRE_AMPERE = {"highest": ("torch", "ieee"), "high": ("torch", "ieee"),
              "16-bit": ("torch", "ieee")}
TRITON = {"highest": ("triton", "ieee"), "high": ("triton", "tf32"),
          "16-bit": ("triton", "bf16")}
#: A card with less shared memory than any float32 config needs (none in the table today).
SMALL_SMEM = {"highest": ("torch", "ieee"), "high": ("torch", "tf32"),
              "16-bit": ("triton", "bf16")}
EXPECTED = {
    (7, 0): PRE_AMPERE, (7, 5): PRE_AMPERE,
    (8, 0): TRITON, (8, 7): TRITON, (9, 0): TRITON, (10, 0): TRITON, (10, 3): TRITON,
    (8, 6): TRITON, (8, 9): TRITON, (12, 0): TRITON,  # 99 KiB: the 3-stage fp32 configs
}


@pytest.fixture(autouse=True)
def fresh_policy():
    _gpu_policy.clear_caches()
    yield
    _gpu_policy.clear_caches()


def mock_card(monkeypatch, capability, smem_kib=None, matmul="highest", autocast=False,
              name="Mock GPU"):
    """Make CUDA device 0 look like a card of ``capability``."""
    smem = (smem_kib or SMEM_PER_BLOCK_KIB[capability]) * 1024
    props = SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                            shared_memory_per_block_optin=smem)
    reads = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: reads.append(index) or props)
    monkeypatch.setattr(_dispatch, "float32_matmul_mode",
                        lambda: "ieee" if matmul == "highest" else "tf32")
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: autocast)
    return reads


def dispatch(backend, precision, dtype):
    """The run path's resolution for a CUDA tensor: device-blind rules, then the card's."""
    chosen = _dispatch.resolve_backend(backend, "cuda", dtype)
    mode = _dispatch.resolve_precision(precision, "cuda", dtype)
    return _gpu_policy.resolve_for_card(torch.device("cuda", 0), dtype, backend, precision,
                                        chosen, mode)


CASES = list(itertools.product(EXPECTED, DTYPES, ["highest", "high", "medium"], [False, True]))


@pytest.mark.parametrize("capability,dtype,matmul,autocast", CASES,
                         ids=[f"sm{a}{b}-{d}-{m}-{'amp' if c else 'noamp'}"
                              for (a, b), d, m, c in CASES])
def test_auto_choice_per_capability(monkeypatch, capability, dtype, matmul, autocast):
    mock_card(monkeypatch, capability, matmul=matmul, autocast=autocast)
    kind = "16-bit" if dtype != "float32" or autocast else ("highest" if matmul == "highest"
                                                             else "high")
    want = EXPECTED[capability][kind]
    assert dispatch("auto", "auto", DTYPES[dtype]) == want
    # --plan-for answers the same without a device.
    card = _gpu_policy.card_for_capability(capability)
    assert _gpu_policy.plan(card, dtype, matmul, autocast)[:2] == want


@pytest.mark.parametrize("kind", list(SMALL_SMEM))
def test_float32_runs_torch_where_no_float32_config_fits(monkeypatch, kind):
    """A card below the float32 threshold (80 KiB per block) keeps bf16 on Triton only."""
    dtype = torch.bfloat16 if kind == "16-bit" else torch.float32
    mock_card(monkeypatch, (8, 6), smem_kib=80, matmul="highest" if kind == "highest" else "high")
    assert dispatch("auto", "auto", dtype) == SMALL_SMEM[kind]


@pytest.mark.parametrize("capability", list(EXPECTED))
def test_float64_runs_torch_ieee(monkeypatch, capability):
    mock_card(monkeypatch, capability, matmul="high")
    assert dispatch("auto", "auto", torch.float64) == ("torch", "ieee")


def test_rocm_runs_torch(monkeypatch):
    mock_card(monkeypatch, (9, 4), smem_kib=64, matmul="high", name="AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert dispatch("auto", "auto", torch.float32) == ("torch", "tf32")
    assert dispatch("auto", "auto", torch.bfloat16) == ("torch", "bf16")
    card = _gpu_policy.Card("ROCm GPU", (9, 4), 64 * 1024, rocm=True)
    assert _gpu_policy.plan(card, "float32", "highest", False)[:2] == ("torch", "ieee")


def test_future_capability_uses_its_own_shared_memory(monkeypatch):
    # Documented choice: sm_80 and newer run Triton where a config fits the card's memory.
    mock_card(monkeypatch, (13, 0), smem_kib=227, matmul="high")
    assert dispatch("auto", "auto", torch.float32) == ("triton", "tf32")
    # Without a device (--plan-for), the nearest older known card's memory stands in.
    assert _gpu_policy.card_for_capability((12, 1)).smem_per_block == 99 * 1024
    assert _gpu_policy.card_for_capability((11, 0)).smem_per_block == 227 * 1024


@pytest.mark.parametrize("capability,smem_kib,backend,precision,match", [
    ((7, 5), None, "torch", "tf32", r"precision='tf32'.*Mock GPU \(sm_75\).*precision='ieee'"),
    ((7, 0), None, "auto", "tf32", r"precision='tf32'.*\(sm_70\)"),
    ((7, 0), None, "triton", "auto", r"backend='triton'.*Mock GPU \(sm_70\).*backend='torch'"),
    ((7, 5), None, "triton", "bf16", r"backend='triton'.*\(sm_75\)"),
    ((8, 6), 80, "triton", "ieee", r"'ieee' needs 88 KiB.*\(sm_86\) has 80 KiB.*precision='bf16'"),
    ((12, 0), 80, "triton", "tf32", r"'tf32' needs 88 KiB.*\(sm_120\) has 80 KiB"),
])
def test_explicit_choice_the_card_cannot_run_raises(monkeypatch, capability, smem_kib, backend,
                                                    precision, match):
    mock_card(monkeypatch, capability, smem_kib=smem_kib, matmul="high")
    with pytest.raises(ValueError, match=match):
        dispatch(backend, precision, torch.float32)


@pytest.mark.parametrize("capability,backend,precision,want", [
    ((7, 5), "torch", "bf16", ("torch", "bf16")),      # runs (rounded operands, fp32 math)
    ((8, 6), "triton", "bf16", ("triton", "bf16")),
    ((8, 6), "auto", "ieee", ("triton", "ieee")),      # 99 KiB: a 3-stage config fits
    ((9, 0), "triton", "ieee", ("triton", "ieee")),
    ((7, 5), "reference", "auto", ("reference", "tf32")),
])
def test_explicit_choice_the_card_can_run(monkeypatch, capability, backend, precision, want):
    mock_card(monkeypatch, capability, matmul="high")
    assert dispatch(backend, precision, torch.float32) == want


def test_card_read_once_and_choices_cached(monkeypatch):
    reads = mock_card(monkeypatch, (8, 6), matmul="high")
    for _ in range(5):
        assert dispatch("auto", "auto", torch.float32) == ("triton", "tf32")
    assert reads == [0]
    assert _gpu_policy._choose.cache_info().misses == 1


def test_dispatch_is_a_constant_under_torch_compile(monkeypatch):
    mock_card(monkeypatch, (8, 0), matmul="highest")

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        choice = _gpu_policy.card_choice(0, "float32", False, "auto", "auto", "triton", "ieee")
        return x + (1.0 if choice == "triton:ieee" else 2.0)

    assert step(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_pre_ampere_ieee_runs_whatever_the_global_setting(monkeypatch):
    """sm_75 has no tf32: the torch backend's ieee products need no global setting."""
    from music_loss.torch_backend import _check_ieee_products_possible

    mock_card(monkeypatch, (7, 5), matmul="high")
    _check_ieee_products_possible(torch.device("cuda", 0), "ieee")  # does not raise
    mock_card(monkeypatch, (8, 0), matmul="high")
    _gpu_policy.clear_caches()
    with pytest.raises(ValueError, match="precision='ieee' with backend='torch'"):
        _check_ieee_products_possible(torch.device("cuda", 0), "ieee")


@pytest.mark.parametrize("text,want", [("7.5", (7, 5)), ("75", (7, 5)), ("sm_120", (12, 0)),
                                       ("10.3", (10, 3)), ("100", (10, 0))])
def test_parse_capability(text, want):
    assert _gpu_policy.parse_capability(text) == want


@pytest.mark.parametrize("text", ["", "x", "7.", "sm_", "7.10"])
def test_parse_capability_rejects(text):
    with pytest.raises(ValueError, match="capability must look like"):
        _gpu_policy.parse_capability(text)


def test_thresholds_match_the_kernels_configs():
    """TRITON_MIN_SMEM is the kernels' own model: the smallest config of each precision
    (joint kernel and gradient products alike) plus the epilogue's scratch."""
    pytest.importorskip("triton")
    from music_loss.kernels.configs import (
        EPILOGUE_SMEM,
        JOINT_CONFIGS,
        MATMUL_CONFIGS,
        config_smem,
        configs_for,
    )

    def least(configs, precision):  # the smallest limit at which some config is offered
        return min(config_smem(c, precision) + EPILOGUE_SMEM for c in configs
                   if c in configs_for(configs, precision,
                                       config_smem(c, precision) + EPILOGUE_SMEM))

    for precision, need in TRITON_MIN_SMEM.items():
        assert max(least(cs, precision) for cs in (JOINT_CONFIGS, MATMUL_CONFIGS)) == need, \
            precision
        assert not all(configs_for(cs, precision, need - 1)
                       for cs in (JOINT_CONFIGS, MATMUL_CONFIGS)), precision
        for capability, kib in SMEM_PER_BLOCK_KIB.items():
            fits = all(configs_for(cs, precision, kib * 1024)
                       for cs in (JOINT_CONFIGS, MATMUL_CONFIGS))
            assert fits == (kib * 1024 >= need), (capability, precision)
