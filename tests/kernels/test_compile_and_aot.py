"""torch.compile over the Triton path (interpreter on CPU) and the AOT compile check.

``torch.compile(fullgraph=True)`` must trace through the custom ops without a graph break
and stay accurate (compiled code can drift). The AOT check compiles every
kernel in every autotune config for sm_80 and sm_90, and the first two configs of each
mode for the other architectures (``--quick``), in a subprocess without
``TRITON_INTERPRET`` (``triton.compile`` cannot compile interpreted functions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from music_loss import MUSICLoss
from tests.tolerances import PRECISION_TOL, relative_error

kernels = pytest.importorskip("music_loss.kernels")
from benchmarks import aot  # noqa: E402
from music_loss.kernels import _common  # noqa: E402
from music_loss.kernels.configs import SMEM_LIMITS as SMEM_LIMIT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _TinySSL(nn.Module):
    def __init__(self, backend: str) -> None:
        super().__init__()
        self.projector = nn.Linear(12, 60)
        self.loss = MUSICLoss(segment_dim=20, backend=backend, precision="ieee")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.loss(self.projector(x1), self.projector(x2))


@pytest.mark.skipif(DEVICE == "cpu" and not _common.INTERPRET,
                    reason="needs CUDA or TRITON_INTERPRET=1")
def test_compiled_training_step_on_triton_path_matches_float64():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _TinySSL("triton").to(DEVICE)
    x1, x2 = torch.randn(24, 12, device=DEVICE), torch.randn(24, 12, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    loss = compiled(x1, x2)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model64 = _TinySSL("reference").double().to(DEVICE)
    model64.load_state_dict(model.state_dict())
    want = model64(x1.double(), x2.double())
    want.backward()
    tol = PRECISION_TOL["ieee"]
    assert relative_error(loss, want) <= tol.loss
    for got, p64 in zip(grads, model64.parameters()):
        assert relative_error(got, p64.grad) <= tol.grad


def test_aot_compile_check_sm80_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_json = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--arch", "80", "90",
         "--json", str(out_json), "--dump-dir",
         str(tmp_path / "ptx")],
        env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out_json.read_text())
    kernels_seen = {(r["kernel"], r["arch"]) for r in rows}
    for name in ("joint_entropy", "grad_product", "softmax_fwd", "loss_bwd"):
        assert (name, 80) in kernels_seen and (name, 90) in kernels_seen
    # The softmax writes p with vectors (rounded to tf32 or not): its one scalar store is the
    # partial sum.
    soft = [r for r in rows if r["kernel"] == "softmax_fwd"]
    assert any(r["variant"].endswith("tf32-round") for r in soft)
    assert all(r["scalar_global_stores"] == 1 for r in soft)
    joint_tc = [r for r in rows if r["kernel"] == "joint_entropy" and r["variant"] != "ieee"]
    assert joint_tc and all(r["tensor_core_instructions"] > 0 for r in joint_tc)
    assert all(r["shared_bytes"] <= r["smem_limit"] for r in rows)
    products = [r for r in rows if r["needs_tensor_cores"]]
    assert all(r["mma_shape"] for r in products)
    assert all(r["uses_tma"] or r["async_copy_min_bytes"] for r in products)
    assert all(r["smem_bank_conflicts"] for r in products
               if r["arch"] == 90 and not r["uses_tma"])
    # The TMA variants (sm_90, joint kernel and products): bulk tensor copies, no cp.async.
    tma = [r for r in rows if r["variant"].endswith(",tma")]
    assert {r["arch"] for r in tma} == {90}
    # tf32's joint kernel and dp2 keep the pointer kernels (their K-major staging).
    assert {r["variant"] for r in tma} == {"tf32,dp1,NT,tma", "bf16,dp2,NN,tma",
                                           "bf16,dp1,NT,tma", "bf16,tma"}
    # Each product row says which product it is: dp2 accumulates (it reads G row-major,
    # "NN"), dp1 does not; tf32's dp2 is compiled in every config its dp1 is.
    products_90 = {(r["variant"], r["config"]) for r in rows
                   if r["kernel"] == "grad_product" and r["arch"] == 90}
    tf32_dp1 = {c for v, c in products_90 if v == "tf32,dp1,NT"}
    assert tf32_dp1 and tf32_dp1 <= {c for v, c in products_90 if v == "tf32,dp2,NN"}
    # The gate against the committed table ran and found nothing (the exit status above).
    assert "regressions" in proc.stdout and " 0 regressions" in proc.stdout
    assert all(r["uses_tma"] and r["async_copy_min_bytes"] is None and r["mma_shape"]
               for r in tma)
    # The warp-specialised joint kernel (sm_90, bf16): the split in every config, no spill;
    # its partitions' code has no single epilogue path to measure.
    ws = [r for r in joint_tc if r["variant"] == "bf16,ws"]
    assert ws and {r["arch"] for r in ws} == {90}
    assert all(r["warp_specialized"] and r["spill_stores"] == r["spill_loads"] == 0
               and r["uses_tma"] and r["epilogue_instructions_per_entry"] is None for r in ws)
    assert not any(r["warp_specialized"] for r in rows if r["variant"] != "bf16,ws")
    joint_tc = [r for r in joint_tc if r not in ws]
    # Per entry: a scale, a clamp, a log, a sum, G's set and multiply-add, its store - never
    # a handful (a misread program structure gave 0-2 once).
    assert all(r["epilogue_instructions_per_entry"] >= 6 for r in joint_tc)
    # dp2 accumulates: in bf16 its output tile is read before the main loop (no global load
    # after it); tf32 and ieee read it after the loop, which the counter sees.
    late: dict[tuple[str, int], list[int]] = {}
    for r in rows:
        if r["kernel"] == "grad_product" and "dp2" in r["variant"].split(","):
            mode = r["variant"].split(",")[0]
            late.setdefault((mode, r["arch"]), []).append(r["global_loads_after_loop"])
    assert late[("bf16", 80)] and late[("bf16", 90)]
    assert all(late[("bf16", a)] == [0] * len(late[("bf16", a)]) for a in (80, 90)), late
    assert all(late[("tf32", a)] and all(late[("tf32", a)]) for a in (80, 90)), late
    # The split epilogue: in the tensor-core modes, tiles off the block diagonal run a
    # shorter epilogue than the few that touch it.
    for r in joint_tc:
        short, long = (r["epilogue_instructions_per_entry"],
                       r["epilogue_instructions_per_entry_diagonal"])
        assert short <= 0.85 * long, r
    assert all(r["spill_instructions_in_loops"] == 0 for r in rows if r["spill_stores"] > 0)
    # Hopper: the 64-accumulator joint tiles issue m64n128 wgmma in both tensor-core modes
    # (the 32-accumulator ones only m64n64).
    for mode in ("tf32", "bf16", "bf16,tma"):
        shapes = {r["mma_shape"] for r in joint_tc if r["arch"] == 90 and r["variant"] == mode}
        assert {"m64n64k8", "m64n128k8"} <= shapes if mode.startswith("tf32") else \
            {"m64n64k16", "m64n128k16"} <= shapes, (mode, shapes)
    assert len(list((tmp_path / "ptx").glob("joint_entropy-*-sm_90.ptx"))) >= 2


def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


#: The architectures the quick check covers. Triton 3.6 (the GPU machines' stack) fails to
#: compile the joint kernel's tensor-core modes for sm_100 (an MLIR pass,
#: TritonNvidiaGPUOptimizeTMemLayoutsPass, aborts; ``backend="auto"`` falls back to the
#: ``torch`` backend there): sm_100 is checked under Triton 3.8.
QUICK_ARCHS = [75, 86, 89, 120] + ([100] if _triton_version() >= (3, 8) else [])


def test_aot_compile_check_other_archs_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_json = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--quick", "--arch", *map(str, QUICK_ARCHS),
         "--json", str(out_json)], env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(out_json.read_text())
    # sm_75: the policy runs the torch backend only, so nothing is compiled there.
    assert not [r for r in rows if r["arch"] == 75]
    assert "sm_75: nothing to compile" in proc.stdout
    instruction = {86: "mma.sync", 89: "mma.sync", 120: "mma.sync", 100: "tcgen05.mma"}
    for arch in [a for a in QUICK_ARCHS if a != 75]:
        sub = [r for r in rows if r["arch"] == arch]
        for name in ("joint_entropy", "grad_product", "softmax_fwd", "loss_bwd"):
            assert any(r["kernel"] == name for r in sub), (arch, name)
        # float32 (ieee, tf32) runs on Triton on every card from sm_80 on, 99 KiB ones too.
        for kernel in ("joint_entropy", "grad_product"):
            modes = {r["variant"].split(",")[0] for r in sub if r["kernel"] == kernel}
            assert modes == {"ieee", "tf32", "bf16"}, (arch, kernel, modes)
        products = [r for r in sub if r["needs_tensor_cores"]]
        assert products and all(r["tensor_core_instructions"] > 0 and r["mma_shape"]
                                for r in products), arch
        assert all(r["shared_bytes"] <= r["smem_limit"] == SMEM_LIMIT[arch] for r in sub)
        assert all(r["spill_instructions_in_loops"] == 0 for r in sub if r["spill_stores"] > 0)
        table = aot.arch_mode_markdown([("t", rows)])
        assert f"| t | sm_{arch} | tf32 |" in table and instruction[arch] in table
    if 100 in QUICK_ARCHS:  # tcgen05.mma's M and N, read from its instruction descriptor
        shapes = {r["mma_shape"] for r in rows if r["arch"] == 100}
        assert {"m64n64k8", "m64n64k16"} <= shapes, shapes


_WRONG_INSTRUCTION = """
import sys
from benchmarks import aot
arch = int(sys.argv[1])
spec = next(s for s in aot.kernel_specs(True, arch)
            if s.kernel == "joint_entropy" and s.variant == "tf32")
