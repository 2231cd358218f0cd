"""Ahead-of-time compile check of every kernel, for each GPU architecture, with no GPU.

Usage::

    python -m benchmarks.aot --arch 75 80 86 89 90 100 120 [--json results.json] [--quick]
        [--jobs 2]

Compiles every kernel in every autotune config of every precision mode that the GPU policy
(:mod:`music_loss._gpu_policy`) runs on Triton on that architecture, with the configs that
fit its shared memory (:func:`music_loss.kernels.configs.configs_for`), to PTX and cubin
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, then re-runs the
ptxas bundled with Triton with ``-v`` on the PTX to read registers and spills. An
architecture the policy runs on the ``torch`` backend only (sm_75, sm_70) compiles nothing.
Prints one row per kernel/variant/config/arch: shared memory (and the per-block limit of
the policy's table: 163 KiB sm_80, 99 KiB sm_86/89/120, 227 KiB sm_90/100), registers,
spill bytes, tensor-core instructions (:data:`TENSOR_CORE_PTX`: ``mma.sync`` on
sm_80/86/89/120, ``wgmma`` on sm_90, ``tcgen05.mma`` on sm_100). Exits 1 if a compile
fails, a config exceeds the shared-memory limit, spills registers inside a loop (or more
than 64 bytes outside one: located in the SASS), the joint-distribution kernel (or a
gradient product) emits none of its architecture's tensor-core instructions in tf32/bf16
mode, or a precision the policy runs on Triton has no config that fits. From sm_90 on it
also compiles the TMA variant of the gradient products and of the joint kernel
(``<mode>,tma`` variants: tensor-descriptor arguments), as the launcher may use it there,
and on sm_90 the warp-specialised joint kernel (``bf16,ws``: ``WARP_SPECIALIZE``, its own
128-row configs), whose row records whether the PTX shows the producer/consumer split
(:func:`warp_specialization`: the partitions' ``setmaxnreg`` register reallocation); the
gate fails a ``ws`` row without the split, or with any spill.
Static facts per tensor-core product: widest mma shape, narrowest
``cp.async`` (or TMA), shared-memory bank conflicts (Triton's Gluon counter), the joint
kernel's epilogue SASS per entry (for tiles off and on the block diagonal), and for the
softmax kernels the scalar (unvectorised) global stores; the gate fails the run on a
regression. Must run without ``TRITON_INTERPRET`` (with it,
``triton.compile`` fails: an interpreted function has no ``cache_key``).

The gate against the committed table (:func:`gate_regressions`): every row is compared
with the same kernel, variant, config and arch of the newest
``results/aot-static-<date>-triton<major>.<minor>.json`` for the running Triton (or
``--baseline FILE``); the run fails on a regression of any static fact (epilogue SASS per
entry beyond +1, a narrower mma shape, registers up by more than 8, spills in a loop, a
narrower copy, more bank conflicts). Rows the table lacks are reported as new and pass.
``--check JSON`` gates an earlier ``--json`` table without compiling; ``--no-gate`` skips
the comparison (to write a new table). Product rows name the product: ``dp1`` (``dp1[:,
a0:a1] = p2 G^T / N``) or ``dp2`` (``dp2 += p1[:, a0:a1] G / N``, accumulating).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from music_loss import _gpu_policy
from music_loss.kernels.configs import SMEM_LIMITS

#: The architectures the check compiles for by default: one per card generation of the GPU
#: policy from T4 (sm_75, where nothing runs on Triton) to Blackwell.
ARCHS: tuple[int, ...] = (75, 80, 86, 89, 90, 100, 120)

#: The tensor-core instruction of each architecture's products in PTX: Ampere's warp-level
#: ``mma.sync`` (also Ada's and consumer Blackwell's, sm_120), Hopper's warpgroup ``wgmma``,
#: datacenter Blackwell's ``tcgen05.mma`` (sm_100/103).
TENSOR_CORE_PTX: dict[int, str] = {
    80: r"\bmma\.sync\.aligned\.", 86: r"\bmma\.sync\.aligned\.", 87: r"\bmma\.sync\.aligned\.",
    89: r"\bmma\.sync\.aligned\.", 90: r"\bwgmma\.mma_async\.", 100: r"\btcgen05\.mma\.",
    103: r"\btcgen05\.mma\.", 120: r"\bmma\.sync\.aligned\.",
}


def capability_of(arch: int) -> tuple[int, int]:
    """``86`` -> ``(8, 6)``, ``120`` -> ``(12, 0)``."""
    return arch // 10, arch % 10


def triton_precisions(arch: int) -> tuple[str, ...]:
    """The precision modes the GPU policy lets run on Triton on ``sm_<arch>`` (an explicit
    ``backend="triton"`` it does not refuse): what the check compiles there.

    Example:
        >>> triton_precisions(75), triton_precisions(86)
        ((), ('ieee', 'tf32', 'bf16'))
    """
    card = _gpu_policy.card_for_capability(capability_of(arch))
    allowed = []
    for precision in ("ieee", "tf32", "bf16"):
        try:
            _gpu_policy.check_explicit(card, "triton", precision, precision)
        except ValueError:
            continue
        allowed.append(precision)
    return tuple(allowed)

#: Representative segment sizes for the elementwise kernels' launch heuristics: K = 1, the
#: paper's 80 (not a power of two), and a wide 2048-bin segment.
SEGMENT_DIMS: tuple[int, ...] = (1, 80, 2048)
_NUM_SEGMENTS = {1: 1024, 80: 102, 2048: 4}


@dataclass
class KernelSpec:
    """One compile job: a kernel, its argument types, constexprs and launch options."""

    kernel: str
    variant: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    needs_tensor_cores: bool = False
    config: str = ""
    attrs: dict[tuple[int, ...], list[list[Any]]] = field(default_factory=dict)


@dataclass
class AotRow:
    """One printed row of the compile table."""

    kernel: str
    variant: str
    config: str
    arch: int
    ok: bool
    shared_bytes: int = -1
    smem_limit: int = 0
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    tensor_core_instructions: int = 0
    needs_tensor_cores: bool = False
    mma_shape: str | None = None
    async_copy_min_bytes: int | None = None
    uses_tma: bool = False
    smem_bank_conflicts: int | None = None
    epilogue_instructions_per_entry: float | None = None
    epilogue_instructions_per_entry_diagonal: float | None = None
    spill_instructions_in_loops: int | None = None
    global_loads_after_loop: int | None = None
    scalar_global_stores: int | None = None
    warp_specialized: bool = False
    partition_registers: str | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


_FLOAT_ARGS = ("inv_temperature", "eps", "c_diag", "c_off", "inv_coef", "inv_n", "alpha")


def _spec(kernel: str, variant: str, fn: Any, types: dict[str, str], constexprs: dict[str, Any],
          num_warps: int, num_stages: int, config: str, unit: tuple[str, ...] = (),
          needs_tensor_cores: bool = False) -> KernelSpec:
    """Build a job the way the JIT specialises a launch at the paper's shape (N=2048,
    D=8160, K=80): unit strides (``unit``) become the constant 1, and pointers and integer
    arguments get the 16-divisibility attribute (16-byte aligned allocations; N, D, K,
    chunk offsets and strides are multiples of 16 there). Without it bf16 loads are not
    vectorised and the software pipeliner skips them."""
    constexprs = {**constexprs, **{name: 1 for name in unit}}
    for param in fn.params:  # a constexpr left out compiles with its default, never as i32
        if param.is_constexpr and param.name not in constexprs:
            if param.default is inspect.Parameter.empty:
                raise ValueError(f"{kernel}: constexpr {param.name} needs a value")
            constexprs[param.name] = param.default
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        aligned_int = signature[name] == "i32" and name not in ("S", "local_start", "local_stop")
        if signature[name].startswith("*") or aligned_int:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return KernelSpec(kernel, variant, fn, signature, constexprs, num_warps, num_stages,
                      needs_tensor_cores, config, attrs)


def _config_label(meta: dict[str, Any], num_warps: int, num_stages: int) -> str:
    blocks = "x".join(str(v) for k, v in meta.items() if k.startswith("BLOCK"))
    return f"{blocks} w{num_warps} s{num_stages}"


def arch_configs(configs: list[Any], arch: int, quick: bool = False) -> dict[str, list[Any]]:
    """The configs each precision mode the policy runs on Triton autotunes over on
    ``sm_<arch>`` (``configs_for`` with the arch's shared memory; ``quick``: the first two)."""
    from music_loss.kernels import configs as cf

    return {p: cf.configs_for(configs, p, SMEM_LIMITS[arch])[:2 if quick else None]
            for p in triton_precisions(arch)}


def kernel_specs(quick: bool = False, arch: int = 90) -> list[KernelSpec]:
    """Every compile job for ``arch``: all kernels x the autotune configs each precision mode
    the policy runs on Triton uses there (``configs_for`` with the arch's shared memory) x
    layouts; none where the policy runs nothing on Triton."""
    from music_loss.kernels import configs as cf
    from music_loss.kernels import joint_entropy as je
    from music_loss.kernels import segment_softmax as ss
    from music_loss.kernels.launchers import tma_available

    specs: list[KernelSpec] = []
    if not triton_precisions(arch):
        return specs
    joint_configs = arch_configs(cf.JOINT_CONFIGS, arch, quick)
    matmul_configs = arch_configs(cf.MATMUL_CONFIGS, arch, quick)
    for cfg in cf.JOINT_CONFIGS:
        label = _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages)
        for prec in [p for p, picked in joint_configs.items() if cfg in picked]:
            op = "*bf16" if prec == "bf16" else "*fp32"
            # Every mode reads the row-major (N, D) arrays; tf32 on sm_90/sm_100 forms its
            # K-major operands on chip (KMAJOR_STAGING, as the launcher sets it there).
            const = {**cfg.kwargs, "WRITE_G": True, "PRECISION": prec, "EMULATE_BF16": False,
                     "EMULATE_TF32": False, "ROUND_TF32": True, "USE_INT64": False,
                     "KMAJOR_STAGING": prec == "tf32" and arch // 10 in (9, 10)}
            unit_p = ("stride_p1a", "stride_p2b")
            specs.append(_spec("joint_entropy", prec, je.joint_entropy_kernel,
                               {"p1_ptr": op, "p2_ptr": op, "g_ptr": op}, const,
                               cfg.num_warps, cfg.num_stages, label, unit_p,
                               needs_tensor_cores=prec != "ieee"))
            if prec == "bf16" and arch >= 90 and tma_available():
                # TMA operand tiles (sm_90, bf16; tf32 keeps the pointer kernel's on-chip
                # K-major staging): descriptors of the row-major (N, D) arrays.
                ba, bb, bn = cfg.kwargs["BLOCK_A"], cfg.kwargs["BLOCK_B"], cfg.kwargs["BLOCK_N"]
                dt = op.removeprefix("*")
                specs.append(_spec("joint_entropy", f"{prec},tma", je.joint_entropy_kernel,
                                   {"p1_ptr": f"tensordesc<{dt}[{bn}, {ba}]>",
                                    "p2_ptr": f"tensordesc<{dt}[{bn}, {bb}]>",
                                    "g_ptr": op},
                                   {**const, "USE_TMA": True},
                                   cfg.num_warps, cfg.num_stages, label, unit_p,
                                   needs_tensor_cores=True))
    # The warp-specialised joint kernel (sm_90, bf16, opt-in): its own 128-row configs, the
    # pointer operands it builds device-side descriptors of.
    if arch == 90 and "bf16" in triton_precisions(arch):
        ws_configs = cf.configs_for(cf.WS_JOINT_CONFIGS, "bf16", SMEM_LIMITS[arch])
        for cfg in ws_configs[:2 if quick else None]:
            const = {**cfg.kwargs, "WRITE_G": True, "PRECISION": "bf16", "EMULATE_BF16": False,
                     "EMULATE_TF32": False, "ROUND_TF32": True, "USE_INT64": False,
                     "WARP_SPECIALIZE": True}
            specs.append(_spec("joint_entropy", "bf16,ws", je.joint_entropy_kernel,
                               {"p1_ptr": "*bf16", "p2_ptr": "*bf16", "g_ptr": "*bf16"}, const,
                               cfg.num_warps, cfg.num_stages,
                               _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages),
                               ("stride_p1a", "stride_p2b"), needs_tensor_cores=True))
    # The two products, labelled by which one they are: dp2 += p1[:, a0:a1] @ G
    # (accumulating, row-major "NN"; tf32 on sm_90/sm_100 forms G's K-major tiles on chip) and
    # dp1[:, a0:a1] = p2 @ G^T ("NT", not accumulating). dp2 in every config of every mode;
    # dp1 in every tf32 config and in bf16's first (its NT copies are bf16's widest).
    layouts = {"NN": ("stride_ak", "stride_bn", "stride_cn"),
               "NT": ("stride_ak", "stride_bk", "stride_cn")}
    for cfg in cf.MATMUL_CONFIGS:
        label = _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages)
        modes = [p for p, picked in matmul_configs.items() if cfg in picked]
        first = cfg is (matmul_configs.get("bf16") or [None])[0]
        jobs = [(p, "dp2", "NN") for p in modes]
        jobs += [(p, "dp1", "NT") for p in modes if p == "tf32" or (first and p == "bf16")]
        for prec, product, layout in jobs:
            op = "*bf16" if prec == "bf16" else "*fp32"
            const = {**cfg.kwargs, "ACCUMULATE": product == "dp2", "PRECISION": prec,
                     "EMULATE_BF16": False, "USE_INT64": False, "EMULATE_TF32": False,
                     "KMAJOR_STAGING": prec == "tf32" and product == "dp2"
                     and arch // 10 in (9, 10)}
            specs.append(_spec("grad_product", f"{prec},{product},{layout}",
                               je.scaled_matmul_kernel, {"a_ptr": op, "b_ptr": op}, const,
                               cfg.num_warps, cfg.num_stages, label, layouts[layout],
                               needs_tensor_cores=prec != "ieee"))
    # The TMA variant of the products (sm_90: Hopper's tensor descriptors), every config and
    # tensor-core mode, in the layouts the launcher passes to it: dp1 reads G^T ("NT") in
    # both modes; bf16's dp2 reads G row-major ("NN"); tf32's dp2 keeps the pointer kernel
    # (its K-major staging of G).
    if arch >= 90 and tma_available():
        for cfg in cf.MATMUL_CONFIGS:
            label = _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages)
            bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
            for prec in [p for p in ("tf32", "bf16") if cfg in matmul_configs.get(p, [])]:
                op = "bf16" if prec == "bf16" else "fp32"
                products = ((("dp1", "NT"),) if prec == "tf32"
                            else (("dp2", "NN"), ("dp1", "NT")))
                for product, layout in products:
                    kmajor = layout == "NT"
                    b_block = f"{bn}, {bk}" if kmajor else f"{bk}, {bn}"
                    const = {**cfg.kwargs, "ACCUMULATE": product == "dp2",
                             "PRECISION": prec, "EMULATE_BF16": False, "B_KMAJOR": kmajor,
                             "EMULATE_TF32": False}
                    specs.append(_spec(
                        "grad_product", f"{prec},{product},{layout},tma",
                        je.scaled_matmul_tma_kernel,
                        {"a_desc": f"tensordesc<{op}[{bm}, {bk}]>",
                         "b_desc": f"tensordesc<{op}[{b_block}]>",
                         "c_desc": f"tensordesc<fp32[{bm}, {bn}]>"}, const, cfg.num_warps,
                        cfg.num_stages, label, needs_tensor_cores=True))
    # int64 offsets (N * D >= 2**31) in the largest bf16 product config that fits both
    # sm_80 and this arch.
    big = cf.configs_for(cf.MATMUL_CONFIGS, "bf16", min(SMEM_LIMITS[80], SMEM_LIMITS[arch]))[-1]
    const = {**big.kwargs, "ACCUMULATE": True, "PRECISION": "bf16", "EMULATE_BF16": False,
             "USE_INT64": True, "EMULATE_TF32": False}
    specs.append(_spec("grad_product", "bf16,dp2,NN,int64", je.scaled_matmul_kernel,
                       {"a_ptr": "*bf16", "b_ptr": "*bf16"}, const, big.num_warps,
                       big.num_stages, _config_label(big.kwargs, big.num_warps, big.num_stages),
                       layouts["NN"], needs_tensor_cores=True))
    unit_z = ("stride_z1d", "stride_z2d")
    for k in SEGMENT_DIMS[1:2] if quick else SEGMENT_DIMS:
        meta = ss.softmax_blocks(k, _NUM_SEGMENTS[k])
        warps = meta.pop("num_warps")
        label = f"K={k} " + _config_label(meta, warps, 1)
        # (z dtype, int64 offsets, p stored rounded to nearest tf32: the tf32 mode's operands)
        variants = ([("fp32", False, False), ("fp32", False, True), ("bf16", False, False),
                     ("bf16", True, False)] if k == 80 else [("fp32", False, False)])
        for z_dtype, int64, round_tf32 in variants:
            z_type = "*" + z_dtype
            variant = z_dtype + (",int64" if int64 else "") + (",tf32-round" if round_tf32
                                                               else "")
            const = {**meta, "TWO_VIEWS": True, "ROUND_BF16": False, "USE_INT64": int64,
                     "ROUND_TF32": round_tf32, "EMULATE_TF32": False}
            p_type = "*fp32" if round_tf32 else z_type
            specs.append(_spec("softmax_fwd", variant, ss.segment_softmax_fwd_kernel,
                               {"z1_ptr": z_type, "z2_ptr": z_type, "p1_ptr": p_type,
                                "p2_ptr": p_type}, const, warps, 1, label, unit_z))
            if round_tf32:  # the backward does not depend on the operands' rounding
                continue
            const = {**meta, "HAS_OFF": True, "USE_INT64": int64}
            specs.append(_spec("loss_bwd", variant, ss.music_loss_bwd_kernel,
                               {"z1_ptr": z_type, "z2_ptr": z_type, "dz1_ptr": z_type,
                                "dz2_ptr": z_type}, const, warps, 1, label, unit_z))
    return specs


