"""Folders of image files: the pretext folder (images at any depth, labels unused) and the downstream
task of one's own (``<dir>/{train,test}[,val]/<class>/<image>``, torchvision's ImageFolder layout).

A dataset given as a path is told apart from a dataset name by a path separator: ``"data/mine"``,
``"./mine"`` or ``"/abs/mine"`` are folders, ``"mine"`` is a name (a known or registered dataset).
The rule keeps a misspelt name from being taken for a folder, and is checked when a config is built
(:func:`is_path`). Every image is decoded to RGB, shorter side resized to ``image_size``, centre-cropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import DataNotFoundError

# torchvision's ImageFolder extensions, lower case; matched case-insensitively (ImageNet's are .JPEG)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = ("<dir>/train/<class>/<image>, <dir>/test/<class>/<image> and optionally <dir>/val/<class>/<image> "
                 "(torchvision's ImageFolder layout; without val/, val is carved from train: 20 % of each class)")


def is_path(name: str) -> bool:
    """Whether a dataset argument names a folder (it holds a path separator) rather than a dataset."""
    return "/" in name or os.sep in name or name.startswith("~")


def square_rgb(size: int):
    """PIL image → uint8 3×size×size: RGB (Caltech101 has grayscale images), shorter side to size, centre crop."""
    from torchvision.transforms import v2
    return v2.Compose([v2.RGB(), v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


def image_files(folder: Path) -> list[str]:
    """The image files under ``folder`` at any depth, as sorted paths relative to it (a fixed order on every
    machine and file system, so the batch order of a seed is the same everywhere)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


def decode(path, size: int) -> torch.Tensor:
    from PIL import Image
    with open(path, "rb") as f, Image.open(f) as img:
        return square_rgb(size)(img.convert("RGB"))


class ImageFiles(Dataset):
    """Image files decoded on access: item i is the uint8 3×size×size image of ``files[i]`` (no label).

    Holds the file names only (a numpy array of strings: ImageNet's 1.28M names take ~100 MB, and
    no Python object per file that the DataLoader's forked workers would copy on touch)."""

    def __init__(self, root: Path, files, size: int, what: str):
        self.root, self.size, self.what = Path(root), size, what
        self.files = np.asarray(files, dtype=np.str_)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from .registry import DataCorruptError
        path = self.root / str(self.files[i])
        try:
            return decode(path, self.size)
        except OSError as e:  # PIL: a truncated or unreadable file
            raise DataCorruptError(f"{self.what}: cannot decode {path}: {e}") from e

    def sizes(self) -> np.ndarray:
        """The files' sizes in bytes (part of the data's fingerprint)."""
        return np.array([os.path.getsize(self.root / str(f)) for f in self.files], dtype=np.int64)


def image_folder(path: str, size: int) -> ImageFiles:
    """Every image under the folder ``path``, at any depth, for pre-training."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"pretext_dataset={path!r}: {folder.resolve()} is not a folder; a pretext folder holds "
                                f"image files ({', '.join(IMAGE_EXTENSIONS)}) at any depth")
    files = image_files(folder)
    if not files:
        raise DataNotFoundError(f"pretext_dataset={path!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}, any case) "
                                f"under {folder.resolve()}, at any depth")
    return ImageFiles(folder, files, size, f"pretext folder {path}")


# ---- the downstream task of one's own -----------------------------------------------------------------

def folder_classes(path: str) -> list[str]:
    """The classes of a task folder: the sub-folders of its train/, sorted (ImageFolder's numbering)."""
    root = Path(path).expanduser()
    for need in ("train", "test"):
        if not (root / need).is_dir():
            raise DataNotFoundError(f"{path}: {root.resolve() / need} is not a folder. A task folder is\n  {FOLDER_LAYOUT}")
    classes = sorted(d.name for d in os.scandir(root / "train") if d.is_dir())
    if not classes:
        raise DataNotFoundError(f"{path}: {root.resolve() / 'train'} has no class folders. A task folder is\n  {FOLDER_LAYOUT}")
    return classes


def folder_split(path: str, split: str, size: int):
    """(reader, labels) of one folder of a task: train/, test/ or val/, classes numbered as in train/.

    torchvision's ImageFolder numbers the classes of each folder it opens on its own, so a test/ that
    lacks a class would shift the numbers; the train/ classes are imposed on every folder instead."""
    from torchvision.datasets import ImageFolder

    classes = folder_classes(path)
    folder = Path(path).expanduser() / split
    extra = sorted({d.name for d in os.scandir(folder) if d.is_dir()} - set(classes))
    if extra:
        raise DataNotFoundError(f"{path}: {split}/ has classes that train/ lacks: {', '.join(extra[:5])}; every class "
                                "of val/ and test/ must have a folder in train/")

    class Fixed(ImageFolder):
        def find_classes(self, directory):
            return classes, {c: i for i, c in enumerate(classes)}

    try:
        reader = Fixed(str(folder), transform=square_rgb(size), allow_empty=True)
    except (FileNotFoundError, TypeError) as e:
        raise DataNotFoundError(f"{path}: {split}/ cannot be read ({e}). A task folder is\n  {FOLDER_LAYOUT}") from e
    if not reader.samples:
        raise DataNotFoundError(f"{path}: no image files in {folder.resolve()}/<class>/. A task folder is\n  {FOLDER_LAYOUT}")
    return reader, np.asarray(reader.targets, dtype=np.int64), len(classes)


def has_val(path: str) -> bool:
    return (Path(path).expanduser() / "val").is_dir()