right = aot.compile_spec(spec, arch)
aot.TENSOR_CORE_PTX[arch] = aot.TENSOR_CORE_PTX[90 if arch != 90 else 80]
wrong = aot.compile_spec(spec, arch)
print(right.ok, right.tensor_core_instructions > 0, right.mma_shape)
print(wrong.ok, wrong.tensor_core_instructions, "; ".join(wrong.problems))
"""


@pytest.mark.parametrize("arch", [a for a in QUICK_ARCHS if a in (100, 120)])
def test_the_gate_fails_when_an_arch_expects_another_tensor_core_instruction(arch):
    # sm_120 emits mma.sync and sm_100 tcgen05.mma; expecting Hopper's wgmma there (what the
    # check did for every arch from sm_90 on) must fail the tf32 joint kernel's row.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _WRONG_INSTRUCTION, str(arch)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    right, wrong = proc.stdout.split("\n")[:2]
    assert right.startswith("True True m"), right
    assert wrong.startswith("False 0 ") and "no tensor-core instruction" in wrong, wrong


_PTX = """
    cp.async.ca.shared.global [%r1+0], [%rd2+0], 0x4, %r100;
    cp.async.cg.shared.global [%r3+0], [%rd4+0], 16, %r101;
    wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd5, %rd6, 1, 1, 1;
    wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {%f1}, %rd5, %rd6, 1, 1, 1;
