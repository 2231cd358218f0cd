"""Shared pieces of the ImageNet example: data, augmentations, model, distributed, checkpoints.

Design points that make runs reproducible however the global batch is split:

* every sample's two views are drawn from a generator seeded by ``(seed, epoch, index)``
  (:func:`sample_seed`), so a sample looks the same on any rank, in any worker;
* :class:`GlobalBatchSampler` cuts each epoch's seeded permutation into global batches and gives
  rank ``r`` the ``r``-th contiguous slice, so the gathered batch (rank order) is the batch a
  single process would see;
* ``--norm group`` swaps BatchNorm for GroupNorm (per-sample statistics) where SyncBatchNorm
  cannot run (CPU): BatchNorm statistics depend on how the batch is split.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = tuple(torchvision.datasets.folder.IMG_EXTENSIONS)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
NORMS = ("batch", "group")


# ---------------------------------------------------------------------------------------
# Dataset checks: fail with a clear message before any process group or GPU is touched.
# ---------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """A missing or malformed ImageFolder dataset."""


_LAYOUT = "expected the ImageNet layout DIR/{split}/<class>/<image>.JPEG"


def _has_image(folder: Path) -> bool:
    for _root, _dirs, files in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return True
    return False


def check_image_folder(data: str | Path, split: str) -> Path:
    """Check that ``data/split`` is an ImageFolder (class folders holding images).

    Args:
        data: The dataset root given with ``--data``.
        split: ``"train"`` or ``"val"``.

    Returns:
        The path ``data/split``.

    Raises:
        DatasetError: naming what is missing and the expected layout.

    Example:
        >>> check_image_folder("/no/such/dir", "train")
        Traceback (most recent call last):
        ...
        imagenet_common.DatasetError: --data /no/such/dir does not exist; expected the ImageNet layout DIR/train/<class>/<image>.JPEG, or pass --synthetic
    """  # noqa: E501
    root = Path(data)
    layout = _LAYOUT.format(split=split)
    if not root.exists():
        raise DatasetError(f"--data {root} does not exist; {layout}, or pass --synthetic")
    if not root.is_dir():
        raise DatasetError(f"--data {root} is not a directory; {layout}")
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"--data {root} has no '{split}' folder; {layout}")
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{folder} has no class sub-folders; {layout}")
    empty = [c.name for c in classes if not _has_image(c)]
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class folder(s) of {folder} hold no image files "
                           f"({', '.join(IMAGE_EXTENSIONS[:4])} ...): {shown}; {layout}")
    return folder


# ---------------------------------------------------------------------------------------
# Images: generated ones (--synthetic, check_parity) and the two-view augmentation.
# ---------------------------------------------------------------------------------------
def synthetic_image(index: int, size: int, seed: int = 0) -> Image.Image:
    """A deterministic smooth random RGB image: 8x8 noise upsampled to ``size`` (no network).

    Example:
        >>> synthetic_image(3, 32).size
        (32, 32)
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    low = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(low.numpy()).resize((size, size), Image.Resampling.BILINEAR)


class SyntheticImages(Dataset):
    """``length`` generated PIL images with labels ``index % num_classes`` (``--synthetic``).

    Example:
        >>> image, label = SyntheticImages(10, size=32, num_classes=4)[5]
        >>> image.size, label
        ((32, 32), 1)
    """

    def __init__(self, length: int, size: int = 256, num_classes: int = 1000,
                 seed: int = 0) -> None:
        self.length, self.size, self.num_classes, self.seed = length, size, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return synthetic_image(index, self.size, self.seed), index % self.num_classes