@contextlib.contextmanager
def _ptxas_log_printed() -> Iterator[None]:
    """Ask Triton to print its ptxas log (``knobs.nvidia.dump_ptxas_log``) if it can."""
    try:
        from triton import knobs

        previous = knobs.nvidia.dump_ptxas_log
    except (ImportError, AttributeError):  # pragma: no cover - older Triton
        yield
        return
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = previous


def _parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)``; -1s when not in ``log``."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) if spills else -1,
            int(spills.group(2)) if spills else -1)


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from the bundled ``ptxas -v``."""
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(arch).path  # triton >= 3.5
    except TypeError:  # pragma: no cover - older signature
        ptxas = nv.get_ptxas().path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        # Triton's own ptxas flags (triton/backends/nvidia/compiler.py make_cubin).
        for extra in (["--regAllocOptLevel=2"], []):
            cmd = [ptxas, "-lineinfo", "-v", *extra, f"--gpu-name={gpu}", src, "-o",
                   os.path.join(tmp, "k.cubin")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            log = out.stderr + out.stdout
            if out.returncode == 0:
                break
    return _parse_ptxas_log(log)


# ---------------------------------------------------------------------------------------
# Static performance facts: read from the compiled code, never timed.
# ---------------------------------------------------------------------------------------
_LAYOUT_DEF = re.compile(
    r"^(#\w+) = #ttg\.(blocked|linear|nvmma_shared|swizzled_shared)<\{(.*)\}>", re.MULTILINE)
_SHARED_STORE = re.compile(
    r"ttg\.(?:async_copy_global_to_local|local_store|local_alloc)\b[^\n]*?"
    r"tensor<([0-9x]+)x(?:!tt\.ptr<)?(\w+?)>?, (#\w+)>\)? -> (?:!ttg\.memdesc)?<[0-9x]+x\w+, "
    r"(#\w+)")


def tensor_core_pattern(arch: int) -> str:
    """The regular expression of ``sm_<arch>``'s tensor-core instruction in PTX
    (:data:`TENSOR_CORE_PTX`; an unlisted arch takes its family's: 10x ``tcgen05.mma``,
    9x ``wgmma``, the others ``mma.sync``)."""
    if arch in TENSOR_CORE_PTX:
        return TENSOR_CORE_PTX[arch]
    family = {9: 90, 10: 100}.get(arch // 10, 80)
    return TENSOR_CORE_PTX[family]


def tensor_core_instructions(ptx: str, arch: int) -> int:
    """How many of ``sm_<arch>``'s tensor-core instructions ``ptx`` holds.

    Example:
        >>> ptx = "@%p1 tcgen05.mma.cta_group::1.kind::tf32 [ %r9 + 0 ], %rd1, %rd2, %r3, %p2;"
        >>> tensor_core_instructions(ptx, 100), tensor_core_instructions(ptx, 90)
        (1, 0)
    """
    return len(re.findall(tensor_core_pattern(arch), ptx))


#: ``tcgen05.mma``'s K per instruction by operand kind (32 bytes of each operand row).
_TCGEN05_K = {"tf32": 8, "f16": 16, "f8f6f4": 32, "i8": 32}
_MOV_B32 = re.compile(r"\s*mov\.b32\s+(%r\d+),\s*(-?\d+);")
_TCGEN05_MMA = re.compile(r"\btcgen05\.mma\.cta_group::\d\.kind::(\w+)\s+\[[^\]]*\],\s*[^,]+,"
                          r"\s*[^,]+,\s*(%r\d+|\d+)")


def _tcgen05_shapes(ptx: str) -> set[tuple[int, str]]:
    """``(N, "m<M>n<N>k<K>")`` of each ``tcgen05.mma`` in ``ptx``: M and N come from its
    instruction descriptor (bits 24-28: M / 16, bits 17-22: N / 8; an immediate, or the
    ``mov.b32`` constant of its register), K from the operand kind."""
    constants: dict[str, int] = {}
    shapes = set()
    for line in ptx.splitlines():
        mov = _MOV_B32.match(line)
        if mov:
            constants[mov.group(1)] = int(mov.group(2)) & 0xFFFFFFFF
            continue
        mma = _TCGEN05_MMA.search(line)
        if not mma:
            continue
        desc = mma.group(2)
        value = constants.get(desc) if desc.startswith("%") else int(desc)
        if value is None:
            continue
        m, n = ((value >> 24) & 0x1F) << 4, ((value >> 17) & 0x3F) << 3
        shapes.add((n, f"m{m}n{n}k{_TCGEN05_K.get(mma.group(1), 0)}"))
    return shapes


def mma_shape(ptx: str, arch: int) -> str | None:
    """The widest tensor-core instruction shape of ``sm_<arch>`` in ``ptx`` (``m64n128k8``),
    or None.

    Example:
        >>> ptx = '''mov.b32 %r232, 68159760;
        ... @%p3 tcgen05.mma.cta_group::1.kind::tf32 [ %r1 + 0 ], %rd8, %rd9, %r232, %p4;'''
        >>> mma_shape(ptx, 100), mma_shape(ptx, 90)
        ('m64n64k8', None)
    """
    pattern = tensor_core_pattern(arch)
    if "tcgen05" in pattern:
        shapes = _tcgen05_shapes(ptx)
    else:
        shape = (r"wgmma\.mma_async\.sync\.aligned\." if "wgmma" in pattern
                 else r"\bmma\.sync\.aligned\.") + r"(m\d+n(\d+)k\d+)"
        shapes = {(int(n), found) for found, n in re.findall(shape, ptx)}
    return max(shapes)[1] if shapes else None


def async_copy_widths(ptx: str) -> tuple[int | None, bool]:
    """``(narrowest cp.async copy in bytes or None, uses TMA)`` of ``ptx``.

    The kernels' only global->shared copies are their main loops' operand copies.
    """
    uses_tma = "cp.async.bulk.tensor" in ptx
    sizes = [int(size, 0) for size in re.findall(
        r"cp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.L2::\w+)?\s+\[[^\]]+\],\s*\[[^\]]+\],"
        r"\s*(0x[0-9a-fA-F]+|\d+)", ptx)]
    return (min(sizes) if sizes else None), uses_tma


def _ints(text: str, key: str) -> list[int]:
    match = re.search(key + r" = \[([0-9, ]+)\]", text)
    return [int(v) for v in match.group(1).split(",")] if match else []


def _bases(body: str, key: str) -> list[list[int]]:
    """The bases ``key = [[...], ...]`` of a ttgir linear layout (``[]`` if absent)."""
    match = re.search(key + r" = \[((?:\[[0-9, ]*\](?:, )?)*)\]", body)
    if not match:
        return []
    return [[int(v) for v in basis.split(",") if v.strip()]
            for basis in re.findall(r"\[([0-9, ]*)\]", match.group(1))]


def _gluon_layout(kind: str, body: str, shape: list[int] | None = None) -> Any:
    """A ttgir layout attribute as the equivalent Gluon layout object (None if unknown).
    A linear layout needs the ``shape`` of the tensor it describes."""
    from triton.experimental.gluon import language as ttgl

    if kind == "linear":
        if shape is None:
            return None
        return ttgl.DistributedLinearLayout(_bases(body, "register"), _bases(body, "lane"),
                                            _bases(body, "warp"), _bases(body, "block"),
                                            shape)
    if kind == "blocked":
        return ttgl.BlockedLayout(_ints(body, "sizePerThread"), _ints(body, "threadsPerWarp"),
                                  _ints(body, "warpsPerCTA"), _ints(body, "order"))
    if kind == "nvmma_shared":
        width = re.search(r"swizzlingByteWidth = (\d+)", body)
        bits = re.search(r"elementBitWidth = (\d+)", body)
        if not (width and bits):
            return None
        return ttgl.NVMMASharedLayout(int(width.group(1)), int(bits.group(1)), 2,
                                      "transposed = true" in body)
    if kind == "swizzled_shared":
        vals = {k: int(v) for k, v in re.findall(r"(vec|perPhase|maxPhase) = (\d+)", body)}
        return ttgl.SwizzledSharedLayout(vals.get("vec", 1), vals.get("perPhase", 1),
                                         vals.get("maxPhase", 1), _ints(body, "order"))
    return None


_CONFLICTS: dict[tuple[str, ...], int | None] = {}


def _probe_conflicts(reg: Any, shared: Any, shape: list[int], dtype: str, arch: int) -> int:
    """Triton's own counter, ``gluon.language.bank_conflicts``, evaluated at compile time."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental import gluon
    from triton.experimental.gluon import language as ttgl

    # Rank 2 passes the sizes as two integers: Triton 3.6 does not take a tuple constexpr.
    @gluon.jit
    def probe2(DTYPE: ttgl.constexpr, REG: ttgl.constexpr, SHARED: ttgl.constexpr,
               M: ttgl.constexpr, N: ttgl.constexpr) -> None:
        ttgl.static_print("@@CONFLICTS", ttgl.bank_conflicts(
            ttgl.distributed_type(DTYPE.value, [M, N], REG),
            ttgl.shared_memory_descriptor_type(DTYPE.value, [M, N], SHARED, [M, N])))

    @gluon.jit
    def probe(DTYPE: ttgl.constexpr, REG: ttgl.constexpr, SHARED: ttgl.constexpr,
              SHAPE: ttgl.constexpr) -> None:
        ttgl.static_print("@@CONFLICTS", ttgl.bank_conflicts(
            ttgl.distributed_type(DTYPE.value, SHAPE, REG),
            ttgl.shared_memory_descriptor_type(DTYPE.value, SHAPE, SHARED, SHAPE)))

    element = {"f32": ttgl.float32, "bf16": ttgl.bfloat16}[dtype]
    if len(shape) == 2:
        names: tuple[str, ...] = ("DTYPE", "REG", "SHARED", "M", "N")
        values: tuple[Any, ...] = (element, reg, shared, shape[0], shape[1])
        fn = probe2
    else:
        names, values = ("DTYPE", "REG", "SHARED", "SHAPE"), (element, reg, shared, tuple(shape))
        fn = probe
    src = ASTSource(fn=fn, signature={n: "constexpr" for n in names},
                    constexprs=dict(zip(names, values)))
    from triton import knobs

    out = io.StringIO()
    previous = knobs.compilation.always_compile
    knobs.compilation.always_compile = True  # a cached compile would skip static_print
    try:
        with contextlib.redirect_stdout(out):
            triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    finally:
        knobs.compilation.always_compile = previous
    printed = re.search(r"@@CONFLICTS (\d+)", out.getvalue())
    if printed is None:
        raise RuntimeError("the bank-conflict probe printed nothing")
    return int(printed.group(1))