"""


def test_static_facts_are_read_from_the_ptx_and_gated():
    from benchmarks import aot

    assert aot.mma_shape(_PTX, 90) == "m64n128k8"
    assert aot.mma_shape(_PTX, 80) is None
    assert aot.async_copy_widths(_PTX) == (4, False)
    assert aot.async_copy_widths("cp.async.bulk.tensor.2d.shared::cluster") == (None, True)
    row = aot.AotRow("joint_entropy", "tf32", "64x64x32 w4 s4", 90, ok=True,
                     needs_tensor_cores=True, async_copy_min_bytes=4, smem_bank_conflicts=8)
    assert len(aot.static_problems(row)) == 2
    row.async_copy_min_bytes, row.smem_bank_conflicts = 16, 2
    assert aot.static_problems(row) == []
    row.arch = 80  # the gate is for sm_90
    row.async_copy_min_bytes = 4
    assert aot.static_problems(row) == []
    # Spills, on every arch: in a loop they fail; outside loops up to 64 bytes pass.
    row.spill_stores, row.spill_loads = 16, 20
    row.spill_instructions_in_loops = 0
    assert aot.static_problems(row) == []
    row.spill_instructions_in_loops = 2
    assert aot.static_problems(row) == [
        "register spills in a loop (16 bytes stored, 20 loaded): 2 local-memory instructions"]
    row.spill_stores, row.spill_loads, row.spill_instructions_in_loops = 84, 92, 0
    assert aot.static_problems(row) == ["register spills (84 bytes stored, 92 loaded) over "
                                        "64 bytes"]
    row.spill_instructions_in_loops = None  # not located: fails
    assert aot.static_problems(row)
    # Scalar stores: a store of p one element at a time fails the softmax's gate.
    ptx = "st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};\n@%p1 st.global.b32 [%rd2], %r5;\n"
    assert aot.scalar_global_stores(ptx) == 1
    assert aot.scalar_global_stores(ptx + "st.global.cs.f32 [%rd3], %f1;\n") == 2
    soft = aot.AotRow("softmax_fwd", "fp32,tf32-round", "K=80", 80, ok=True,
                      scalar_global_stores=1)
    assert aot.static_problems(soft) == []
    soft.scalar_global_stores = 33  # one element per store: p not vectorised
    assert aot.static_problems(soft)


_SASS_TMA_LAYOUT = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R2 ;
        /*0020*/              @!P0 BRA 0x90 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/              @!P1 BRA 0x10 ;
        /*0050*/                   MUFU.LG2 R3, R24 ;
        /*0060*/                   FMUL R3, R3, 0.69314718246459960938 ;
        /*0070*/                   STG.E [R4.64], R3 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x10 ;
"""


