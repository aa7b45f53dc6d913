"""The :class:`Split` dataset every split is, the torchvision readers of the paper's datasets, and
the public loaders :func:`load_pretext` and :func:`load_downstream`."""

from __future__ import annotations

import hashlib
import os

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .fashion_mnist import _read_fashion_mnist, find_fashion_mnist
from .folders import square_rgb
from ..config import ConfigError
from .registry import (SPLITS, found_elsewhere, DataCorruptError, DataNotFoundError, DatasetInfo, PRETEXT_DATASETS, _info,
                       data_roots)
from .splits import _caltech_split, _carve, _digits_split, _take_per_class

MIN_IMAGE_SIZE = 8


def _check_image_size(image_size) -> int:
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE} (got {image_size!r})")
    return image_size


def fingerprint(*tensors: torch.Tensor, text: str = "") -> str:
    """A short hash of tensors' contents: the identity of the data a run resumes with (another file, root or
    version of a dataset gives another fingerprint; a moved one does not)."""
    h = hashlib.blake2b(text.encode(), digest_size=12)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(eq=False)
class Split(Dataset):
    """One split of a downstream dataset: a Dataset of (uint8 C×H×W image, int label).

    In memory (embedded datasets, or after :meth:`materialize`): ``images`` is uint8 N×C×H×W and
    batches are sliced from it. Lazy (paper datasets): item i is ``reader[indices[i]]``, decoded on
    access. ``labels`` (int64 N) is always there, so class counts need no decoding. ``indices`` are
    the items' positions in the source (the reader, sklearn's digits, or the official Fashion-MNIST
    train or t10k file), for provenance and disjointness checks.
    """
    name: str
    split: str
    labels: torch.Tensor
    num_classes: int
    images: torch.Tensor | None = None
    reader: Dataset | None = None
    indices: np.ndarray | None = None
    # multi-label sets (VOC07): labels are float N×num_classes multi-hot, and ``difficult`` (bool, same shape)
    # marks the classes an image holds only difficult objects of, which AP ignores
    difficult: torch.Tensor | None = None

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i], self._label(i)
        try:
            image, _ = self.reader[int(self.indices[i])]
        except OSError as e:  # PIL: a truncated or unreadable image file
            raise DataCorruptError(f"{self.name} ({self.split}) item {i}: cannot decode the image: {e}") from e
        return image, self._label(i)

    def _label(self, i):
        return self.labels[i] if self.multilabel else int(self.labels[i])

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def materialize(self) -> Split:
        """Decode every image once into memory (small sets: Flowers102 train is ~28 MB at 96 px)."""
        if self.in_memory:
            return self
        images = torch.stack([self[i][0] for i in range(len(self))])
        return Split(self.name, self.split, self.labels, self.num_classes, images=images, indices=self.indices,
                     difficult=self.difficult)

    def fingerprint(self) -> str:
        """What a run trained on this split depends on: its images and labels in memory, else (lazy) the
        source items it takes; see :func:`fingerprint`."""
        return fingerprint(self.images, self.labels) if self.in_memory else \
            fingerprint(self.labels, torch.as_tensor(self.indices), text=f"{self.name}/{self.split}")

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:]) if self.in_memory else "lazy"
        return f"Split({self.name!r}, {self.split!r}, n={len(self)}, classes={self.num_classes}, images={shape})"


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    from torchvision.transforms.v2 import functional as F
    return F.resize(images, [size, size], antialias=True)


def _reader_labels(ds) -> np.ndarray:
    # Each torchvision reader keeps its labels under its own (sometimes private) name; reading it
    # avoids decoding every image just to stratify.
    if getattr(ds, "multilabel", False):  # VOC2007: multi-hot float N×C
        return np.asarray(ds._labels, dtype=np.float32)
    for attr in ("targets", "labels", "_labels", "y"):
        if getattr(ds, attr, None) is not None:
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if getattr(ds, "_samples", None) is not None:  # StanfordCars: (file, label) pairs
        return np.asarray([y for _, y in ds._samples], dtype=np.int64)
    raise TypeError(f"cannot find the labels of {type(ds).__name__} (looked for targets, labels, _labels, y)")


