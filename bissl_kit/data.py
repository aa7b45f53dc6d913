"""Datasets for BiSSL: the pretext images, the downstream splits, and a deterministic batch iterator.

Protocols (the sizes are pinned by tests/test_data.py):

* **Pretext**: the 60,000 Fashion-MNIST *training* images, labels unused, uint8 N×1×28×28 in memory.
* **Splits**: "train" and "val" are carved out of the official training data; "test" is the official
  test data and is returned only when asked for by name, ``load_downstream(name, "test")``: it is for
  final numbers, never for monitoring or model selection (spec §2.5). Every carve is stratified and
  drawn with the fixed seed :data:`SPLIT_SEED`, so all runs and machines see the same partition;
  the ``seed`` argument only chooses *which* examples a few-label train split keeps.

  - digits (sklearn's 1797 8×8 images, no official split): 20 % of each class → test, then 20 % of
    each class of the rest → val. Sizes 1151 / 287 / 359.
  - fashion_mnist: 20 % of each class of the official train → val; test = the official t10k.
    Sizes 48,000 / 12,000 / 10,000 (the official code's V1 split sizes). The few-label task is
    ``labels_per_class=N``: N per class of the 48k train part, so 10·N / 12,000 / 10,000.
  - cifar10, cifar100, stl10, pets (official "trainval"), food101: 20 % of each class of the
    official train → val; test = the official test. E.g. CIFAR-10 40,000 / 10,000 / 10,000,
    STL10 4,000 / 1,000 / 8,000, Food101 60,600 / 15,150 / 25,250.
  - flowers102, dtd (partition 1), aircraft (the 100 variants): the official train / val / test.
  - caltech101 (no official split): 30 images per class for train+val (24 train / 6 val), the rest
    test. Sizes 2424 / 606 / 5647, as in the paper.

  The official code carves train/val from index files we do not have; ours use the same fractions,
  not the same members (spec §2.5 records 32k / 8k for its CIFAR-10 files, where ours are 40k / 10k).
* **Images**: embedded sets (digits, Fashion-MNIST) are held in memory, resized to ``image_size``
  (default 28) with antialiased bilinear interpolation; digits' 0..16 grey levels are rescaled to
  0..255. Paper datasets are read lazily by torchvision's readers and decoded to RGB, shorter side
  resized to ``image_size`` (default 96, the paper's setting), centre-cropped to a square so batches
  stack. Augmentation happens on batches elsewhere.
* **Where data is looked for**: ``root`` (else ``$BISSL_DATA``), then ``<repo>/data`` and ``./data``
  (so notebooks run from ``notebooks/`` find the repository's data), then, for Fashion-MNIST, the
  files of the Debian package ``dataset-fashion-mnist``, then a torchvision download (only works with
  a network). ``python -m bissl_kit.data prepare --allow-apt`` (the Makefile's set-up) may also
  install the Debian package with apt-get when run as root.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .rng import generator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `dpkg -L dataset-fashion-mnist` puts the .gz files
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0  # every train/val/test carve uses this seed; never change it (results would stop being comparable)
VAL_FRACTION = 0.2  # share of each class of the official train split that becomes val (spec §2.5: cifar10 32k/8k)
DIGITS_TEST_FRACTION = 0.2  # digits has no official test split; this share of each class is held out as test
CALTECH_TRAINVAL_PER_CLASS = 30  # the usual Caltech101 protocol; the paper's 2424/606/5647 follow from it
MIN_IMAGE_SIZE = 8

FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FMNIST_SIZES = {True: 60_000, False: 10_000}  # train=True/False; lets us catch truncated label files


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message lists the places and how to get them."""


class DataCorruptError(DataNotFoundError):
    """A dataset's files are there but unreadable (truncated, failed checksum, wrong layout)."""


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    name: str
    kind: str  # 'embedded': always available here, held in memory | 'paper': torchvision reader, lazy
    channels: int
    num_classes: int
    image_size: int  # default side of the square images a split yields
    # Paper datasets only: how torchvision reads them.
    reader: str | None = None  # class name in torchvision.datasets
    # What must exist under root before the reader is worth calling: a folder deep enough that the
    # empty directories a failed download leaves behind do not count.
    folder: str | None = None
    layout: str = ""  # the expected files, quoted in error messages
    split_kwargs: dict = field(default_factory=dict)  # our split -> reader kwargs; no "val" = carve it
    md5_checked: bool = False  # torchvision compares the files' md5 with the official archive's

    def __getitem__(self, key):  # lets callers write info["num_classes"] as well as info.num_classes
        return getattr(self, key)