def smem_bank_conflicts(ttgir: str, arch: int, num_warps: int) -> int | None:
    """Worst bank-conflict ways (1 = conflict free) over the register->shared operand stores
    (``async_copy_global_to_local``, ``local_store``, ``local_alloc`` of a value) in
    ``ttgir``, by Triton's own counter for each (register layout, shared layout, shape)
    pair: ``gluon.language.bank_conflicts`` returns the excess accesses per wavefront, so
    ways = that + 1. None when no such store exists or the counter is unavailable."""
    layouts = {name: (kind, body) for name, kind, body in _LAYOUT_DEF.findall(ttgir)}
    worst: int | None = None
    for shape_text, dtype, reg_name, shared_name in set(_SHARED_STORE.findall(ttgir)):
        shape = [int(v) for v in shape_text.split("x")]
        if reg_name not in layouts or shared_name not in layouts:
            continue
        key = (shape_text, dtype, *layouts[reg_name], *layouts[shared_name], str(arch),
               str(num_warps))
        if key not in _CONFLICTS:
            try:
                reg = _gluon_layout(*layouts[reg_name], shape)
                shared = _gluon_layout(*layouts[shared_name], shape)
            except AttributeError:  # a layout this Triton's Gluon lacks (3.6: linear)
                reg = shared = None
            for attempt in range(2):  # a failed probe compile is tried once more
                try:
                    _CONFLICTS[key] = (None if reg is None or shared is None else
                                       _probe_conflicts(reg, shared, shape, dtype, arch) + 1)
                    break
                except Exception:  # an older Triton without the counter: unknown, not zero
                    if attempt:  # unknown for this row only: the next row probes again
                        return None
        ways = _CONFLICTS[key]
        if ways is not None:
            worst = ways if worst is None else max(worst, ways)
    return worst