def _open_paper(info: DatasetInfo, kwargs: dict, root, search, image_size: int, download: bool):
    """Construct the torchvision reader, turning its errors into ours (which say what to put where)."""
    import torchvision.datasets
    from . import more_readers
    cls = getattr(more_readers, info.reader, None) or getattr(torchvision.datasets, info.reader)
    roots = data_roots(root, search)
    found = next((r for r in roots if (r / info.folder).is_dir()), None)
    if found is not None:
        found_elsewhere(info.name, found, roots, root if root is not None else os.environ.get("BISSL_DATA"))
    if found is None:
        why = "download=False"
        if download and roots:
            try:
                cls(roots[0], download=True, **kwargs)
                found = roots[0]
            except (OSError, RuntimeError, ValueError) as e:  # no network: URLError (an OSError); StanfordCars: ValueError
                why = f"torchvision download into {roots[0]} failed: {e}"
        if found is None:
            raise DataNotFoundError(
                f"{info.name}: {info.folder} not found under any of: {', '.join(map(str, roots)) or '(none)'}\n"
                f"({why}). Put the dataset here:\n  {info.layout}\n"
                f"with <root> = one of those directories, or pass root=<dir> / set BISSL_DATA=<dir>.")
    try:
        ds = cls(found, transform=square_rgb(image_size), **kwargs)
    except Exception as e:  # noqa: BLE001 - the readers signal bad files with many types
        # RuntimeError (missing file or failed md5), EOFError/UnpicklingError (truncated pickle),
        # KeyError/ValueError/IndexError (malformed lists): all mean the files are not what it expects.
        md5 = (" torchvision checks these files' md5 against the official archive, so a partial or"
               " re-packed copy fails.") if info.md5_checked else ""
        raise DataCorruptError(f"{info.name}: torchvision's {info.reader} cannot read {found / info.folder} "
                               f"({type(e).__name__}: {e}).{md5}\nExpected layout:\n  {info.layout}") from e
    return ds, _reader_labels(ds)


def load_pretext(name="fashion_mnist", *, root=None, image_size=28, search=None, download=True, workers=0):
    """The pretext images (labels unused): for ``"fashion_mnist"`` the 60,000 training images, uint8
    N×C×H×W in memory; for the larger sets (:data:`~bissl_kit.data.pretext.STREAMED_PRETEXT`) and a
    folder given as a path, a :class:`~bissl_kit.data.pretext.StreamedImages` that decodes on access
    (``workers`` threads decode an index batch)."""
    from .folders import is_path
    from .pretext import open_streamed
    if name not in PRETEXT_DATASETS and not is_path(name):
        raise ValueError(f"unknown pretext dataset {name!r}; known: {', '.join(PRETEXT_DATASETS)}, or a folder path "
                         "(with a '/')")
    _check_image_size(image_size)
    if name != "fashion_mnist":
        return open_streamed(name, root=root, image_size=image_size, search=search, download=download, workers=workers)
    images, _ = _read_fashion_mnist(find_fashion_mnist(root, search=search, download=download), train=True)
    return _resize(images, image_size)


def _registered_split(info: DatasetInfo, split: str, root, image_size: int):
    """(images resized and centre-cropped to image_size, labels, official) of a registered dataset's split;
    official is False when its loader gave no val split, which is then carved from train."""
    val = None if split == "test" else info.loader("val", root, image_size)
    official = split == "test" or val is not None  # no val: train and val are carved from the loader's train
    got = val if split == "val" and val is not None else info.loader("train" if split == "val" else split, root, image_size)
    if got is None:
        raise DataNotFoundError(f"{info.name}: its registered loader returned None for the {split!r} split; only "
                                "'val' may be None (it is then carved from train)")
    images, labels = got
    images, labels = torch.as_tensor(images), np.asarray(labels, dtype=np.int64).reshape(-1)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != info.channels or len(images) != len(labels):
        raise DataCorruptError(f"{info.name} ({split}): the registered loader must return uint8 N×{info.channels}×H×W "
                               f"images and N labels (got {images.dtype} {tuple(images.shape)} and {len(labels)} labels)")
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataCorruptError(f"{info.name} ({split}): labels must lie in 0..{info.num_classes - 1} (got "
                               f"{labels.min()}..{labels.max()})")
    if images.shape[-2:] != (image_size, image_size):  # shorter side to image_size, centre crop, as the readers
        from torchvision.transforms.v2 import functional as F
        images = F.center_crop(F.resize(images, image_size, antialias=True), [image_size, image_size])
    return images, labels, official