def _paper(name, reader, classes, folder, layout, split_kwargs, md5_checked=False):
    return DatasetInfo(name, "paper", 3, classes, 96, reader, folder, layout, split_kwargs, md5_checked)


def _tv(train, test, val=None, **extra):
    """Reader kwargs per split: ``_tv("train", "test")`` → {"train": {"split": "train", ...}, ...}."""
    out = {"train": {"split": train, **extra}, "test": {"split": test, **extra}}
    if val is not None:
        out["val"] = {"split": val, **extra}
    return out


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo("digits", "embedded", 1, 10, 28),
    DatasetInfo("fashion_mnist", "embedded", 1, 10, 28),
    _paper("cifar10", "CIFAR10", 10, "cifar-10-batches-py",
           "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
           "  (cifar-10-python.tar.gz, extracted)",
           {"train": {"train": True}, "test": {"train": False}}, md5_checked=True),
    _paper("cifar100", "CIFAR100", 100, "cifar-100-python",
           "<root>/cifar-100-python/{train, test, meta}  (cifar-100-python.tar.gz, extracted)",
           {"train": {"train": True}, "test": {"train": False}}, md5_checked=True),
    _paper("stl10", "STL10", 10, "stl10_binary",
           "<root>/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin}"
           "  (stl10_binary.tar.gz, extracted; the reader insists on unlabeled_X.bin too)",
           _tv("train", "test"), md5_checked=True),
    _paper("flowers102", "Flowers102", 102, "flowers-102/jpg",
           "<root>/flowers-102/{jpg/image_00001.jpg ..., imagelabels.mat, setid.mat}"
           "  (102flowers.tgz extracted into flowers-102/, plus the two .mat files)",
           _tv("train", "test", "val"), md5_checked=True),
    _paper("dtd", "DTD", 47, "dtd/dtd",
           "<root>/dtd/dtd/{images/<class>/<file>.jpg, labels/{train,val,test}1.txt}"
           "  (dtd-r1.0.1.tar.gz extracted into <root>/dtd)",
           _tv("train", "test", "val", partition=1)),
    _paper("pets", "OxfordIIITPet", 37, "oxford-iiit-pet/images",
           "<root>/oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}"
           "  (images.tar.gz and annotations.tar.gz, extracted)",
           _tv("trainval", "test")),
    _paper("aircraft", "FGVCAircraft", 100, "fgvc-aircraft-2013b/data",
           "<root>/fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt,"
           " images_variant_{train,val,test}.txt}  (fgvc-aircraft-2013b.tar.gz, extracted)",
           _tv("train", "test", "val", annotation_level="variant")),
    _paper("food101", "Food101", 101, "food-101/images",
           "<root>/food-101/{images/<class>/<id>.jpg, meta/{train,test}.json}"
           "  (food-101.tar.gz, extracted)",
           _tv("train", "test")),
    _paper("caltech101", "Caltech101", 101, "caltech101/101_ObjectCategories",
           "<root>/caltech101/101_ObjectCategories/<category>/image_0001.jpg ...  (101_ObjectCategories"
           ".tar.gz extracted into <root>/caltech101; BACKGROUND_Google must be there, it is dropped)",
           {}),  # one unsplit set; see _caltech_split
]}
PRETEXT_DATASETS = ("fashion_mnist",)


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_image_size(image_size) -> int:
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE} (got {image_size!r})")
    return image_size


# ------------------------------------------------------------------------------------------------
# Where data lives
# ------------------------------------------------------------------------------------------------

def data_roots(root=None, search=None) -> list[Path]:
    """The directories looked in, in order: ``root`` (else ``$BISSL_DATA``), then ``search``
    (default: ``<repo>/data``, ``./data``). The first one is where downloads and unpacked files go."""
    first = root if root is not None else (os.environ.get("BISSL_DATA") or None)
    rest = [REPO_ROOT / "data", Path.cwd() / "data"] if search is None else list(search)
    out: list[Path] = []
    for p in ([first] if first is not None else []) + rest:
        p = Path(p).expanduser().resolve()
        if p not in out:
            out.append(p)
    return out


def _has_fashion_mnist(root: Path) -> bool:
    return all((root / "FashionMNIST" / "raw" / f).is_file() for f in FMNIST_FILES)