def write_image_folder(root: str | Path, num_classes: int, per_class: int, size: int,
                       seed: int = 0) -> Path:
    """Write generated JPEGs as ``root/<class>/<i>.JPEG`` (an ImageFolder) and return root.

    Example:
        >>> import tempfile
        >>> root = write_image_folder(tempfile.mkdtemp(), num_classes=2, per_class=2, size=16)
        >>> len(list(root.glob("*/*.JPEG")))
        4
    """
    root = Path(root)
    for c in range(num_classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            index = c * per_class + i
            synthetic_image(index, size, seed).save(root / f"class_{c:03d}" / f"{index}.JPEG",
                                                    quality=90)
    return root


class GaussianBlur:
    """PIL Gaussian blur with probability ``p`` and radius ~ U(0.1, 2.0) (VICReg, Barlow Twins).

    Draws from torch's global generator, so a per-sample seed fixes it.
    """

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if float(torch.rand(())) < self.p:
            sigma = float(torch.empty(()).uniform_(0.1, 2.0))
            return image.filter(ImageFilter.GaussianBlur(radius=sigma))
        return image


class Solarization:
    """PIL solarisation (threshold 128) with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if float(torch.rand(())) < self.p else image


def view_transform(image_size: int, blur_p: float, solarize_p: float) -> Callable[..., Tensor]:
    """One branch of the VICReg / Barlow Twins augmentation (paper section 3).

    Random resized crop (bicubic), flip, colour jitter 0.4/0.4/0.2/0.1 at p 0.8, grayscale
    at p 0.2, Gaussian blur at ``blur_p``, solarisation at ``solarize_p``, ImageNet normalisation.

    Example:
        >>> view_transform(32, 1.0, 0.0)(synthetic_image(0, 48)).shape
        torch.Size([3, 32, 32])
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        GaussianBlur(blur_p),
        Solarization(solarize_p),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentations: a hash of ``(seed, epoch, index)``.

    Example:
        >>> sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(0, 2, 2)
        True
    """
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


class TwoViewDataset(Dataset):
    """Two asymmetric views of each image, seeded per sample (keys are ``(index, epoch)``).

    Example:
        >>> data = TwoViewDataset(SyntheticImages(4, size=40), image_size=32)
        >>> a1, a2 = data[(1, 0)]
        >>> b1, b2 = data[(1, 0)]
        >>> bool((a1 == b1).all()), bool((a1 == data[(1, 1)][0]).all())
        (True, False)
    """

    def __init__(self, images: Dataset, image_size: int = 224, seed: int = 0) -> None:
        self.images, self.seed = images, seed
        self.first = view_transform(image_size, blur_p=1.0, solarize_p=0.0)
        self.second = view_transform(image_size, blur_p=0.1, solarize_p=0.2)

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch = key
        image, _label = self.images[index]
        # A private generator state per sample: identical views however batches are split.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.first(image), self.second(image)


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """This rank's keys ``(index, epoch)``: contiguous slices of seeded global batches.

    Epoch ``e`` shuffles the dataset with seed ``(seed, e)``, drops the last partial global
    batch, and gives rank ``r`` the ``r``-th of ``world_size`` equal slices of every global
    batch. ``set_epoch(e, start_step)`` skips already-trained steps when resuming mid-epoch.

    Example:
        >>> s = GlobalBatchSampler(10, global_batch=4, rank=1, world_size=2, seed=0)
        >>> s.steps_per_epoch, len(list(s))
        (2, 4)
    """

    def __init__(self, length: int, global_batch: int, rank: int, world_size: int,
                 seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"--batch-size {global_batch} is not a multiple of the "
                             f"{world_size} processes; pass a multiple of {world_size}")
        if length < global_batch:
            raise ValueError(f"the dataset holds {length} images, fewer than one global batch "
                             f"of {global_batch}; lower --batch-size")
        self.length, self.global_batch, self.rank = length, global_batch, rank
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = length // global_batch
        self.seed, self.epoch, self.start_step = seed, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # A spawn key keeps the shuffling stream apart from the per-sample streams.
        words = np.random.SeedSequence([self.seed, self.epoch], spawn_key=(1,)).generate_state(2)
        generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
        order = torch.randperm(self.length, generator=generator).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            for index in order[start:start + self.local_batch]:
                yield index, self.epoch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch


# ---------------------------------------------------------------------------------------
# Model: torchvision ResNet encoder + MLP projector, BatchNorm or GroupNorm.
# ---------------------------------------------------------------------------------------
def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """``BatchNorm2d`` or ``GroupNorm`` (32 groups, fewer for narrow layers) factory."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"--norm must be one of {NORMS}, got {norm!r}")


def build_backbone(arch: str = "resnet50", norm: str = "batch") -> tuple[nn.Module, int]:
    """torchvision ResNet with ``weights=None`` (no download), ``fc`` removed, zero-init residual.

    Returns:
        The encoder and its output width (2048 for ResNet-50).

    Example:
        >>> net, width = build_backbone("resnet18", "group")
        >>> width
        512
    """
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True,
                                            norm_layer=norm_layer(norm))
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def parse_projector(spec: str) -> list[int]:
    """``"8192-8160"`` -> ``[8192, 8160]`` (hidden widths, then the embedding width D)."""
    try:
        sizes = [int(s) for s in spec.split("-")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--projector must be dash-separated positive widths such as "
                         f"'8192-8160', got {spec!r}")
    return sizes


def build_projector(in_dim: int, spec: str, norm: str = "batch") -> nn.Sequential:
    """Linear -> norm -> ReLU per hidden layer, then a bias-free Linear (paper: 8192-8160).

    Example:
        >>> build_projector(512, "64-48")(torch.randn(4, 512)).shape
        torch.Size([4, 48])
    """
    sizes = [in_dim, *parse_projector(spec)]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        normalise = nn.BatchNorm1d(b) if norm == "batch" else nn.GroupNorm(math.gcd(32, b), b)
        layers += [nn.Linear(a, b), normalise, nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class TwinEncoder(nn.Module):
    """Backbone + projector applied to both views in one ``forward`` (one DDP forward per step).

    Each view is normalised on its own, as in the VICReg and Barlow Twins code.
    """

    def __init__(self, arch: str, projector: str, norm: str) -> None:
        super().__init__()
        self.backbone, self.width = build_backbone(arch, norm)
        self.projector = build_projector(self.width, projector, norm)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


def build_twin(arch: str, projector: str, norm: str, seed: int) -> TwinEncoder:
    """The initial model of a run: the same weights for the same ``seed`` on every rank.

    Example:
        >>> a, b = build_twin("resnet18", "64-40", "group", 0), build_twin("resnet18", "64-40", "group", 0)
        >>> all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        True
    """  # noqa: E501
    torch.manual_seed(seed)
    return TwinEncoder(arch, projector, norm)


# ---------------------------------------------------------------------------------------
# Distributed set-up (torchrun: NCCL on GPU, gloo on CPU).
# ---------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    """Where this process runs: rank, world size and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment; start NCCL (CUDA) or gloo (CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible; pass --device cpu")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if where.type == "cuda" else "gloo"
        device_id = where if where.type == "cuda" else None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend, device_id=device_id)
        else:
            # Under torchrun the ranks of a restarted group meet in the agent's store, which
            # still holds the dead group's addresses (seen with --standalone: the new ranks
            # dial the killed rank's port and time out): one key prefix per attempt.
            store, _, _ = next(dist.rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{restart}", store),
                                    rank=rank, world_size=world, device_id=device_id)
    return DistEnv(rank, world, local_rank, where)


