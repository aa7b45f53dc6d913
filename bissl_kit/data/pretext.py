"""Pretext images at any scale: the streamed sets (STL10, CIFAR, ImageNet, a folder of images) and the
loader that feeds a run's batches from them in the run's seeded order.

A streamed set (:class:`StreamedImages`) holds no decoded image: item i is decoded (and resized: shorter
side to ``image_size``, centre crop) when asked for. Training batches come through
:class:`StepBatches`, a ``torch.utils.data.DataLoader`` whose workers decode and resize while the model
trains, in the order a step's indices give (drawn from the run's seeded generator per epoch, so a
resumed run starts its loader at the step it resumes from and sees the batches an uninterrupted run
would). The images arrive as uint8 batches; the augmentation is the kit's batched on-device one.
Fashion-MNIST (the embedded default) stays a tensor in memory and is sliced, as before.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .folders import image_folder, is_path
from .registry import DATASETS, PRETEXT_DATASETS, DataCorruptError, DataNotFoundError, data_roots

# names of the streamed pretext sets (a folder is given as its path): what each takes, spec §2
STREAMED_PRETEXT = {
    "stl10": "the 100,000 STL10 unlabeled images",
    "stl10+train": "the STL10 unlabeled and train images (105,000; the paper's ICLR pretext set, spec §2)",
    "cifar10": "the 50,000 CIFAR-10 train images",
    "cifar100": "the 50,000 CIFAR-100 train images",
    "imagenet": "the ImageNet train images, <root>/imagenet/train/<wnid>/*.JPEG (about 1.28M)",
}
STL10_SIDE = 96
IMAGENET_LAYOUT = "<root>/imagenet/train/<wnid>/<image>.JPEG  (the train folder of ILSVRC2012, one folder per class)"


def default_workers() -> int:
    """Loader workers when the config leaves it to the kit: the CPUs this process may use, up to 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


class STL10Binary(Dataset):
    """STL10's ``*_X.bin`` files read through a memory map (torchvision's reader loads the 2.8 GB of
    ``unlabeled_X.bin`` into memory): uint8 N×3×96×96 stored column-major, as torchvision reads them."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = [str(f) for f in files], size
        counts = []
        for f in files:
            n, rest = divmod(os.path.getsize(f), 3 * STL10_SIDE * STL10_SIDE)
            if rest or n == 0:
                raise DataCorruptError(f"stl10: {f} has {os.path.getsize(f)} bytes, not a whole number of 3×96×96 "
                                       "images (a truncated copy?)")
            counts.append(n)
        self.offsets = np.cumsum([0] + counts)
        self._maps = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):  # a worker opens its own maps
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._maps is None:
            self._maps = [np.memmap(f, np.uint8, "r").reshape(-1, 3, STL10_SIDE, STL10_SIDE) for f in self.files]
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image = torch.from_numpy(np.array(self._maps[k][i - self.offsets[k]])).transpose(1, 2)
        if self.size != STL10_SIDE:
            from torchvision.transforms.v2 import functional as F
            image = F.center_crop(F.resize(image, self.size, antialias=True), [self.size, self.size])
        return image


class ReaderImages(Dataset):
    """The images of a torchvision reader (its transform decodes and resizes), labels dropped."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.reader[i][0]


class StreamedImages:
    """A pretext set decoded on access: ``len``, ``shape`` (N, C, S, S), ``images[i]`` (one uint8 C×S×S
    image) and ``images[idx]`` for an index tensor (a uint8 batch, decoded by a pool of ``workers``
    threads: the BiSSL lower level's batches and the k-NN monitor's fixed images come this way).
    ``source`` is the torch Dataset the training loader's workers read."""

    def __init__(self, name: str, source: Dataset, size: int, identity: str, workers: int = 0):
        self.name, self.source, self.size, self.workers = name, source, size, workers
        self._identity = identity
        self._pool = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self.source[int(idx)]
        idx = torch.as_tensor(idx).reshape(-1).tolist()
        if self.workers > 1 and len(idx) > 1:  # PIL decodes and torchvision resizes without the GIL
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="bissl-decode")
            return torch.stack(list(self._pool.map(self.source.__getitem__, idx)))
        return torch.stack([self.source[i] for i in idx])

    def fingerprint(self) -> str:
        """The identity of the data a run resumes with: the set, its size and what its files are (names and
        byte sizes), not where they lie (a moved copy keeps it)."""
        return hashlib.blake2b(f"{self._identity}|{len(self)}|{self.size}".encode(), digest_size=12).hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"StreamedImages({self.name!r}, n={len(self)}, size={self.size})"


def _find(root, search, folder: str, what: str, layout: str) -> Path:
    roots = data_roots(root, search)
    for r in roots:
        if (r / folder).is_dir():
            return r
    raise DataNotFoundError(f"{what}: {folder} not found under any of: {', '.join(map(str, roots)) or '(none)'}. "
                            f"Put it here:\n  {layout}\nwith <root> = one of those directories, or pass root=<dir> / "
                            "set BISSL_DATA=<dir>.")


def _files_identity(kind: str, files) -> str:
    h = hashlib.blake2b(kind.encode(), digest_size=12)
    for name, size in files:
        h.update(f"{name}:{size};".encode())
    return h.hexdigest()


