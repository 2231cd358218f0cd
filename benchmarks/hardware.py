"""What the benchmark ran on, and the card's peak arithmetic rate for a precision.

The peak table holds DENSE rates (no 2:4 structured sparsity) from the vendors' datasheets:
NVIDIA prints the tensor-core rates "with sparsity" (marked *) and notes that dense is half;
the numbers below are that half. ``ieee`` fp32 runs on the FMA units, not the tensor cores,
so its entry is the plain fp32 rate. A card not in the table, and every CPU, gets ``None``
(the results file then holds ``fraction_of_peak: null``).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from typing import Any

import torch

# name fragment (matched case-insensitively against torch.cuda.get_device_name), most
# specific first -> {precision: dense TFLOP/s}
DENSE_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # H100 SXM5 datasheet: TF32 989*, BF16 1979*, FP32 67 (* = with sparsity).
    # H100 PCIe: TF32 756*, BF16 1513*, FP32 51. H100 NVL: TF32 835*, BF16 1671*, FP32 60.
    ("h100 pcie", {"tf32": 378.0, "bf16": 756.5, "ieee": 51.2}),
    ("h100 nvl", {"tf32": 417.5, "bf16": 835.5, "ieee": 60.0}),
    ("h100", {"tf32": 494.7, "bf16": 989.4, "ieee": 66.9}),
    # H200 SXM: the H100 SXM's rates. H200 NVL: the H100 NVL's.
    ("h200 nvl", {"tf32": 417.5, "bf16": 835.5, "ieee": 60.0}),
    ("h200", {"tf32": 494.7, "bf16": 989.4, "ieee": 66.9}),
    # A100 (SXM4 and PCIe): TF32 156 (312*), BF16 312 (624*), FP32 19.5.
    ("a100", {"tf32": 156.0, "bf16": 312.0, "ieee": 19.5}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a GPU for ``precision`` (``ieee``/``tf32``/``bf16``), else None.

    Example:
        >>> peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
        989.4
        >>> peak_tflops("cpu", "ieee") is None
        True
    """
    name = device_name.lower()
    for fragment, peaks in DENSE_PEAK_TFLOPS:
        if fragment in name:
            return peaks.get(precision)
    return None


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (or ``platform.processor()``), with core count."""
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores)"


def device_name(device: torch.device) -> str:
    """Human-readable name of the benchmarked device."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """File-name form of the device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``.

    Example:
        >>> device_slug(torch.device("cpu"))
        'cpu'
    """
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _git_sha() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (how busy a shared CPU was), where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def collect_meta(device: torch.device, suite: str) -> dict[str, Any]:
    """The ``meta`` block of a results file."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    import music_loss

    return {
        "device": device_name(device),
        "device_type": device.type,
        "driver": _nvidia_driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "music_loss": music_loss.__version__,
        "git_sha": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "suite": suite,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.run",
                             *sys.argv[1:]]),
    }