def test_epilogue_path_starts_after_the_main_loop():
    # The main loop (0x10-0x40) holds the tensor-core instruction; an out-of-line wait
    # (0x90) branches back into it from the end of the program, as TMA kernels do: the
    # epilogue is what follows the innermost loop, 4 instructions.
    from benchmarks import aot

    assert aot.sass_path_lengths(_SASS_TMA_LAYOUT) == (4, 4)
    assert aot.epilogue_instructions_per_entry(_SASS_TMA_LAYOUT, 2) == (2.0, 2.0)
    assert aot.spill_instructions_in_loops(_SASS_TMA_LAYOUT) == 0


@pytest.mark.parametrize("which", ["JOINT_CONFIGS", "MATMUL_CONFIGS"])
def test_autotune_configs_fit_each_arch_with_the_real_operand_size(which):
    """Operand staging (stages x (rows + columns) x depth x element size) plus the epilogue's
    reserve fits each arch's per-block shared memory; bf16 on sm_90 (2-byte operands, 227 KiB)
    may use tiles fp32 on sm_80 cannot: the filter is per arch and precision."""
    from benchmarks.aot import triton_precisions
    from music_loss.kernels import configs as cf

    configs = getattr(cf, which)
    chosen = {}
    itemsizes = {"ieee": 4, "tf32": 4, "bf16": 2}
    for arch, limit in cf.SMEM_LIMITS.items():
        for precision in triton_precisions(arch):
            itemsize = itemsizes[precision]
            picked = cf.configs_for(configs, precision, limit)
            assert picked, (arch, precision)
            for cfg in picked:
                kw = cfg.kwargs
                rows, cols, depth = ((kw["BLOCK_A"], kw["BLOCK_B"], kw["BLOCK_N"])
                                     if "BLOCK_A" in kw else
                                     (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]))
                staging = cfg.num_stages * (rows + cols) * depth * itemsize
                assert staging + cf.EPILOGUE_SMEM <= limit, (arch, precision, cfg)
            chosen[arch, precision] = {str(c) for c in picked}
    assert chosen[90, "bf16"] > chosen[80, "tf32"]
    # sm_90/sm_100 offer tf32 every sm_80 config but those whose operand tiles, made K-major
    # on chip from 16-column loads there, would be copied less than 16 bytes a thread.
    narrow = {str(c) for c in configs if cf.tile_of(c)[2] * 16 < 128 * c.num_warps}
    assert chosen[90, "tf32"] > chosen[80, "tf32"] - narrow
    assert not chosen[90, "tf32"] & narrow and not chosen[100, "tf32"] & narrow
    # The 3-stage fallbacks: float32 on the 99 KiB cards, never where their original fits.
    fallbacks = {str(c) for c in cf.SHALLOW_FALLBACKS}
    for arch in (86, 89, 120):
        assert chosen[arch, "ieee"] & fallbacks and chosen[arch, "tf32"] & fallbacks, arch
        assert not chosen[arch, "bf16"] & fallbacks, arch
    for arch in (80, 90, 100):
        assert not any(chosen[arch, p] & fallbacks for p in itemsizes), arch


