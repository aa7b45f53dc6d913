"""Fashion-MNIST, the pretext images: finding the four IDX files (data roots, the Debian package's
``.gz`` files, a torchvision download), installing the Debian package with apt-get, and reading
the files with checks that catch truncated copies."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import torch

from ..files import write_atomic
from .registry import DataCorruptError, DataNotFoundError, data_roots, found_elsewhere

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `dpkg -L dataset-fashion-mnist` puts the .gz files
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FMNIST_SIZES = {True: 60_000, False: 10_000}  # train=True/False; lets us catch truncated label files


def _has_fashion_mnist(root: Path) -> bool:
    return all((root / "FashionMNIST" / "raw" / f).is_file() for f in FMNIST_FILES)


def _gunzip_into(src_dir: Path, dest_dir: Path) -> None:
    """Unpack the four Debian .gz files into torchvision's layout (its reader wants them unpacked)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in FMNIST_FILES:
        # atomically: an interrupted run must not leave a truncated file that the next search would
        # take for the real one
        with gzip.open(src_dir / f"{name}.gz", "rb") as fin:
            write_atomic(dest_dir / name, lambda fout, fin=fin: shutil.copyfileobj(fin, fout, length=1 << 20),
                         binary=True)


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
            found_elsewhere("Fashion-MNIST", r, roots, root if root is not None else os.environ.get("BISSL_DATA"))
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

