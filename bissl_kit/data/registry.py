"""Which datasets there are (:data:`DATASETS`), where their files are looked for
(:func:`data_roots`), and the errors raised when they are missing or unreadable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
    # Registered datasets only (register_dataset): the function that reads a split, and how it was registered
    loader: Callable | None = None
    source: str | None = None  # 'module:function' that registers it (what a rerun passes as --register)
    # labels are num_classes-dim multi-hot float vectors (VOC07), not class indices; the metric is mAP
    multilabel: bool = False

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
    _paper("cars", "StanfordCars", 196, "stanford_cars/devkit",
           "<root>/stanford_cars/{cars_train/<file>.jpg, cars_test/<file>.jpg, cars_test_annos_withlabels.mat,"
           " devkit/{cars_meta.mat, cars_train_annos.mat}}  (the Stanford Cars archives and devkit, extracted)",
           _tv("train", "test")),
    _paper("sun397", "SUN397Partition", 397, "SUN397",
           "<root>/SUN397/{ClassName.txt, <letter>/<class>/sun_<id>.jpg, Partitions/{Training_01,Testing_01}.txt}"
           "  (SUN397.tar.gz extracted into <root>, Partitions.zip into <root>/SUN397/Partitions)",
           _tv("train", "test", partition=1)),
    _paper("cub200", "CUB200", 200, "CUB_200_2011/images",
           "<root>/CUB_200_2011/{images/<class>/<file>.jpg, images.txt, image_class_labels.txt,"
           " train_test_split.txt}  (CUB_200_2011.tgz, extracted)",
           _tv("train", "test")),
    DatasetInfo("voc07", "paper", 3, 20, 96, "VOC2007", "VOCdevkit/VOC2007/ImageSets/Main",
                "<root>/VOCdevkit/VOC2007/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/{train,val,test}.txt}"
                "  (VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar, both extracted into <root>)",
                _tv("train", "test", "val"), multilabel=True),
]}
# the pretext sets by name (a folder of images is given as its path): Fashion-MNIST in memory, the rest
# streamed (bissl_kit.data.pretext)
PRETEXT_DATASETS = ("fashion_mnist", "stl10", "stl10+train", "cifar10", "cifar100", "imagenet")


def _info(name: str) -> DatasetInfo:
    if is_path(name):
        from .folders import FOLDER_LAYOUT, folder_classes
        return DatasetInfo(name, "folder", 3, len(folder_classes(name)), 96, layout=FOLDER_LAYOUT)
    register_from_env()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def is_path(name: str) -> bool:
    """Whether a dataset argument is a folder path (it holds a '/'), not a dataset name."""
    from .folders import is_path as folder_path
    return folder_path(name)


def check_dataset_name(field: str, value: str) -> None:
    """A config check, run when the config is built (not at import): a dataset of the live registry (built-in,
    registered, or named in $BISSL_DATASETS) or a task folder path. A folder's existence is checked when it is
    read, so a config saved elsewhere still loads."""
    from ..config import ConfigError
    if is_path(value):
        return
    register_from_env()
    if value not in DATASETS:
        raise ConfigError(f"{field}={value!r} is not allowed; {field} must be one of {', '.join(map(repr, DATASETS))}, "
                          f"a dataset registered with bissl_kit.data.register_dataset, or the path of a task folder "
                          f"(with a '/': './{value}'; docs/data.md)")


# ---- registration ----------------------------------------------------------------------------------------

ENV_VAR = "BISSL_DATASETS"  # comma-separated 'module:function' specs, each called once before a name is looked up
_REGISTERED_BY: list[str] = []  # specs already called, in order
_CURRENT_SOURCE: list[str] = []  # the spec being called (register_from), recorded by register_dataset


def register_dataset(name: str, loader: Callable, *, num_classes: int, channels: int = 3, image_size: int = 96,
                     layout: str = "", source: str | None = None) -> DatasetInfo:
    """Make ``name`` a downstream dataset, usable wherever a dataset is named, at any time before a run.

    ``loader(split, root, image_size)`` returns ``(images, labels)`` of ``split`` ("train", "val" or "test"):
    uint8 N×C×H×W images (any H×W; they are resized to the run's image size) and int labels 0..num_classes−1,
    or ``None`` for "val" to carve val from train by the kit's rule (20 % of each class, fixed seed). ``root``
    is the run's ``data_root`` (or None). ``layout`` is quoted in errors. ``source`` is the importable
    ``module:function`` that performs this registration; :func:`register_from` fills it in, and a run records
    it so that its command can be rerun (``--register module:function``, or ``$BISSL_DATASETS``)."""
    if not isinstance(name, str) or not name or is_path(name) or ":" in name:
        raise ValueError(f"register_dataset: name={name!r} must be a non-empty name without '/' or ':'")
    if name in DATASETS and DATASETS[name].kind != "registered":
        raise ValueError(f"register_dataset: {name!r} is a built-in dataset; choose another name")
    if not callable(loader):
        raise TypeError(f"register_dataset: loader must be callable (got {type(loader).__name__})")
    if not (isinstance(num_classes, int) and num_classes >= 1 and channels in (1, 3)):
        raise ValueError(f"register_dataset: num_classes={num_classes!r} must be an int >= 1 and channels={channels!r} "
                         "1 or 3")
    source = source if source is not None else (_CURRENT_SOURCE[-1] if _CURRENT_SOURCE else None)
    info = DatasetInfo(name, "registered", channels, num_classes, image_size, layout=layout, loader=loader, source=source)
    DATASETS[name] = info
    return info


def register_from(spec: str) -> list[str]:
    """Import ``module:function`` and call the function (once per process), which registers datasets with
    :func:`register_dataset`; each records ``spec`` as its source. Returns the names it registered."""
    import importlib
    from ..config import ConfigError
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ConfigError(f"register: {spec!r} must be 'module:function' (an importable module and a function in it)")
    if spec in _REGISTERED_BY:
        return [n for n, i in DATASETS.items() if i.source == spec]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"register: cannot import {spec!r} ({type(e).__name__}: {e}); the module must be importable "
                         "(on PYTHONPATH) and define the function") from None
    before = dict(DATASETS)
    _CURRENT_SOURCE.append(spec)
    try:
        fn()
    finally:
        _CURRENT_SOURCE.pop()
    _REGISTERED_BY.append(spec)
    return [n for n, i in DATASETS.items() if before.get(n) is not i]


def register_from_env() -> None:
    """Call the registrations named in ``$BISSL_DATASETS`` that have not run yet."""
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV_VAR, "").split(","))):
        register_from(spec)


def registration_of(name: str) -> str | None:
    """The ``module:function`` that registered ``name`` (None for built-in datasets, folders, or a registration
    made by hand without a source)."""
    info = None if is_path(name) else DATASETS.get(name)
    return info.source if info is not None else None



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