def test_the_shared_memory_table_is_the_gpu_policys():
    from music_loss._gpu_policy import SMEM_PER_BLOCK_KIB
    from music_loss.kernels import configs as cf

    table = {major * 10 + minor: kib * 1024 for (major, minor), kib in SMEM_PER_BLOCK_KIB.items()}
    assert table == cf.SMEM_LIMITS


_AUTOTUNERS = """
from music_loss.kernels.launchers import AUTOTUNERS as tuners
print(tuners["product"].restore_value, tuners["product_accumulate"].restore_value)
"""


def test_only_the_accumulating_product_restores_its_output_while_autotuning():
    # The restore copy runs inside every timed autotune call: a store-only product must not
    # pay for it (its configs would all look slower by a copy of the output).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AUTOTUNERS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "[] ['c_ptr']"


_TUNERS_PER_LIMIT = """
from music_loss.kernels import configs
from music_loss.kernels.launchers import AUTOTUNERS as tuners
limit = [99 * 1024]
configs.device_smem_limit = lambda: limit[0]
small = tuners["joint"]
small.cache[("key",)] = configs.JOINT_CONFIGS[0]
small_set = configs.prune_configs(configs.MATMUL_CONFIGS, {"PRECISION": "tf32"})
limit[0] = 227 * 1024
large = tuners["joint"]
large_set = configs.prune_configs(configs.MATMUL_CONFIGS, {"PRECISION": "tf32"})
limit[0] = 99 * 1024
print(large is not small, tuners["joint"] is small, ("key",) in large.cache)
print(sorted(map(str, small_set)) != sorted(map(str, large_set)), len(small_set), len(large_set))
"""


def test_autotuners_are_per_shared_memory_limit():
    # Two cards with different limits in one process: each gets its own autotuner (and
    # cache), and the pruning by the device's limit offers each its own configs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TUNERS_PER_LIMIT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "True True False", lines
    differ, small, large = lines[1].split()
    assert differ == "True" and 0 < int(small) < int(large), lines


def test_static_tables_compare_side_by_side():
    from dataclasses import asdict

    from benchmarks import aot

    def row(variant, copy, ways, mma, epi, tma=False, epi_diagonal=None):
        return asdict(aot.AotRow("joint_entropy", variant, "64x64x32 w4 s4", 90, ok=True,
                                 needs_tensor_cores=True, async_copy_min_bytes=copy,
                                 smem_bank_conflicts=ways, mma_shape=mma, uses_tma=tma,
                                 epilogue_instructions_per_entry=epi,
                                 epilogue_instructions_per_entry_diagonal=epi_diagonal))

    old = [row("tf32", 4, 16, "m64n64k8", 57.4), row("tf32", 16, 8, "m64n64k8", 60.0)]
    new = [row("tf32", 16, 1, "m64n128k8", 31.0, epi_diagonal=43.4),
           row("tf32,tma", None, None, "m64n64k8", 39.0, tma=True)]
    old_rows = [{k: v for k, v in r.items()  # tables written before the diagonal count
                 if k != "epilogue_instructions_per_entry_diagonal"} for r in old]
    table = aot.compare_markdown([("old", old_rows), ("new", new)])
    assert "| joint_entropy | tf32 | sm_90 | 4 B -> 16 B | 16-way -> 1-way | " \
        "m64n64k8 -> m64n128k8 | 57-60 -> 31 | - -> 43 | - |" in table
    assert "| joint_entropy | tf32,tma | sm_90 | - -> TMA | - | - -> m64n64k8 | - -> 39 | - | - |" \
        in table


