"""Which backend and matmul precision run on which NVIDIA GPU, and the fallback to ``torch``.

The policy is data (:data:`CARDS`, :data:`TRITON_MIN_SMEM`) plus pure functions of a card's
compute capability and shared memory, so ``python -m music_loss.check --plan-for 7.5`` can
answer for a card that is not present. At run time the card's own properties are read once
per device and every choice is cached: nothing is recomputed per step.

The rules:

- Before sm_80 (V100 sm_70, T4 sm_75): no tf32 or bf16 tensor cores, and 64-96 KiB of
  shared memory per block. ``auto`` runs the ``torch`` backend (cuBLAS) with ``ieee``
  products: tf32 does not exist there (PyTorch's "high" matmul precision computes fp32),
  and bf16-rounded operands would cost accuracy for no speed. ``precision="tf32"`` and
  ``backend="triton"`` are errors that name the card.
- sm_80 and newer: the Triton kernels, in each precision whose autotune configs fit the
  card's shared memory per block (:data:`TRITON_MIN_SMEM`); a precision that fits none runs
  on the ``torch`` backend instead (cuBLAS, the same precision). Capabilities newer than
  :data:`CARDS` follow the same rule with their own shared memory.
- ROCm: the ``torch`` backend, until the kernels are tested there.
- With ``backend="auto"``, a Triton compile failure on the card (a compilation error,
  shared memory exceeded in every config, a ptxas error) falls back to ``torch`` with one
  warning naming the card and the error, remembered per device; ``backend="triton"``
  raises it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import torch

from music_loss._config import ResolvedPrecision

KIB = 1024

#: Shared memory per block (opt-in maximum, KiB) by compute capability, from the CUDA C++
#: Programming Guide's technical specifications (NVIDIA's CCCL ``arch_traits`` carries the
#: same numbers: the SM's shared memory less the 1 KiB the driver reserves per block from
#: sm_80 on). At run time the device's own ``shared_memory_per_block_optin`` is used.
SMEM_PER_BLOCK_KIB: dict[tuple[int, int], int] = {
    (7, 0): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163, (8, 9): 99,
    (9, 0): 227, (10, 0): 227, (10, 3): 227, (12, 0): 99,
}

#: The cards users train on, by capability (the docs' table has one row per entry).
CARDS: dict[tuple[int, int], str] = {
    (7, 0): "V100, Titan V",
    (7, 5): "T4, RTX 20xx, Quadro RTX",
    (8, 0): "A100, A30",
    (8, 6): "A10, A40, RTX A6000, RTX 30xx",
    (8, 7): "Jetson AGX Orin",
    (8, 9): "L4, L40S, RTX 6000 Ada, RTX 40xx",
    (9, 0): "H100, H200, GH200",
    (10, 0): "B200, GB200",
    (10, 3): "B300, GB300",
    (12, 0): "RTX 5090, RTX PRO 6000 Blackwell",
}

#: Oldest capability the Triton kernels run on: tf32/bf16 tensor cores (``mma.sync``) and
#: asynchronous copies start at sm_80.
TRITON_MIN_CAPABILITY = (8, 0)

#: Shared memory per block (bytes) the smallest autotune config of each precision needs, in
#: the joint kernel and the gradient products, epilogue scratch included (the kernels'
#: ``configs_for`` model; a test keeps the two equal). fp32 operands (ieee, tf32) take
#: twice the staging of bf16; their 3-stage configs fit the ~99 KiB of sm_86/89/120.
TRITON_MIN_SMEM: dict[str, int] = {"ieee": 88 * KIB, "tf32": 88 * KIB, "bf16": 52 * KIB}

#: Input kinds of the table: dtype, PyTorch's float32 matmul precision, autocast.
DTYPES = ("float32", "float16", "bfloat16")
MATMUL_PRECISIONS = ("highest", "high", "medium")

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16",
                torch.bfloat16: "bfloat16", torch.float64: "float64"}


class Choice(NamedTuple):
    """What runs: ``backend`` (``"triton"`` or ``"torch"``), ``precision`` and why."""

    backend: str
    precision: str
    reason: str


@dataclass(frozen=True)
class Card:
    """A GPU as the policy sees it: name, compute capability and shared memory per block."""

    name: str
    capability: tuple[int, int]
    smem_per_block: int
    rocm: bool = False

    @property
    def label(self) -> str:
        """``"NVIDIA GeForce RTX 3090 (sm_86)"``: how errors and warnings name the card."""
        if self.rocm:
            return f"{self.name} (ROCm)"
        major, minor = self.capability
        return f"{self.name} (sm_{major}{minor})"


def parse_capability(text: str) -> tuple[int, int]:
    """``"7.5"``, ``"75"``, ``"sm_75"``, ``"12.0"`` or ``"120"`` -> ``(major, minor)``.

    Example:
        >>> parse_capability("7.5"), parse_capability("sm_120"), parse_capability("100")
        ((7, 5), (12, 0), (10, 0))
    """
    digits = text.strip().lower().removeprefix("sm_")
    try:
        if "." in digits:
            major, minor = (int(part) for part in digits.split("."))
        else:
            major, minor = int(digits[:-1]), int(digits[-1])
    except ValueError:
        raise ValueError(f"capability must look like '7.5', '75' or 'sm_75', got {text!r}"
                         ) from None
    if major < 1 or not 0 <= minor <= 9:
        raise ValueError(f"capability must look like '7.5', '75' or 'sm_75', got {text!r}")
    return major, minor


def card_for_capability(capability: tuple[int, int]) -> Card:
    """A card of this capability with the table's shared memory (the nearest older entry's
    for a capability the table does not list).

    Example:
        >>> card_for_capability((8, 6)).smem_per_block // 1024
        99
    """
    known = [cc for cc in SMEM_PER_BLOCK_KIB if cc <= capability] or [min(SMEM_PER_BLOCK_KIB)]
    name = CARDS.get(capability, f"a compute capability {capability[0]}.{capability[1]} GPU")
    return Card(name, capability, SMEM_PER_BLOCK_KIB[max(known)] * KIB)


def wanted_precision(dtype: str, matmul_precision: str, autocast: bool) -> str:
    """The precision ``auto`` asks for before the card has a say (PyTorch's own rules):
    16-bit inputs or autocast -> ``bf16``; float32 -> ``ieee`` at "highest", else ``tf32``.
    """
    if dtype == "float64":
        return "ieee"
    if dtype in ("float16", "bfloat16") or autocast:
        return "bf16"
    return "ieee" if matmul_precision == "highest" else "tf32"


def plan(card: Card, dtype: str, matmul_precision: str, autocast: bool) -> Choice:
    """What ``backend="auto"``, ``precision="auto"`` run for these inputs on ``card``.

    Example:
        >>> plan(card_for_capability((7, 5)), "float32", "high", False).backend
        'torch'
        >>> plan(card_for_capability((9, 0)), "float32", "high", False)[:2]
        ('triton', 'tf32')
    """
    want = wanted_precision(dtype, matmul_precision, autocast)
    if card.rocm:
        return Choice("torch", want, "ROCm: the Triton kernels are not yet tested there")
    if dtype == "float64":
        return Choice("torch", "ieee", "float64 inputs: the Triton kernels compute in float32")
    if card.capability < TRITON_MIN_CAPABILITY:
        why = ("no tf32/bf16 tensor cores before sm_80: cuBLAS fp32 products "
               "(bf16-rounded operands would lose accuracy for no speed)")
        return Choice("torch", "ieee", why)
    need = TRITON_MIN_SMEM[want]
    if card.smem_per_block < need:
        return Choice("torch", want,
                      f"no {want} Triton config fits {card.smem_per_block // KIB} KiB of "
                      f"shared memory per block (needs {need // KIB} KiB): cuBLAS")
    cores = "fp32 FMA units" if want == "ieee" else f"{want} tensor cores"
    return Choice("triton", want, f"fused Triton kernels on {cores}")


def check_explicit(card: Card, backend: str, precision: str, resolved: str) -> None:
    """Raise a ValueError naming the card and the alternative when an explicit
    ``backend="triton"`` or ``precision="tf32"`` cannot run on it (``resolved``: the
    precision the call will use)."""
    if precision == "tf32" and not card.rocm and card.capability < TRITON_MIN_CAPABILITY:
        raise ValueError(f"precision='tf32' needs tf32 tensor cores (sm_80 or newer); "
                         f"{card.label} has none: use precision='ieee' (the same speed "
                         "there) or precision='auto'")
    if backend != "triton" or card.rocm:
        return
    if card.capability < TRITON_MIN_CAPABILITY:
        raise ValueError(f"backend='triton' needs sm_80 or newer (tf32/bf16 tensor cores); "
                         f"{card.label} is older: use backend='torch' (cuBLAS) or "
                         "backend='auto'")
    need = TRITON_MIN_SMEM[resolved]
    if card.smem_per_block < need:
        fits = [p for p, size in TRITON_MIN_SMEM.items() if size <= card.smem_per_block]
        raise ValueError(f"backend='triton' with precision {resolved!r} needs {need // KIB} KiB "
                         f"of shared memory per block; {card.label} has "
                         f"{card.smem_per_block // KIB} KiB: use backend='torch' or 'auto'"
                         + (f", or precision={fits[0]!r}" if fits else ""))


# --- the running process: card properties per device, cached choices, the fallback -------

_CARDS_SEEN: dict[int, Card] = {}
#: Devices (``"cuda:0"``) whose Triton compile failed under ``backend="auto"``: the error.
_FALLEN_BACK: dict[str, str] = {}


def device_card(index: int) -> Card:
    """The card at CUDA device ``index`` (read once per device; no host sync)."""
    card = _CARDS_SEEN.get(index)
    if card is None:
        props: Any = torch.cuda.get_device_properties(index)
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
        rocm = torch.version.hip is not None
        card = Card(str(props.name), (int(props.major), int(props.minor)),
                    smem or card_for_capability((props.major, props.minor)).smem_per_block, rocm)
        _CARDS_SEEN[index] = card
    return card


def clear_caches() -> None:
    """Forget the cards read, the cached choices and the remembered fallbacks (tests)."""
    _CARDS_SEEN.clear()
    _FALLEN_BACK.clear()
    _choose.cache_clear()


@functools.cache
def _choose(card: Card, dtype: str, matmul: str, autocast: bool, backend: str,
            precision: str, chosen: str, mode: str) -> str:
    if precision == "auto":
        picked = plan(card, dtype, matmul, autocast)
        mode = picked.precision
        if backend == "auto" and chosen == "triton":
            chosen = picked.backend
    check_explicit(card, backend, precision, mode)
    too_small = (card.capability < TRITON_MIN_CAPABILITY
                 or card.smem_per_block < TRITON_MIN_SMEM[mode])
    if backend == "auto" and chosen == "triton" and not card.rocm and too_small:
        chosen = "torch"
    return f"{chosen}:{mode}"


@torch.compiler.assume_constant_result
def card_choice(index: int, dtype: str, autocast: bool, backend: str, precision: str,
                chosen: str, mode: str) -> str:
    """``"backend:precision"`` on CUDA device ``index``, given what the device-blind rules
    picked (``chosen``, ``mode``). A constant for ``torch.compile`` (read at trace time)."""
    from music_loss._dispatch import float32_matmul_mode

    matmul = "highest" if float32_matmul_mode() == "ieee" else "high"
    return _choose(device_card(index), dtype, matmul, autocast, backend, precision, chosen, mode)


def resolve_for_card(device: torch.device, dtype: torch.dtype, backend: str, precision: str,
                     chosen: str, mode: str) -> tuple[str, ResolvedPrecision]:
    """Apply the card's rules to the device-blind choice ``(chosen, mode)`` of a CUDA tensor.

    Raises:
        ValueError: ``backend="triton"`` or ``precision="tf32"`` the card cannot run.
    """
    if chosen == "reference":
        return chosen, cast(ResolvedPrecision, mode)
    index = device.index if device.index is not None else torch.cuda.current_device()
    autocast = torch.is_autocast_enabled("cuda")
    picked = card_choice(index, _DTYPE_NAMES.get(dtype, "float32"), autocast, backend,
                         precision, chosen, mode)
    new_backend, new_mode = picked.split(":")
    return new_backend, cast(ResolvedPrecision, new_mode)


def has_tf32(device: torch.device) -> bool:
    """Whether cuBLAS can compute in tf32 on this CUDA device (sm_80 or newer; ROCm: no
    NVIDIA rule applies, assume it can)."""
    if device.type != "cuda" or torch.version.hip is not None:
        return device.type == "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return device_card(index).capability >= TRITON_MIN_CAPABILITY


def is_compile_failure(err: BaseException) -> bool:
    """A Triton compile failure on this card: a compilation error, shared memory (or another
    resource) exceeded, a ptxas error or a failed MLIR pass (some Triton versions raise a
    RuntimeError for those: Triton 3.6 for the joint kernel's tensor-core modes on sm_100)."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - no Triton: nothing of it can have failed
        return False
    from triton.runtime import errors

    ptxas_error: Any = getattr(errors, "PTXASError", OutOfResources)  # triton >= 3.2
    if isinstance(err, CompilationError | OutOfResources | ptxas_error):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("ptxas" in text or "passmanager::run failed" in text)


T = TypeVar("T")


def with_torch_fallback(device: torch.device, backend: str, run_triton: Callable[[], T],
                        run_torch: Callable[[], T]) -> T:
    """``run_triton()``; under ``backend="auto"``, a Triton compile failure runs
    ``run_torch()`` instead, with one warning per device, and later calls on that device
    go to ``torch`` directly. Compiled graphs (``torch.compile``) raise the failure."""
    if backend != "auto" or torch.compiler.is_compiling():
        return run_triton()
    key = _device_key(device)
    if key in _FALLEN_BACK:
        return run_torch()
    try:
        return run_triton()
    except Exception as err:
        if not is_compile_failure(err):
            raise
        _FALLEN_BACK[key] = f"{type(err).__name__}: {err}"
        label = device_card(int(key.split(":")[1])).label if device.type == "cuda" else key
        warnings.warn(
            f"music_loss: the Triton kernels failed to compile on {label} "
            f"({_FALLEN_BACK[key]}); backend='auto' runs the 'torch' backend on this device "
            "from now on. Please report it with the output of "
            "`python -m music_loss.check --json check.json`.",
            RuntimeWarning, stacklevel=4)
        return run_torch()


def fallen_back(device: torch.device) -> str | None:
    """The Triton error that moved ``device`` to the ``torch`` backend, if any."""
    return _FALLEN_BACK.get(_device_key(device))


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)