_SASS_INSTRUCTION = re.compile(
    r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.MULTILINE)


def _sass_program(sass: str) -> list[tuple[int, str, str, str]]:
    """``(address, predicate, opcode, operands)`` of each instruction of ``cuobjdump -sass``."""
    return [(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4))
            for m in _SASS_INSTRUCTION.finditer(sass)]


def _branch_target(operands: str) -> int | None:
    """The address a ``BRA`` jumps to (its last hexadecimal operand), if it names one."""
    targets = re.findall(r"0x([0-9a-f]+)", operands)
    return int(targets[-1], 16) if targets else None


def sass_of(cubin: bytes) -> str | None:
    """``cuobjdump -sass`` of ``cubin`` by the tool Triton bundles; None without it."""
    from triton.backends.nvidia import compiler as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout


def _successors(program: list[tuple[int, str, str, str]]) -> list[list[int]]:
    """Control-flow successors (indices) of each instruction: the next one unless it is an
    unconditional branch or exit, and a ``BRA``'s target."""
    index_at = {address: i for i, (address, *_rest) in enumerate(program)}
    successors: list[list[int]] = []
    for i, (_, predicate, opcode, operands) in enumerate(program):
        always = predicate in ("", "@PT") and not opcode.startswith("BRA.U")
        nxt: list[int] = []
        if opcode.startswith("BRA"):
            target = _branch_target(operands)
            if target is not None and target in index_at:
                nxt.append(index_at[target])
            if not always:
                nxt.append(i + 1)
        elif not (opcode.startswith(("EXIT", "RET")) and always):
            nxt.append(i + 1)
        successors.append([j for j in nxt if j < len(program)])
    return successors


def loop_bodies(program: list[tuple[int, str, str, str]]) -> list[set[int]]:
    """The instructions (indices) of each loop: for each backward branch ``B -> T`` from
    which ``T`` reaches ``B`` again, those on a path from ``T`` to ``B``. A backward jump
    that only returns from out-of-line code (a barrier wait placed after the function's
    exit, entered by a forward branch) is no loop."""
    successors = _successors(program)
    predecessors: list[list[int]] = [[] for _ in program]
    for i, nxt in enumerate(successors):
        for j in nxt:
            predecessors[j].append(i)

    def reach(start: int, edges: list[list[int]]) -> set[int]:
        seen, stack = {start}, [start]
        while stack:
            for j in edges[stack.pop()]:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    bodies = []
    for branch, nxt in enumerate(successors):
        for target in nxt:
            if target <= branch:
                body = reach(target, successors) & reach(branch, predecessors)
                if branch in body:
                    bodies.append(body)
    return bodies


def spill_instructions_in_loops(sass: str) -> int:
    """Local-memory instructions (``LDL``/``STL``: register spills) inside a loop
    (:func:`loop_bodies`). Spills outside loops (ptxas parking a few loop-invariant values
    across the main loop, stored once before it and loaded once after, per tile) cost a few
    instructions per tile; inside the main loop they cost on every step.

    Example:
        >>> sass = '''
        ...         /*0000*/                   STL [R1], R64 ;
        ...         /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        ...         /*0020*/                   LDL R64, [R1] ;
        ...         /*0030*/              @!P2 BRA 0x10 ;
        ...         /*0040*/              @!P3 BRA 0x70 ;
        ...         /*0050*/                   LDL R65, [R1] ;
        ...         /*0060*/                   EXIT ;
        ...         /*0070*/              @!P4 BRA 0x70 ;
        ...         /*0080*/                   BRA 0x50 ;
        ... '''
        >>> spill_instructions_in_loops(sass)  # 0x80 -> 0x50 returns from a wait: no loop
        1
    """
    program = _sass_program(sass)
    in_loops: set[int] = set().union(*loop_bodies(program))
    return sum(1 for i in in_loops if program[i][2].startswith(("LDL", "STL")))