def load_downstream(name, split, *, root=None, image_size=None, labels_per_class=None, seed=0,
                    search=None, download=True) -> Split:
    """One split ("train", "val" or "test") of a downstream dataset; protocols in :mod:`bissl_kit.data`.

    ``labels_per_class=N`` keeps N examples per class of the *train* split, drawn with ``seed``
    (the few-label task); val and test are never subsampled, so numbers stay comparable across N
    and seeds. ``image_size`` defaults to ``DATASETS[name].image_size`` (28 embedded, 96 paper).
    """
    info = _info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))} (got {split!r})")
    image_size = _check_image_size(info.image_size if image_size is None else image_size)
    if labels_per_class is not None and (not isinstance(labels_per_class, int) or labels_per_class < 1):
        raise ValueError(f"labels_per_class must be None or an int >= 1 (got {labels_per_class!r})")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 (got {seed!r})")

    images = reader = None
    if name == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        all_labels = digits.target.astype(np.int64)
        idx = _digits_split(all_labels, split)
        images = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    elif info.kind == "folder":
        from .folders import folder_split, has_val
        official = split == "test" or has_val(name)  # else train/val are carved from train/
        reader, all_labels, _ = folder_split(name, split if official else "train", image_size)
        idx = np.arange(len(all_labels)) if official else _carve(all_labels, split)
    elif info.kind == "registered":
        images, all_labels, official = _registered_split(info, split, root, image_size)
        idx = np.arange(len(all_labels)) if official else _carve(all_labels, split)
    elif name == "fashion_mnist":
        images, labels = _read_fashion_mnist(find_fashion_mnist(root, search=search, download=download),
                                             train=split != "test")
        all_labels = labels.numpy()
        idx = np.arange(len(all_labels)) if split == "test" else _carve(all_labels, split)
    else:
        # No "val" entry means val is carved from the official train split, so it opens that.
        kwargs = info.split_kwargs.get(split) or info.split_kwargs.get("train", {})
        reader, all_labels = _open_paper(info, kwargs, root, search, image_size, download)
        if name == "caltech101":
            idx = _caltech_split(all_labels, split)
        elif split == "test" or "val" in info.split_kwargs:
            idx = np.arange(len(all_labels))  # an official split, taken whole
        else:
            idx = _carve(all_labels, split)

    if split == "train" and labels_per_class is not None:
        if info.multilabel:
            raise ConfigError(f"labels_per_class={labels_per_class} is not defined for {name}, a multi-label set (an "
                              "image belongs to several classes); labels_per_class must be None")
        try:
            idx = idx[_take_per_class(all_labels[idx], labels_per_class, seed, f"{name} train")]
        except ValueError as e:  # a few-label split larger than a class: the user's setting
            raise ConfigError(f"labels_per_class={labels_per_class} is too large: {e}; labels_per_class must be "
                              f"<= the smallest class") from None
    labels = torch.from_numpy(all_labels[idx].copy())
    if images is not None:
        return Split(name, split, labels, info.num_classes, images=_resize(images[torch.from_numpy(idx)], image_size),
                     indices=idx)
    difficult = getattr(reader, "difficult", None) if info.multilabel else None
    difficult = torch.from_numpy(difficult[idx].copy()) if difficult is not None else None
    return Split(name, split, labels, info.num_classes, reader=reader, indices=idx, difficult=difficult)