def test_a_precision_the_policy_runs_without_a_fitting_config_fails_the_check(monkeypatch):
    # Without the 3-stage fallbacks no float32 config fits the 99 KiB of sm_86, while the
    # policy sends float32 there: the check must fail rather than compile nothing.
    from music_loss.kernels import configs as cf

    assert aot.policy_gaps(86) == []
    monkeypatch.setattr(cf, "JOINT_CONFIGS", cf._JOINT_MAIN)
    monkeypatch.setattr(cf, "MATMUL_CONFIGS", cf._MATMUL_MAIN)
    gaps = aot.policy_gaps(86)
    assert {(r.kernel, r.variant) for r in gaps} == {
        ("joint_entropy", "ieee"), ("grad_product", "ieee"), ("grad_product", "tf32")}
    assert not any(r.ok for r in gaps) and aot.policy_gaps(90) == []


def _gate_row(**facts):
    row = {"kernel": "joint_entropy", "variant": "bf16", "config": "128x128x32 w8 s4",
           "arch": 90, "ok": True, "registers": 183, "spill_instructions_in_loops": None,
           "mma_shape": "m64n128k16", "async_copy_min_bytes": 16, "uses_tma": False,
           "smem_bank_conflicts": 1, "epilogue_instructions_per_entry": 13.5,
           "epilogue_instructions_per_entry_diagonal": 26.0, "global_loads_after_loop": 0}
    row.update(facts)
    return row


@pytest.mark.parametrize("facts,found", [
    ({}, None),
    ({"epilogue_instructions_per_entry": 14.5, "registers": 191}, None),  # within slack
    ({"epilogue_instructions_per_entry": 14.6}, "epilogue SASS/entry 13.5 -> 14.6"),
    ({"epilogue_instructions_per_entry_diagonal": 27.5}, "(diagonal tiles) 26.0 -> 27.5"),
    ({"mma_shape": "m64n64k16"}, "mma m64n128k16 -> m64n64k16 (narrower)"),
    ({"mma_shape": None}, "mma m64n128k16 -> None"),
    ({"registers": 192}, "registers 183 -> 192"),
    ({"spill_instructions_in_loops": 2}, "spill instructions in loops 0 -> 2"),
    ({"async_copy_min_bytes": 4}, "narrowest cp.async 16 -> 4 bytes"),
    ({"smem_bank_conflicts": 4}, "bank conflicts 1-way -> 4-way"),
    ({"smem_bank_conflicts": None}, "bank conflicts 1-way -> not counted"),
    ({"global_loads_after_loop": 8}, "global loads after the main loop 0 -> 8"),
    ({"ok": False, "problems": ["compile failed"]}, "now fails: compile failed"),
])
def test_gate_flags_each_regression_against_the_table(facts, found):
    from benchmarks import aot

    regressions, new = aot.gate_regressions([_gate_row(**facts)], [_gate_row()])
    assert new == []
    if found is None:
        assert regressions == []
    else:
        assert len(regressions) == 1 and found in regressions[0], regressions
    # A row the table does not hold is new, and passes.
    regressions, new = aot.gate_regressions([_gate_row(**facts, config="other")],
                                            [_gate_row()])
    assert regressions == [] and new == ["joint_entropy bf16 other sm_90"]


@pytest.mark.parametrize("facts,found", [
    ({"warp_specialized": True, "partition_registers": "40/232"}, None),
    ({}, "no producer/consumer split in the PTX"),
    ({"warp_specialized": True, "spill_stores": 8, "spill_loads": 8},
     "warp-specialised variant spills (8 bytes stored, 8 loaded)"),
])
def test_gate_fails_a_warp_specialized_row_without_the_split_or_with_spills(facts, found):
    # New or in the table, a ws row must show its split and spill nothing.
    from benchmarks import aot

    base = _gate_row(variant="bf16,ws", spill_stores=0, spill_loads=0, warp_specialized=True)
    row = _gate_row(**{"variant": "bf16,ws", "spill_stores": 0, "spill_loads": 0, **facts})
    for table in ([base], []):
        regressions, _ = aot.gate_regressions([row], table)
        if found is None:
            assert regressions == [], regressions
        else:
            assert len(regressions) == 1 and found in regressions[0], regressions
    assert bool(aot._warp_specialization_problems(row)) == (found is not None)
    # A row that is not ws is not asked for a split.
    assert aot.gate_regressions([_gate_row(config="other")], []) == (
        [], ["joint_entropy bf16 other sm_90"])