def after_main_loop(program: list[tuple[int, str, str, str]],
                    after: tuple[str, ...] = ("HGMMA", "HMMA")
                    ) -> list[tuple[int, str, str, str]] | None:
    """The instructions after the main loop: after the last instruction whose opcode starts
    with ``after`` (the tensor-core pipeline's drain) or, when that instruction is in a
    loop, after the innermost loop's back branch (ptxas may place the loop after its exit).
    None when no instruction matches ``after``."""
    tensor_ops = [i for i, ins in enumerate(program) if ins[2].startswith(after)]
    if not tensor_ops:
        return None
    index_at = {address: i for i, (address, *_rest) in enumerate(program)}
    last = tensor_ops[-1]
    loops = []  # (first, back branch) of each loop around the last tensor-core instruction
    for i, (address, _, opcode, operands) in enumerate(program):
        target = _branch_target(operands) if opcode.startswith("BRA") else None
        first = index_at.get(target) if target is not None and target <= address else None
        if first is not None and first <= last <= i:
            loops.append((first, i))
    if loops:  # the innermost one is the main loop (TMA waits branch back from far away)
        last = min(loops, key=lambda loop: loop[1] - loop[0])[1]
    return program[last + 1:]


def global_loads_after_main_loop(sass: str) -> int | None:
    """Global loads (``LDG``, TMA ``UTMALDG``) after the main loop (:func:`after_main_loop`):
    a load there is waited for with nothing left to overlap it. The accumulating product
    whose output tile is read before its main loop has none. None without a tensor-core
    instruction.

    Example:
        >>> sass = '''
        ...         /*0000*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
        ...         /*0010*/                   BRA 0x0 ;
        ...         /*0020*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        ...         /*0030*/                   STG.E.128 desc[UR6][R2.64], R4 ;
        ...         /*0040*/                   EXIT ;
        ... '''
        >>> global_loads_after_main_loop(sass)
        1
    """
    region = after_main_loop(_sass_program(sass))
    if region is None:
        return None
    return sum(1 for _, _, opcode, _ in region if opcode.startswith(("LDG", "UTMALDG")))


def sass_path_lengths(sass: str, after: tuple[str, ...] = ("HGMMA", "HMMA")
                      ) -> tuple[int, int] | None:
    """Instructions (NOPs not counted) on the shortest and on the longest path through the
    code after the main loop, over the forward branches of ``cuobjdump -sass`` text (``BRA``
    to an address; a predicated ``BRA``/``EXIT`` may also fall through; loops back are not
    followed). The region starts after the last instruction whose opcode starts with
    ``after`` (the tensor-core pipeline's drain) or, when that instruction is in a loop,
    after the innermost loop's back branch (ptxas may place the loop after its exit). None
    when no instruction matches ``after``.

    Example:
        >>> sass = '''
        ...         /*0000*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
        ...         /*0010*/              @!P0 BRA 0x40 ;
        ...         /*0020*/                   FADD R1, R2, R3 ;
        ...         /*0030*/                   FADD R1, R2, R3 ;
        ...         /*0040*/                   STG.E [R4], R1 ;
        ...         /*0050*/                   EXIT ;
        ... '''
        >>> sass_path_lengths(sass)
        (3, 5)
        >>> looped = sass.replace("@!P0 BRA 0x40", "     BRA 0x0")  # the loop ends there
        >>> sass_path_lengths(looped)
        (4, 4)
    """
    region = after_main_loop(_sass_program(sass), after)
    if region is None:
        return None
    index_of = {address: i for i, (address, *_rest) in enumerate(region)}
    shortest = [0] * (len(region) + 1)  # past the end: no more instructions
    longest = [0] * (len(region) + 1)
    for i in range(len(region) - 1, -1, -1):
        _, predicate, opcode, operands = region[i]
        always = predicate in ("", "@PT")
        successors: list[int] = []
        if opcode.startswith(("EXIT", "RET")):
            ends = True
            if not always:
                successors.append(i + 1)
        elif opcode.startswith("BRA"):
            jump = _branch_target(operands)
            target = index_of.get(jump) if jump is not None else None
            if target is not None and target > i:
                successors.append(target)
            if not always:
                successors.append(i + 1)
            ends = not successors  # a loop back, or a jump out of the region
        else:
            ends = False
            successors.append(i + 1)
        own = 0 if opcode == "NOP" else 1
        shortest[i] = own + min([shortest[j] for j in successors] + ([0] if ends else []))
        longest[i] = own + max([longest[j] for j in successors] + ([0] if ends else []))
    return shortest[0], longest[0]


def epilogue_instructions_per_entry(sass: str, entries_per_thread: int
                                    ) -> tuple[float, float] | None:
    """SASS instructions after the main loop and the pipeline drain (the epilogue), per entry
    of the tile each thread holds, on the shortest and on the longest path
    (:func:`sass_path_lengths`): the joint kernel's tiles that do not meet the block
    diagonal take the short one, the few that do the long one. None without a tensor-core
    instruction."""
    lengths = sass_path_lengths(sass)
    if lengths is None:
        return None
    return (round(lengths[0] / entries_per_thread, 1),
            round(lengths[1] / entries_per_thread, 1))


_SETMAXNREG = re.compile(r"\bsetmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)")


def warp_specialization(ptx: str) -> tuple[bool, str | None]:
    """``(split, "producer/consumer registers")`` of ``ptx``: a warp-specialised kernel's
    partitions reallocate registers between warp groups with ``setmaxnreg``, the producer
    giving some up (``.dec``: the smallest count is the producer's) and the consumers taking
    more (``.inc``: the smallest count raised to is the consumers'; the default warp group
    also returns to the full count at its end). Triton emits ``setmaxnreg`` only for
    warp-specialised partitions, so both directions present means the split is there.

    Example:
        >>> ptx = '''setmaxnreg.dec.sync.aligned.u32 	40;
        ... setmaxnreg.dec.sync.aligned.u32 	120;
        ... setmaxnreg.inc.sync.aligned.u32 	232;
        ... setmaxnreg.inc.sync.aligned.u32 	256;'''
        >>> warp_specialization(ptx), warp_specialization("wgmma.mma_async.sync")
        ((True, '40/232'), (False, None))
    """
    counts: dict[str, list[int]] = {"inc": [], "dec": []}
    for direction, value in _SETMAXNREG.findall(ptx):
        counts[direction].append(int(value))
    if not (counts["inc"] and counts["dec"]):
        return False, None
    return True, f"{min(counts['dec'])}/{min(counts['inc'])}"


def _is_warp_specialized_variant(variant: str) -> bool:
    return "ws" in variant.split(",")


def scalar_global_stores(ptx: str) -> int:
    """``st.global`` instructions of one element (not ``.v2``/``.v4`` vectors) in ``ptx``.

    The softmax kernels store ``p`` with 16-byte vectors; their one scalar store is the
    invariance partial sum. A strided (transposed) store of one element per row shows up
    here as one scalar store per element.
    """
    qualifiers = re.findall(r"\bst\.global((?:\.[\w:]+)+)", ptx)
    return sum(1 for q in qualifiers if not re.search(r"\.v[248]\b", q))