def _gunzip_into(src_dir: Path, dest_dir: Path) -> None:
    """Unpack the four Debian .gz files into torchvision's layout (its reader wants them unpacked)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        # Write under a temporary name, then rename: an interrupted run must not leave a truncated
        # file that the next search would take for the real one.
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.")
        try:
            with gzip.open(src_dir / f"{name}.gz", "rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
            os.replace(tmp, dest_dir / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def find_fashion_mnist(root=None, *, search=None, debian_dir=DEBIAN_DIR, download=True) -> Path:
    """Return a root with ``FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    Tries, in order: the :func:`data_roots`; the Debian package's ``.gz`` files in ``debian_dir``
    (gunzipped into the first data root; ``None`` skips this step); a torchvision download into the
    first data root when ``download`` (fails at once without a network). Raises
    :class:`DataNotFoundError` listing what was tried and every way to get the files.
    """
    roots = data_roots(root, search)
    for r in roots:
        if _has_fashion_mnist(r):
            return r
    tried = [f"{r / 'FashionMNIST' / 'raw'}: not there" for r in roots]
    target = roots[0] if roots else None

    if debian_dir is not None:
        debian_dir = Path(debian_dir)
        if not all((debian_dir / f"{f}.gz").is_file() for f in FMNIST_FILES):
            tried.append(f"Debian package files in {debian_dir}: not there ({DEBIAN_PACKAGE} not installed)")
        elif target is None:
            tried.append(f"Debian package files in {debian_dir}: found, but no data root to unpack them into")
        else:
            try:
                _gunzip_into(debian_dir, target / "FashionMNIST" / "raw")
                return target
            except OSError as e:
                tried.append(f"unpacking {debian_dir} into {target}: failed ({e})")

    if download and target is not None:
        from torchvision.datasets import FashionMNIST
        try:
            FashionMNIST(target, train=True, download=True)  # fetches all four files
            return target
        except (OSError, RuntimeError) as e:  # URLError is an OSError; torchvision re-raises as RuntimeError
            tried.append(f"torchvision download into {target}: failed ({e})")
    elif target is not None:
        tried.append("torchvision download: not tried (download=False)")

    where = target or Path("data").resolve()
    raise DataNotFoundError(
        "Fashion-MNIST (the pretext images) was not found.\nLooked at:\n  - " + "\n  - ".join(tried)
        + "\nGet it in one of these ways:\n"
        f"  1. Debian/Ubuntu: `sudo apt-get install {DEBIAN_PACKAGE}` (or, as root, "
        "`python -m bissl_kit.data prepare --allow-apt`, which `make setup` runs); it is found from then on.\n"
        f"  2. Put the four files {', '.join(FMNIST_FILES)} (gunzipped) in {where / 'FashionMNIST' / 'raw'},\n"
        "     or in <dir>/FashionMNIST/raw and pass root=<dir> or set BISSL_DATA=<dir>.\n"
        "  3. With a network: `python -m bissl_kit.data prepare` downloads them through torchvision.")


def _apt_unavailable() -> str | None:
    """Why apt-get cannot be used here, or None when it can."""
    if shutil.which("apt-get") is None:
        return "apt-get is not on this system"
    if os.geteuid() != 0:
        return "not running as root (run `sudo apt-get install dataset-fashion-mnist` yourself)"
    return None


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    print("running:", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=env).returncode == 0:
        return
    # A fresh container has empty package lists: refresh them once and retry.
    subprocess.run(["apt-get", "update", "-q"], env=env)
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise DataNotFoundError(f"`{' '.join(cmd)}` failed (exit {done.returncode}); see its output above")


def prepare_fashion_mnist(*, allow_apt=False, root=None, search=None, debian_dir=DEBIAN_DIR,
                          download=True) -> Path:
    """The set-up step: :func:`find_fashion_mnist`, and when that fails and ``allow_apt`` is set,
    install the Debian package with apt-get (only as root with apt-get present) and look again."""
    try:
        return find_fashion_mnist(root, search=search, debian_dir=debian_dir, download=download)
    except DataNotFoundError as e:
        if not allow_apt:
            raise
        why_not = _apt_unavailable()
        if why_not is not None:
            raise DataNotFoundError(f"{e}\n(apt-get was not used: {why_not})") from None
    _apt_install(DEBIAN_PACKAGE)
    return find_fashion_mnist(root, search=search, debian_dir=DEBIAN_DIR, download=False)


def _read_fashion_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N×1×28×28, labels int64 N) through torchvision's reader."""
    from torchvision.datasets import FashionMNIST
    raw = root / "FashionMNIST" / "raw"
    fix = f"Delete {raw} and run `python -m bissl_kit.data prepare` to recreate it."
    try:
        ds = FashionMNIST(root, train=train, download=False)
    except (AssertionError, RuntimeError, ValueError, TypeError, KeyError) as e:
        # torchvision's IDX reader asserts on a bad header and fails in a reshape on a short file.
        raise DataCorruptError(f"Fashion-MNIST files in {raw} are unreadable ({type(e).__name__}: {e}). {fix}") from e
    n = FMNIST_SIZES[train]
    # The label reader is not strict about length, so a truncated label file only shows up here.
    if tuple(ds.data.shape) != (n, 28, 28) or tuple(ds.targets.shape) != (n,):
        raise DataCorruptError(f"Fashion-MNIST {'train' if train else 't10k'} files in {raw} hold "
                               f"{tuple(ds.data.shape)} images and {tuple(ds.targets.shape)} labels, "
                               f"expected ({n}, 28, 28) and ({n},). {fix}")
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------