def mean_over_ranks(values: Tensor) -> Tensor:
    """Average a tensor over ranks (a copy; identity in a single process)."""
    values = values.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


# ---------------------------------------------------------------------------------------
# Checkpoints and random state.
# ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator this process uses: torch CPU (and CUDA), numpy, Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 - the legacy global generator
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """The random state of every rank, in rank order (each rank resumes its own)."""
    mine = rng_state()
    if not env.distributed:
        return [mine]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------------------
# Checkpoint files: atomic saves, loads that never run pickled code, injected faults.
# ---------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely (or at all)."""


def _numpy_rng_globals() -> list[Any]:
    """What a pickled ``np.random.get_state()`` needs: an ndarray of uint32 and its dtype."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    names: list[Any] = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles the dtype's class
    if dtypes is not None:
        names.append(dtypes.UInt32DType)
    return names


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers, numbers and strings only.

    The example's files hold nothing else besides numpy's random state (a uint32 ndarray),
    which is allow-listed. Any other pickled object (a class, a function: code that a
    downloaded file could run when unpickled) is refused, naming the file.

    Raises:
        CheckpointError: the file holds objects outside the allow-list, or is not a
            checkpoint (truncated, not a torch file).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "ok.pt"
        >>> torch.save({"step": 3, "w": torch.ones(2)}, path)
        >>> load_checkpoint(path)["step"]
        3
    """
    import pickle

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:300]
        raise CheckpointError(
            f"{path} holds objects outside the checkpoint allow-list (tensors, containers, "
            f"numbers, strings, numpy random state), so it was not unpickled: loading it "
            f"could run code. Only load files you trust; re-save the weights as plain "
            f"tensors. Detail: {first}") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None


#: Test-only fault injection read by ``pretrain.py`` (``tests/test_imagenet_fault.py``):
#: ``kill-at-step:RANK:STEP`` SIGKILLs rank RANK right after its optimizer step STEP;
#: ``kill-in-save:STEP`` SIGKILLs rank 0 half-way through writing the checkpoint of step
#: STEP. Only on a job's first attempt (torchrun's TORCHELASTIC_RESTART_COUNT 0), so the
#: restarted job runs through.
FAULT_ENV = "MUSIC_EXAMPLE_FAULT"


def fault_due(point: str, step: int, rank: int = 0) -> bool:
    """Whether the injected fault of :data:`FAULT_ENV` fires here (``point``, ``step``)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    kind, *numbers = spec.split(":")
    try:
        values = [int(v) for v in numbers]
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill-at-step:RANK:STEP or "
                         "kill-in-save:STEP") from None
    if kind == "kill-at-step" and len(values) == 2:
        return point == "step" and values == [rank, step]
    if kind == "kill-in-save" and len(values) == 1:
        return point == "save" and values == [step] and rank == 0
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected kill-at-step:RANK:STEP or "
                     "kill-in-save:STEP")


def kill_self(why: str) -> None:
    """SIGKILL this process (an injected fault: no cleanup, no exception handlers)."""
    import signal
    import sys

    print(f"injected fault: {why}: SIGKILL pid {os.getpid()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class _DieHalfway:
    """A file wrapper that SIGKILLs the process after about half of ``total`` bytes."""

    def __init__(self, file: Any, total: int) -> None:
        self.file, self.left = file, total // 2

    def write(self, data: Any) -> int:
        if self.left <= 0:
            self.file.flush()
            os.fsync(self.file.fileno())
            kill_self(f"in the middle of writing {self.file.name}")
        self.left -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def save_atomic(obj: Any, path: Path, step: int | None = None) -> None:
    """``torch.save`` to a temporary name, flush to disk, then rename over ``path``.

    ``os.replace`` is atomic on POSIX: a crash at any moment leaves either the previous
    complete ``path`` or the new one, never half a file under that name (the half-written
    temporary is ignored by resume and overwritten by the next save).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        target: Any = f
        if step is not None and fault_due("save", step):
            import io

            size = io.BytesIO()
            torch.save(obj, size)
            target = _DieHalfway(f, size.tell())
        torch.save(obj, target)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