def compile_spec(spec: KernelSpec, arch: int) -> AotRow:
    """Compile one job for ``sm_<arch>`` and collect the table row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = AotRow(spec.kernel, spec.variant, spec.config, arch, ok=False,
                 smem_limit=SMEM_LIMITS[arch], needs_tensor_cores=spec.needs_tensor_cores)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                        attrs=spec.attrs)
        # Triton's own `ptxas -v` log, when this Triton can print it (saves a second ptxas
        # run); a cached compile prints nothing and falls back to running ptxas below.
        with _ptxas_log_printed(), contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps,
                                               "num_stages": spec.num_stages})
    except Exception as err:  # every failure becomes a row, and exit status 1
        row.problems.append(f"compile failed: {type(err).__name__}: {str(err)[:300]}")
        row.seconds = time.perf_counter() - start
        return row
    ptx = compiled.asm["ptx"]
    sass = functools.cache(lambda: sass_of(compiled.asm["cubin"]))  # cuobjdump once, if asked
    row.shared_bytes = int(compiled.metadata.shared)
    row.tensor_core_instructions = tensor_core_instructions(ptx, arch)
    if spec.needs_tensor_cores:
        row.mma_shape = mma_shape(ptx, arch)
        row.async_copy_min_bytes, row.uses_tma = async_copy_widths(ptx)
        if row.uses_tma:
            row.async_copy_min_bytes = None
        row.smem_bank_conflicts = smem_bank_conflicts(compiled.asm["ttgir"], arch,
                                                      spec.num_warps)
        if spec.kernel == "grad_product" and "dp2" in spec.variant.split(","):
            text = sass()
            row.global_loads_after_loop = (None if text is None
                                           else global_loads_after_main_loop(text))
        row.warp_specialized, row.partition_registers = warp_specialization(ptx)
        # The epilogue's SASS path is read after the main loop's last tensor-core instruction:
        # a warp-specialised kernel lays its partitions' code out one after another, so
        # there is no single such path to measure.
        if spec.kernel == "joint_entropy" and not spec.constexprs.get("WARP_SPECIALIZE"):
            tile = spec.constexprs["BLOCK_A"] * spec.constexprs["BLOCK_B"]
            text = sass()
            per_entry = (None if text is None else epilogue_instructions_per_entry(
                text, tile // (32 * spec.num_warps)))
            if per_entry is not None:
                (row.epilogue_instructions_per_entry,
                 row.epilogue_instructions_per_entry_diagonal) = per_entry
    if spec.kernel.startswith("softmax_fwd"):
        row.scalar_global_stores = scalar_global_stores(ptx)
    if DUMP_DIR:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec.variant}-{spec.config}")
        with open(os.path.join(DUMP_DIR, f"{spec.kernel}-{label}-sm_{arch}.ptx"), "w") as fh:
            fh.write(ptx)
    stats = _parse_ptxas_log(log.getvalue())
    if stats[0] < 0:
        stats = _ptxas_stats(ptx, arch)
    row.registers, row.spill_stores, row.spill_loads = stats
    if row.spill_stores > 0 or row.spill_loads > 0:
        text = sass()
        row.spill_instructions_in_loops = (None if text is None
                                           else spill_instructions_in_loops(text))
    row.ok = True
    if row.shared_bytes > row.smem_limit:
        row.ok = False
        row.problems.append(f"shared memory {row.shared_bytes} > limit {row.smem_limit}")
    if spec.needs_tensor_cores and row.tensor_core_instructions == 0:
        row.ok = False
        row.problems.append("no tensor-core instruction in a tf32/bf16 product "
                            f"(/{tensor_core_pattern(arch)}/ on sm_{arch})")
    static = static_problems(row)
    if static:
        row.ok = False
        row.problems.extend(static)
    row.seconds = time.perf_counter() - start
    return row


#: Where ``--dump-dir`` keeps each compile's PTX (set by :func:`main`, read by workers).
DUMP_DIR: str | None = os.environ.get("MUSIC_LOSS_AOT_DUMP_DIR")


#: Spill bytes per thread a config may have outside its loops (see
#: :func:`spill_instructions_in_loops`): a few values parked across the main loop.
SPILL_BYTES_OUTSIDE_LOOPS = 64


def static_problems(row: AotRow) -> list[str]:
    """The static gate: no autotune config of any kernel may spill registers in a
    loop, nor more than :data:`SPILL_BYTES_OUTSIDE_LOOPS` outside (the configs are
    filtered so); a tf32/bf16 product on sm_90 must copy its operands with 16-byte
    ``cp.async`` or TMA and store them to shared memory with at most 2-way bank conflicts;
    the softmax forward may store nothing but its partial sum one element at a time."""
    problems = []
    if row.spill_stores > 0 or row.spill_loads > 0:
        spills = f"({row.spill_stores} bytes stored, {row.spill_loads} loaded)"
        if row.spill_instructions_in_loops is None:
            problems.append(f"register spills {spills}, not located (no cuobjdump)")
        elif row.spill_instructions_in_loops > 0:
            problems.append(f"register spills in a loop {spills}: "
                            f"{row.spill_instructions_in_loops} local-memory instructions")
        elif max(row.spill_stores, row.spill_loads) > SPILL_BYTES_OUTSIDE_LOOPS:
            problems.append(f"register spills {spills} over {SPILL_BYTES_OUTSIDE_LOOPS} bytes")
    if row.kernel == "softmax_fwd" and (row.scalar_global_stores or 0) > 1:
        problems.append(f"{row.scalar_global_stores} scalar global stores (p not vectorised)")
    problems.extend(_warp_specialization_problems(asdict(row)))
    if not (row.needs_tensor_cores and row.arch >= 90):
        return problems
    if not row.uses_tma and row.async_copy_min_bytes is not None \
            and row.async_copy_min_bytes < 16:
        problems.append(f"{row.async_copy_min_bytes}-byte async copies (< 16, no TMA)")
    if row.smem_bank_conflicts is not None and row.smem_bank_conflicts > 2:
        problems.append(f"{row.smem_bank_conflicts}-way shared-memory bank conflicts")
    return problems


def _warp_specialization_problems(row: dict[str, Any]) -> list[str]:
    """A warp-specialised (``ws``) row must show the producer/consumer split in its PTX and
    spill nothing (its partitions' registers are fixed by ``setmaxnreg``: a spill there is
    the split not fitting). Rows as dicts (a ``--json`` table's, or ``asdict`` of a row)."""
    if not _is_warp_specialized_variant(row["variant"]) or row.get("registers", -1) < 0:
        return []  # not a ws row, or not compiled (a failure reported as such)
    problems = []
    if not row.get("warp_specialized"):
        problems.append("no producer/consumer split in the PTX (no setmaxnreg inc/dec): "
                        "not warp specialised")
    if row.get("spill_stores", 0) > 0 or row.get("spill_loads", 0) > 0:
        problems.append(f"warp-specialised variant spills ({row['spill_stores']} bytes "
                        f"stored, {row['spill_loads']} loaded)")
    return problems


def _print_row(row: AotRow) -> None:
    status = "ok" if row.ok else "FAIL"
    copy = "TMA" if row.uses_tma else ("-" if row.async_copy_min_bytes is None
                                        else f"{row.async_copy_min_bytes}B")
    epilogue = ("-" if row.epilogue_instructions_per_entry is None
                else f"{row.epilogue_instructions_per_entry:.0f}/"
                     f"{row.epilogue_instructions_per_entry_diagonal:.0f}")
    scalar = "-" if row.scalar_global_stores is None else row.scalar_global_stores
    split = row.partition_registers or "-"
    print(f"{row.kernel:<14} {row.variant:<17} {row.config:<23} sm_{row.arch:<3} "
          f"{row.shared_bytes:>7} /{row.smem_limit:>7} {row.registers:>4} "
          f"{row.spill_stores:>5}/{row.spill_loads:<5} {row.tensor_core_instructions:>5} "
          f"{row.mma_shape or '-':<10} {copy:>5} {row.smem_bank_conflicts or '-':>4} "
          f"{epilogue:>5} {scalar:>4} {split:>6} "
          f"{status:<4} {'; '.join(row.problems)}", flush=True)


def policy_gaps(arch: int) -> list[AotRow]:
    """A failing row for each precision the policy runs on Triton on ``sm_<arch>`` whose
    joint kernel or gradient products have no config that fits the arch's shared memory."""
    from music_loss.kernels import configs as cf

    rows = []
    for name, kernel, configs in (("joint_entropy", "joint kernel", cf.JOINT_CONFIGS),
                                  ("grad_product", "gradient products", cf.MATMUL_CONFIGS)):
        for precision, picked in arch_configs(configs, arch).items():
            if not picked:
                rows.append(AotRow(name, precision, "-", arch, ok=False,
                                   smem_limit=SMEM_LIMITS[arch], problems=[
                                       f"the policy runs {precision} on Triton on sm_{arch} but "
                                       f"no {kernel} config fits {SMEM_LIMITS[arch]} bytes"]))
    return rows


def _compile_job(job: tuple[int, int, bool]) -> AotRow:
    """Worker entry point: rebuild the job list (kernels do not pickle), compile one."""
    index, arch, quick = job
    return compile_spec(kernel_specs(quick, arch)[index], arch)


def run(archs: list[int], quick: bool = False, jobs: int = 1) -> list[AotRow]:
    """Compile every job for every arch (``jobs`` processes), printing rows in order."""
    work = [(index, arch, quick) for arch in archs
            for index in range(len(kernel_specs(quick, arch)))]
    gaps = [row for arch in archs for row in policy_gaps(arch)]
    print(f"{'kernel':<14} {'variant':<17} {'config':<23} {'arch':<6} "
          f"{'smem':>7} /{'limit':>7} {'regs':>4} {'spill st/ld':<11} {'tc':>5} "
          f"{'mma':<10} {'copy':>5} {'bank':>4} {'epi/e':>5} {'st1':>4} {'ws p/c':>6} status",
          flush=True)
    rows: list[AotRow] = []
    for row in gaps:
        _print_row(row)
        rows.append(row)
    if jobs <= 1:
        for job in work:
            rows.append(_compile_job(job))
            _print_row(rows[-1])
        return rows
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(_compile_job, work):
            _print_row(row)
            rows.append(row)
    return rows


def summarize(rows: list[AotRow]) -> str:
    """Per-arch summary lines: compiles, failures, max shared memory, spills, TC coverage."""
    lines = []
    for arch in sorted({r.arch for r in rows}):
        sub = [r for r in rows if r.arch == arch]
        ok = [r for r in sub if r.ok]
        spilled = [r for r in sub if r.spill_stores > 0]
        in_loops = [r for r in spilled if r.spill_instructions_in_loops != 0]
        tc = [r for r in sub if r.needs_tensor_cores]
        lines.append(
            f"sm_{arch}: {len(ok)}/{len(sub)} ok; max shared {max(r.shared_bytes for r in sub)} B "
            f"(limit {SMEM_LIMITS[arch]}); max registers {max(r.registers for r in sub)}; "
            f"configs with spills: {len(spilled)} ({len(in_loops)} in a loop)"
            + (f": {', '.join(sorted({f'{r.kernel} {r.variant} {r.config}' for r in spilled}))}"
               if spilled else "")
            + f"; tf32/bf16 products with tensor-core instructions: "
              f"{sum(r.tensor_core_instructions > 0 for r in tc)}/{len(tc)}")
    return "\n".join(lines)


def static_summary(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, str]]:
    """The static facts per (kernel, variant, arch) over all its configs: narrowest copy (or
    TMA), worst bank conflicts, widest mma, the epilogue's SASS per entry (range), scalar
    global stores (softmax kernels). Rows as :func:`main`'s ``--json`` writes them."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row["needs_tensor_cores"] or row["kernel"].startswith("softmax_fwd"):
            groups.setdefault((row["kernel"], row["variant"], row["arch"]), []).append(row)
    summary = {}
    for key, group in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        copies = [r["async_copy_min_bytes"] for r in group if r["async_copy_min_bytes"]]
        ways = [r["smem_bank_conflicts"] for r in group if r["smem_bank_conflicts"]]
        shapes = [r["mma_shape"] for r in group if r["mma_shape"]]
        epi = [r["epilogue_instructions_per_entry"] for r in group
               if r["epilogue_instructions_per_entry"] is not None]
        epi_diagonal = [r["epilogue_instructions_per_entry_diagonal"] for r in group
                        if r.get("epilogue_instructions_per_entry_diagonal") is not None]
        stores = [r["scalar_global_stores"] for r in group
                  if r.get("scalar_global_stores") is not None]
        late_loads = [r["global_loads_after_loop"] for r in group
                      if r.get("global_loads_after_loop") is not None]
        tma = all(r["uses_tma"] for r in group)
        summary[key] = {
            "configs": str(len(group)),
            "copy": "TMA" if tma else (f"{min(copies)} B" if copies else "-"),
            "bank conflicts": f"{max(ways)}-way" if ways else "-",
            "widest mma": max(shapes, key=lambda m: int(re.findall(r"\d+", m)[1]))
            if shapes else "-",
            "epilogue SASS/entry": _value_range(epi),
            "diagonal tiles": _value_range(epi_diagonal),
            "scalar stores": str(max(stores)) if stores else "-",
            "loads after loop": str(max(late_loads)) if late_loads else "-",
        }
    return summary


def _value_range(values: list[float]) -> str:
    """``"lo-hi"`` of ``values`` rounded to integers (one number when equal), or ``"-"``."""
    if not values:
        return "-"
    return "-".join(dict.fromkeys((f"{min(values):.0f}", f"{max(values):.0f}")))


def compare_markdown(tables: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """A markdown table of :func:`static_summary` for several ``--json`` tables side by side
    (``old -> new`` per fact; rows only one table has show ``-`` for the others)."""
    summaries = [(label, static_summary(rows)) for label, rows in tables]
    keys = sorted({k for _, summary in summaries for k in summary},
                  key=lambda k: (-k[2], k[0], k[1]))
    facts = ["copy", "bank conflicts", "widest mma", "epilogue SASS/entry", "diagonal tiles",
             "scalar stores", "loads after loop"]
    labels = " -> ".join(label for label, _ in summaries)
    lines = [f"Static facts per kernel/variant/arch over its configs ({labels}).", "",
             "| kernel | variant | arch | " + " | ".join(facts) + " |",
             "|---|---|---|" + "---|" * len(facts)]
    for key in keys:
        cells = []
        for fact in facts:
            values = [summary.get(key, {}).get(fact, "-") for _, summary in summaries]
            cells.append(" -> ".join(values) if len(set(values)) > 1 else values[0])
        lines.append(f"| {key[0]} | {key[1]} | sm_{key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _instruction_name(arch: int) -> str:
    """``"mma.sync"``, ``"wgmma"`` or ``"tcgen05.mma"``: the tensor-core instruction of
    ``sm_<arch>`` as the table names it."""
    pattern = tensor_core_pattern(arch)
    return next(name for name in ("tcgen05.mma", "wgmma", "mma.sync")
                if name.split(".")[0] in pattern)


def arch_mode_markdown(tables: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """A markdown table per architecture and mode of ``--json`` tables (one block of rows per
    table): compiles, the tensor-core products with the arch's instruction and the widest
    shape, configs with spills (in a loop), the largest shared memory against the limit.
    Modes: the joint kernel and products per precision (``ieee``, ``tf32``, ``bf16``), and
    the elementwise kernels (softmax, backward); architectures the policy runs nothing on
    Triton on show as such."""
    lines = ["| Triton | arch | mode | compiles ok | tensor-core products | widest mma | "
             "spills (in a loop) | max shared / limit |", "|---|---|---|---|---|---|---|---|"]
    for label, rows in tables:
        for arch in sorted({r["arch"] for r in rows} | {a for a in ARCHS
                                                        if not triton_precisions(a)}):
            sub = [r for r in rows if r["arch"] == arch]
            if not sub:
                lines.append(f"| {label} | sm_{arch} | all | - (the policy runs the torch "
                             "backend only: nothing to compile) | - | - | - | - |")
                continue
            modes: dict[str, list[dict[str, Any]]] = {}
            for r in sub:
                mode = (r["variant"].split(",")[0] if r["kernel"] in ("joint_entropy",
                                                                      "grad_product")
                        else "elementwise")
                modes.setdefault(mode, []).append(r)
            for mode in [m for m in ("ieee", "tf32", "bf16", "elementwise") if m in modes]:
                group = modes[mode]
                tc = [r for r in group if r["needs_tensor_cores"]]
                with_tc = sum(r["tensor_core_instructions"] > 0 for r in tc)
                shapes = [r["mma_shape"] for r in tc if r["mma_shape"]]
                widest = max(shapes, key=lambda m: math.prod(
                    int(v) for v in re.findall(r"\d+", m)[:2])) if shapes else "-"
                spilled = [r for r in group if r["spill_stores"] > 0 or r["spill_loads"] > 0]
                in_loops = [r for r in spilled if r["spill_instructions_in_loops"] != 0]
                shared = max(r["shared_bytes"] for r in group)
                lines.append(
                    f"| {label} | sm_{arch} | {mode} | {sum(r['ok'] for r in group)}/"
                    f"{len(group)} | "
                    + (f"{with_tc}/{len(tc)} {_instruction_name(arch)}" if tc else "- (FMA)")
                    + f" | {widest} | {len(spilled)} ({len(in_loops)}) | "
                    + (f"{shared} B" if shared < 1024 else f"{shared / 1024:.0f} KiB")
                    + f" / {group[0]['smem_limit'] / 1024:.0f} KiB |")
    return "\n".join(lines) + "\n"

#: Where the committed tables live (``aot-static-<date>-triton<major>.<minor>.json``).
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: Allowed growth before the gate calls it a regression: epilogue SASS per entry (either
#: path) and registers per thread.
EPILOGUE_SLACK = 1.0
REGISTER_SLACK = 8


def default_baseline(results_dir: str = RESULTS_DIR, version: str | None = None) -> str | None:
    """The newest committed table for this Triton's ``major.minor`` (``version``, default
    the running one), by the date in its name: ``aot-static-<date>-triton<M>.<m>.json``.
    None when there is none (a new Triton: every row is then new).

    Example:
        >>> default_baseline("/nonexistent") is None
        True
    """
    if version is None:
        import triton

        version = ".".join(triton.__version__.split(".")[:2])
    pattern = re.compile(r"aot-static-(\d{4}-\d{2}-\d{2})-triton" + re.escape(version)
                         + r"\.json$")
    try:
        names = [n for n in os.listdir(results_dir) if pattern.match(n)]
    except FileNotFoundError:
        return None
    return os.path.join(results_dir, max(names)) if names else None


def _mma_width(shape: str | None) -> tuple[int, int]:
    """``(M, N)`` of an mma shape like ``m64n128k8``; ``(0, 0)`` for none."""
    if not shape:
        return 0, 0
    m, n = re.findall(r"[mn](\d+)", shape)[:2]
    return int(m), int(n)


def gate_regressions(rows: list[dict[str, Any]], baseline: list[dict[str, Any]]
                     ) -> tuple[list[str], list[str]]:
    """Compare compiled rows with a committed table, per (kernel, variant, config, arch).

    A regression: epilogue SASS per entry up by more than :data:`EPILOGUE_SLACK` (off- or
    on-diagonal path), a narrower mma shape (or none where there was one), registers up by
    more than :data:`REGISTER_SLACK`, more spill instructions inside loops, a narrower
    ``cp.async`` copy (or pointer copies where there was TMA), more bank-conflict ways, more
    global loads after the main loop (the accumulating product's output tile), or a
    compile that now fails. A warp-specialised (``ws``) row fails, new or not, without the
    producer/consumer split in its PTX or with a spill. Other rows the table lacks are new
    and pass.

    Returns:
        ``(regressions, new rows)``, one line each.

    Example:
        >>> old = [{"kernel": "k", "variant": "bf16", "config": "c", "arch": 90,
        ...         "ok": True, "registers": 160, "epilogue_instructions_per_entry": 14.0}]
        >>> new = [dict(old[0], registers=170, epilogue_instructions_per_entry=15.0)]
        >>> gate_regressions(new, old)[0]
        ['k bf16 c sm_90: registers 160 -> 170 (> +8)']
    """
    table = {(r["kernel"], r["variant"], r["config"], r["arch"]): r for r in baseline}
    regressions: list[str] = []
    new: list[str] = []
    for row in rows:
        key = (row["kernel"], row["variant"], row["config"], row["arch"])
        name = f"{key[0]} {key[1]} {key[2]} sm_{key[3]}"
        old = table.get(key)
        # A warp-specialised row must show its split and spill nothing, new or not.
        found: list[str] = _warp_specialization_problems(row)
        if old is None:
            new.append(name)
            regressions.extend(f"{name}: {item}" for item in found)
            continue
        if old.get("ok") and not row.get("ok"):
            found.append("now fails: " + "; ".join(row.get("problems", [])))
        for fact, label in (("epilogue_instructions_per_entry", "epilogue SASS/entry"),
                            ("epilogue_instructions_per_entry_diagonal",
                             "epilogue SASS/entry (diagonal tiles)")):
            before, after = old.get(fact), row.get(fact)
            if before is not None and (after is None or after > before + EPILOGUE_SLACK):
                found.append(f"{label} {before} -> {after} (> +{EPILOGUE_SLACK:g})")
        if old.get("mma_shape") and any(
                after < before for after, before in zip(_mma_width(row.get("mma_shape")),
                                                        _mma_width(old["mma_shape"]))):
            found.append(f"mma {old['mma_shape']} -> {row.get('mma_shape')} (narrower)")
        before, after = old.get("registers", -1), row.get("registers", -1)
        if before >= 0 and after > before + REGISTER_SLACK:
            found.append(f"registers {before} -> {after} (> +{REGISTER_SLACK})")
        before, after = old.get("spill_instructions_in_loops") or 0, \
            row.get("spill_instructions_in_loops") or 0
        if after > before:
            found.append(f"spill instructions in loops {before} -> {after}")
        before, after = old.get("global_loads_after_loop"), row.get("global_loads_after_loop")
        if before is not None and (after is None or after > before):
            found.append(f"global loads after the main loop {before} -> {after}")
        if old.get("uses_tma") and not row.get("uses_tma"):
            found.append("TMA copies -> cp.async")
        before, after = old.get("async_copy_min_bytes"), row.get("async_copy_min_bytes")
        if before is not None and after is not None and after < before:
            found.append(f"narrowest cp.async {before} -> {after} bytes")
        before, after = old.get("smem_bank_conflicts"), row.get("smem_bank_conflicts")
        if before is not None and (after is None or after > before):
            found.append(f"bank conflicts {before}-way -> "
                         + (f"{after}-way" if after is not None else "not counted"))
        regressions.extend(f"{name}: {item}" for item in found)
    return regressions, new


def check_against_baseline(rows: list[dict[str, Any]], baseline_path: str | None) -> int:
    """Print the gate's verdict for ``rows`` against the table at ``baseline_path`` (None:
    nothing to compare, every row new); returns the number of regressions."""
    if baseline_path is None:
        print(f"gate: no committed table for this Triton in {RESULTS_DIR}: "
              f"{len(rows)} rows new, nothing compared")
        return 0
    with open(baseline_path) as fh:
        baseline = json.load(fh)
    regressions, new = gate_regressions(rows, baseline)
    compared = len(rows) - len(new)
    print(f"gate against {os.path.basename(baseline_path)}: {compared} rows compared, "
          f"{len(new)} new, {len(regressions)} regressions")
    for line in new:
        print(f"  new: {line}")
    for line in regressions:
        print(f"  REGRESSION: {line}")
    return len(regressions)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        choices=sorted(SMEM_LIMITS),
                        help="compute capabilities (default: " + " ".join(map(str, ARCHS))
                        + "); one the policy runs nothing on Triton on compiles nothing")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="first two configs of each product and mode, K=80 only")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compile processes (default: min(4, CPUs))")
    parser.add_argument("--dump-dir", default=None,
                        help="keep each compile's PTX as <kernel>-<variant>-<config>-sm_<arch>.ptx")
    parser.add_argument("--arch-table", nargs="+", metavar="LABEL=JSON", default=None,
                        help="print the markdown arch x mode table of earlier --json tables "
                             "and exit; compiles nothing")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=JSON", default=None,
                        help="print a markdown table of the static facts of earlier --json "
                             "tables side by side (old -> new) and exit; compiles nothing")
    parser.add_argument("--baseline", default=None, metavar="JSON",
                        help="committed table to gate against (default: the newest "
                             "results/aot-static-<date>-triton<M>.<m>.json for this Triton)")
    parser.add_argument("--no-gate", action="store_true",
                        help="compare with no committed table (e.g. to write a new one)")
    parser.add_argument("--check", default=None, metavar="JSON",
                        help="gate the rows of an earlier --json table against the baseline "
                             "and exit; compiles nothing")
    args = parser.parse_args(argv)
    baseline = None if args.no_gate else (args.baseline or default_baseline())
    if args.check:
        with open(args.check) as fh:
            return 1 if check_against_baseline(json.load(fh), baseline) else 0
    if args.compare or args.arch_table:
        tables = []
        for item in args.compare or args.arch_table:
            label, _, path = item.rpartition("=")
            with open(path) as fh:
                tables.append((label or os.path.basename(path), json.load(fh)))
        print(compare_markdown(tables) if args.compare else arch_mode_markdown(tables), end="")
        return 0
    if args.dump_dir:
        os.makedirs(args.dump_dir, exist_ok=True)
        os.environ["MUSIC_LOSS_AOT_DUMP_DIR"] = os.path.abspath(args.dump_dir)
        global DUMP_DIR
        DUMP_DIR = os.environ["MUSIC_LOSS_AOT_DUMP_DIR"]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET (triton.compile cannot compile interpreted "
              "functions)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows = run(args.arch, args.quick, args.jobs)
    for arch in args.arch:
        if not triton_precisions(arch):
            card = _gpu_policy.card_for_capability(capability_of(arch))
            print(f"sm_{arch}: nothing to compile: the GPU policy runs the torch backend only "
                  f"there ({_gpu_policy.plan(card, 'float32', 'high', False).reason})")
    print(summarize(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows)} compiles in {time.perf_counter() - start:.1f} s; {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    regressions = 0 if args.no_gate else check_against_baseline([asdict(r) for r in rows],
                                                                baseline)
    return 1 if failed or regressions else 0


if __name__ == "__main__":
    sys.exit(main())