def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (kept, held). For each class in increasing label order, a
    permutation from ``np.random.default_rng(seed)``; its first round(fraction·n_class) go to held.
    Both results are sorted, so a split keeps the original order of the data."""
    rng = np.random.default_rng(seed)
    held = [rng.permutation(idx)[: int(fraction * len(idx) + 0.5)]
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def _take_per_class(labels: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """Sorted indices of ``n`` examples per class, drawn like :func:`_stratified_split`."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < n:
        raise ValueError(f"{what}: asked for {n} per class, but class {classes[counts.argmin()]} has only "
                         f"{counts.min()}")
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n] for c in classes]))


def _carve(labels: np.ndarray, split: str) -> np.ndarray:
    """train/val indices carved from an official train split: VAL_FRACTION per class is val."""
    train, val = _stratified_split(labels, VAL_FRACTION, SPLIT_SEED)
    return train if split == "train" else val


def _digits_split(labels: np.ndarray, split: str) -> np.ndarray:
    rest, test = _stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    if split == "test":
        return test
    return rest[_carve(labels[rest], split)]


def _caltech_split(labels: np.ndarray, split: str) -> np.ndarray:
    trainval = _take_per_class(labels, CALTECH_TRAINVAL_PER_CLASS, SPLIT_SEED, "caltech101 train+val")
    if split == "test":
        return np.setdiff1d(np.arange(len(labels)), trainval)
    return trainval[_carve(labels[trainval], split)]


# ------------------------------------------------------------------------------------------------
# The Dataset every split is
# ------------------------------------------------------------------------------------------------

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

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if self.images is not None:
            return self.images[i], int(self.labels[i])
        try:
            image, label = self.reader[int(self.indices[i])]
        except OSError as e:  # PIL: a truncated or unreadable image file
            raise DataCorruptError(f"{self.name} ({self.split}) item {i}: cannot decode the image: {e}") from e
        return image, int(label)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def materialize(self) -> Split:
        """Decode every image once into memory (small sets: Flowers102 train is ~28 MB at 96 px)."""
        if self.in_memory:
            return self
        images = torch.stack([self[i][0] for i in range(len(self))])
        return Split(self.name, self.split, self.labels, self.num_classes, images=images, indices=self.indices)

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:]) if self.in_memory else "lazy"
        return f"Split({self.name!r}, {self.split!r}, n={len(self)}, classes={self.num_classes}, images={shape})"


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    from torchvision.transforms.v2 import functional as F
    return F.resize(images, [size, size], antialias=True)