def open_streamed(name: str, *, root=None, image_size: int, search=None, download=True, workers: int = 0) -> StreamedImages:
    """One of :data:`STREAMED_PRETEXT`, or a folder of images given as a path."""
    if is_path(name):
        ds = image_folder(name, image_size)
        return StreamedImages(name, ds, image_size, _files_identity("folder", zip(ds.files.tolist(), ds.sizes().tolist())),
                              workers)
    if name in ("stl10", "stl10+train"):
        info = DATASETS["stl10"]
        base = _find(root, search, info.folder, name, info.layout) / info.folder
        files = [base / "unlabeled_X.bin"] + ([base / "train_X.bin"] if name == "stl10+train" else [])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataNotFoundError(f"{name}: {', '.join(missing)} not there. Expected layout:\n  {info.layout}")
        ident = _files_identity(name, [(f.name, os.path.getsize(f)) for f in files])
        return StreamedImages(name, STL10Binary(files, image_size), image_size, ident, workers)
    if name in ("cifar10", "cifar100"):
        from .readers import _open_paper  # torchvision's reader: 50k images of 32×32 are 150 MB in memory
        info = DATASETS[name]
        reader, _ = _open_paper(info, info.split_kwargs["train"], root, search, image_size, download)
        base = Path(reader.root) / info.folder
        ident = _files_identity(name, sorted((f.name, f.stat().st_size) for f in base.iterdir() if f.is_file()))
        return StreamedImages(name, ReaderImages(reader), image_size, ident, workers)
    if name == "imagenet":
        from torchvision.datasets import ImageFolder
        from .folders import square_rgb
        base = _find(root, search, "imagenet/train", name, IMAGENET_LAYOUT) / "imagenet" / "train"
        try:
            reader = ImageFolder(str(base), transform=square_rgb(image_size))
        except FileNotFoundError as e:  # no class folder, or no image in any
            raise DataNotFoundError(f"imagenet: {base} cannot be read ({e}). Expected layout:\n  {IMAGENET_LAYOUT}") from e
        rel = [os.path.relpath(p, base) for p, _ in reader.samples]
        reader.samples = reader.imgs = [(p, 0) for p, _ in reader.samples]  # labels unused
        reader.targets = []
        return StreamedImages(name, ReaderImages(reader), image_size, _files_identity(name, ((r, 0) for r in rel)),
                              workers)
    raise ValueError(f"unknown pretext dataset {name!r}")


# ---- the training loader ------------------------------------------------------------------------------

class StepSampler(Sampler):
    """The batches of steps ``start`` .. ``stop − 1``, each the index tensor ``indices_of(step)`` gives:
    a DataLoader ``batch_sampler`` that starts mid-epoch when a run resumes."""

    def __init__(self, indices_of: Callable[[int], torch.Tensor], start: int, stop: int):
        self.indices_of, self.start, self.stop = indices_of, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.indices_of(step).tolist()


class StepBatches:
    """The uint8 images of each training step: ``get(step)`` is ``images[indices_of(step)]``.

    For a tensor in memory it slices (the embedded path, unchanged). For a :class:`StreamedImages` it
    reads a DataLoader over the steps from ``step`` to ``stop``, ``workers`` processes decoding ahead
    (``prefetch_factor`` batches each), pinned when ``pin_memory``; a step out of sequence (a resume, a
    replayed step) restarts the loader there. The order is the caller's alone, so the batches do not
    depend on the number of workers."""

    def __init__(self, images, indices_of: Callable[[int], torch.Tensor], *, stop: int, workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int = 2):
        self.images, self.indices_of, self.stop = images, indices_of, stop
        self.workers, self.pin_memory, self.prefetch_factor = workers, pin_memory, prefetch_factor
        self._it, self._next = None, None

    @property
    def streamed(self) -> bool:
        return isinstance(self.images, StreamedImages)

    def get(self, step: int) -> torch.Tensor:
        if not self.streamed:
            return self.images[self.indices_of(step)]
        if self._it is None or step != self._next:
            self.close()
            loader = DataLoader(self.images.source, batch_sampler=StepSampler(self.indices_of, step, self.stop),
                                num_workers=self.workers, pin_memory=self.pin_memory,
                                prefetch_factor=self.prefetch_factor if self.workers else None)
            self._it = iter(loader)
        self._next = step + 1
        try:
            return next(self._it)
        except StopIteration:
            raise IndexError(f"step {step} is past the loader's last step {self.stop - 1}") from None

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def pretext_fingerprint(images) -> str:
    from .readers import fingerprint
    return images.fingerprint() if isinstance(images, StreamedImages) else fingerprint(images)


def check_pretext_name(field: str, value: str) -> None:
    """A config check: a known pretext set, or a folder path (with a separator: './mine')."""
    from ..config import ConfigError
    if value not in PRETEXT_DATASETS and not is_path(value):
        raise ConfigError(f"{field}={value!r} is not allowed; {field} must be one of {', '.join(PRETEXT_DATASETS)}, or the path "
                          f"of a folder of images (with a '/': './{value}' for a folder here)")
