"""Which datasets there are (:data:`DATASETS`), where their files are looked for
(:func:`data_roots`), and the errors raised when they are missing or unreadable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout; its data/ is searched
SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message lists the places and how to get them."""


class DataCorruptError(DataNotFoundError):
    """A dataset's files are there but unreadable (truncated, failed checksum, wrong layout)."""


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



def data_roots(root=None, search=None) -> list[Path]:
    """The directories looked in, in order: ``root`` (else ``$BISSL_DATA``), then ``search``
    (default: ``<repo>/data``, ``./data``). The first one is where downloads and unpacked files go.

    A root the user names (``data_root``, ``$BISSL_DATA``) must be a folder; a dataset it lacks is taken
    from the next root with a warning (:func:`found_elsewhere`), never silently."""
    first = root if root is not None else (os.environ.get("BISSL_DATA") or None)
    if first is not None:
        if not Path(first).expanduser().is_dir():
            what = "data_root" if root is not None else "$BISSL_DATA"
            state = "is not a folder" if Path(first).expanduser().exists() else "does not exist"
            raise DataNotFoundError(f"{what}={str(first)!r} {state}; point it at the folder that holds the datasets "
                                    f"(or leave it unset to search <repo>/data and ./data)")

    rest = [REPO_ROOT / "data", Path.cwd() / "data"] if search is None else list(search)
    out: list[Path] = []
    for p in ([first] if first is not None else []) + rest:
        p = Path(p).expanduser().resolve()
        if p not in out:
            out.append(p)
    return out


def found_elsewhere(name: str, found: Path, roots: list[Path], named) -> None:
    """Warn when a dataset was found in another root than the one the user named (``named``: the
    ``data_root`` given, else ``$BISSL_DATA``, else None)."""
    if named is None or found == roots[0]:
        return
    import warnings
    warnings.warn(f"{name} is not in the data root {str(roots[0])!r} you named; using the copy in {str(found)!r}",
                  RuntimeWarning, stacklevel=3)