def _square_rgb(size: int):
    """PIL image → uint8 3×size×size: RGB (Caltech101 has grayscale images), shorter side to size, centre crop."""
    from torchvision.transforms import v2
    return v2.Compose([v2.RGB(), v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


def _reader_labels(ds) -> np.ndarray:
    # Each torchvision reader keeps its labels under its own (sometimes private) name; reading it
    # avoids decoding every image just to stratify.
    for attr in ("targets", "labels", "_labels", "y"):
        if getattr(ds, attr, None) is not None:
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    raise TypeError(f"cannot find the labels of {type(ds).__name__} (looked for targets, labels, _labels, y)")


def _open_paper(info: DatasetInfo, kwargs: dict, root, search, image_size: int, download: bool):
    """Construct the torchvision reader, turning its errors into ours (which say what to put where)."""
    import torchvision.datasets
    cls = getattr(torchvision.datasets, info.reader)
    roots = data_roots(root, search)
    found = next((r for r in roots if (r / info.folder).is_dir()), None)
    if found is None:
        why = "download=False"
        if download and roots:
            try:
                cls(roots[0], download=True, **kwargs)
                found = roots[0]
            except (OSError, RuntimeError) as e:  # no network: URLError (an OSError) at once
                why = f"torchvision download into {roots[0]} failed: {e}"
        if found is None:
            raise DataNotFoundError(
                f"{info.name}: {info.folder} not found under any of: {', '.join(map(str, roots)) or '(none)'}\n"
                f"({why}). Put the dataset here:\n  {info.layout}\n"
                f"with <root> = one of those directories, or pass root=<dir> / set BISSL_DATA=<dir>.")
    try:
        ds = cls(found, transform=_square_rgb(image_size), **kwargs)
    except Exception as e:  # noqa: BLE001 - the readers signal bad files with many types
        # RuntimeError (missing file or failed md5), EOFError/UnpicklingError (truncated pickle),
        # KeyError/ValueError/IndexError (malformed lists): all mean the files are not what it expects.
        md5 = (" torchvision checks these files' md5 against the official archive, so a partial or"
               " re-packed copy fails.") if info.md5_checked else ""
        raise DataCorruptError(f"{info.name}: torchvision's {info.reader} cannot read {found / info.folder} "
                               f"({type(e).__name__}: {e}).{md5}\nExpected layout:\n  {info.layout}") from e
    return ds, _reader_labels(ds)


# ------------------------------------------------------------------------------------------------
# Public loaders
# ------------------------------------------------------------------------------------------------

def load_pretext(name="fashion_mnist", *, root=None, image_size=28, search=None, download=True) -> torch.Tensor:
    """The pretext images, uint8 N×C×H×W in memory: the 60,000 Fashion-MNIST training images."""
    if name not in PRETEXT_DATASETS:
        raise ValueError(f"unknown pretext dataset {name!r}; known: {', '.join(PRETEXT_DATASETS)}")
    _check_image_size(image_size)
    images, _ = _read_fashion_mnist(find_fashion_mnist(root, search=search, download=download), train=True)
    return _resize(images, image_size)


def load_downstream(name, split, *, root=None, image_size=None, labels_per_class=None, seed=0,
                    search=None, download=True) -> Split:
    """One split ("train", "val" or "test") of a downstream dataset; protocols in the module docstring.

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
        idx = idx[_take_per_class(all_labels[idx], labels_per_class, seed,
                                  f"labels_per_class={labels_per_class} on {name} train")]
    labels = torch.from_numpy(all_labels[idx].copy())
    if images is not None:
        return Split(name, split, labels, info.num_classes, images=_resize(images[torch.from_numpy(idx)], image_size),
                     indices=idx)
    return Split(name, split, labels, info.num_classes, reader=reader, indices=idx)


def iterate_batches(dataset, batch_size, *, seed, epoch=0, shuffle=True, drop_last=True, num_workers=0,
                    device="cpu"):
    """Yield (images uint8, labels int64) batches on ``device``, one pass over ``dataset``.

    The order is a permutation drawn from (seed, "batches", epoch) only, so the same arguments give
    the same batches on any machine, and a resumed run can start at any epoch. In-memory datasets
    (``.images`` tensor, or a TensorDataset) are sliced by tensor indexing; others go through a
    DataLoader with ``num_workers`` workers and the same order. ``drop_last`` drops the partial
    last batch.
    """
    n = len(dataset)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (got {batch_size!r})")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} examples) and drop_last=True, "
                         "so there would be no batch at all; use a smaller batch_size or drop_last=False")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (got {num_workers!r})")
    order = torch.randperm(n, generator=generator(seed, "batches", epoch)) if shuffle else torch.arange(n)
    order = order[: n - n % batch_size if drop_last else n]
    device = torch.device(device)

    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if images is None and isinstance(dataset, torch.utils.data.TensorDataset):
        images, labels = dataset.tensors[:2]

    def batches():
        if isinstance(images, torch.Tensor):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield images[idx].to(device), labels[idx].to(device)
            return
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return batches()  # a generator made after the checks, so bad arguments fail at the call


# ------------------------------------------------------------------------------------------------
# python -m bissl_kit.data prepare
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_kit.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="Make Fashion-MNIST available and print where it is.")
    prep.add_argument("--root", default=None,
                      help="Directory that should hold FashionMNIST/raw; default $BISSL_DATA, else <repo>/data.")
    prep.add_argument("--allow-apt", action="store_true",
                      help=f"If nothing else works, install the Debian package {DEBIAN_PACKAGE} with apt-get "
                           "(only when running as root and apt-get exists).")
    prep.add_argument("--no-download", action="store_true", help="Do not try a torchvision download.")
    args = parser.parse_args(argv)
    try:
        found = prepare_fashion_mnist(allow_apt=args.allow_apt, root=args.root, download=not args.no_download)
        _read_fashion_mnist(found, train=False)  # cheap check that the files are readable
    except DataNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {found / 'FashionMNIST' / 'raw'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