_WARP_SPECIALIZED = """
import json
from dataclasses import asdict
from benchmarks import aot
spec = next(s for s in aot.kernel_specs(quick=True, arch=90)
            if s.kernel == "joint_entropy" and s.variant == "bf16,ws")
rows = [asdict(aot.compile_spec(spec, 90))]
spec.constexprs["WARP_SPECIALIZE"] = False  # the fault: the plain kernel, labelled ws
rows.append(asdict(aot.compile_spec(spec, 90)))
print(json.dumps(rows))
"""


def test_the_warp_specialized_joint_kernel_splits_and_the_gate_fails_without_it():
    """sm_90, bf16: the ``ws`` variant's PTX shows the producer/consumer split (the
    partitions' ``setmaxnreg``), spills nothing and issues the plain kernel's ``wgmma`` count
    (two consumers each take half the tile, neither computes all of it); the same config
    compiled without ``WARP_SPECIALIZE`` but labelled ``ws`` fails the compile check and the
    gate."""
    from benchmarks import aot

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _WARP_SPECIALIZED], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ws, plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ws["ok"] and ws["problems"] == [], ws["problems"]
    assert ws["warp_specialized"] and ws["uses_tma"], ws
    producer, consumer = map(int, ws["partition_registers"].split("/"))
    assert producer < consumer, ws["partition_registers"]
    assert ws["spill_stores"] == ws["spill_loads"] == 0
    assert ws["mma_shape"] == "m64n64k16"
    assert ws["tensor_core_instructions"] == plain["tensor_core_instructions"] > 0
    assert not plain["warp_specialized"] and plain["partition_registers"] is None
    assert not plain["ok"] and any("no producer/consumer split" in p for p in plain["problems"])
    with open(aot.default_baseline()) as fh:
        table = json.load(fh)
    assert aot.gate_regressions([ws], table)[0] == []
    regressions, _ = aot.gate_regressions([plain], table)
    assert any("no producer/consumer split" in line for line in regressions), regressions


def test_gate_picks_the_newest_table_of_this_triton(tmp_path):
    from benchmarks import aot

    for name in ("aot-static-2026-01-02-triton3.8.json", "aot-static-2026-03-01-triton3.8.json",
                 "aot-static-2026-04-01-triton3.6.json", "aot-static-2026-05-01.json"):
        (tmp_path / name).write_text("[]")
    assert aot.default_baseline(str(tmp_path), "3.8").endswith("2026-03-01-triton3.8.json")
    assert aot.default_baseline(str(tmp_path), "3.6").endswith("2026-04-01-triton3.6.json")
    assert aot.default_baseline(str(tmp_path), "3.9") is None
    # This checkout holds a table for the Triton it runs.
    assert aot.default_baseline() is not None


_MUTATION = """
import json, sys
from dataclasses import asdict
from benchmarks import aot
spec = next(s for s in aot.kernel_specs(quick=True, arch=90)
            if s.kernel == "joint_entropy" and s.variant == "bf16")
rows = []
for fast_log in (True, False):  # the committed kernel, then the accurate-log mutation
    spec.constexprs["FAST_LOG"] = fast_log
    rows.append(asdict(aot.compile_spec(spec, 90)))
print(json.dumps(rows))
"""


def test_gate_fails_on_the_accurate_log_in_bf16():
    """The bf16 joint kernel compiled with libdevice's accurate log instead of the
    special-function unit's: the gate against the committed table must call it a
    regression, and pass the committed kernel."""
    from benchmarks import aot

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _MUTATION], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    committed, mutated = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(aot.default_baseline()) as fh:
        table = json.load(fh)
    assert aot.gate_regressions([committed], table) == ([], [])
    regressions, _ = aot.gate_regressions([mutated], table)
    assert any("epilogue SASS/entry" in line for line in regressions), regressions
