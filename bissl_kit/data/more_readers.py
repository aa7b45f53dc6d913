"""Readers for the paper's downstream sets torchvision lacks or reads without their official split:
CUB-200-2011 (no torchvision reader) and SUN397 with its official partition 1 (torchvision's reader
lists every image and has no split). Each behaves like a torchvision reader: ``reader[i]`` is
(transformed image, label) and ``_labels`` holds the labels, so :mod:`bissl_kit.data.readers` opens them
like the others (``DatasetInfo.reader`` names the class here)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset


def _pil(path: Path):
    from PIL import Image
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class CUB200(Dataset):
    """CUB-200-2011 from its official lists: ``images.txt`` (id → file), ``image_class_labels.txt``
    (id → class 1..200) and ``train_test_split.txt`` (id → 1 train, 0 test)."""

    def __init__(self, root, split: str = "train", transform=None, download: bool = False):
        if download:
            raise RuntimeError("CUB-200-2011 is not downloaded by the kit; put CUB_200_2011.tgz, extracted, there")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        base = Path(root) / "CUB_200_2011"
        lists = {name: dict(line.split(maxsplit=1) for line in (base / name).read_text().split("\n") if line.strip())
                 for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt")}
        want = "1" if split == "train" else "0"
        ids = sorted((i for i, s in lists["train_test_split.txt"].items() if s.strip() == want), key=int)
        self.files = [base / "images" / lists["images.txt"][i].strip() for i in ids]
        self._labels = [int(lists["image_class_labels.txt"][i]) - 1 for i in ids]
        missing = [str(f) for f in self.files[:3] if not f.is_file()]
        if missing:
            raise RuntimeError(f"images listed in images.txt are missing: {', '.join(missing)}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = _pil(self.files[i])
        return (self.transform(image) if self.transform else image), self._labels[i]


class SUN397Partition(Dataset):
    """SUN397 restricted to one official partition (``Partitions/Training_01.txt`` / ``Testing_01.txt``:
    50 train and 50 test images per class, listed as ``/a/abbey/sun_xxx.jpg``), classes numbered in
    ``ClassName.txt`` order, as torchvision's SUN397 reader numbers them."""

    def __init__(self, root, split: str = "train", partition: int = 1, transform=None, download: bool = False):
        from torchvision.datasets import SUN397
        full = SUN397(root, download=download)
        base = Path(root) / "SUN397"
        listed = (base / "Partitions" / f"{'Training' if split == 'train' else 'Testing'}_{partition:02d}.txt")
        if not listed.is_file():
            raise RuntimeError(f"{listed} not found (the official partition lists, Partitions.zip, extracted there)")
        keep = {line.strip().lstrip("/") for line in listed.read_text().split("\n") if line.strip()}
        pairs = sorted((str(p.relative_to(base)), p, y) for p, y in zip(full._image_files, full._labels)
                       if str(p.relative_to(base)) in keep)
        if len(pairs) != len(keep):
            raise RuntimeError(f"{listed} lists {len(keep)} images but {len(pairs)} of them are under {base}")
        self.files = [p for _, p, _ in pairs]
        self._labels = [y for _, _, y in pairs]
        self.classes, self.transform = full.classes, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = _pil(self.files[i])
        return (self.transform(image) if self.transform else image), self._labels[i]


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


class VOC2007(Dataset):
    """PASCAL VOC2007 classification: the official ImageSets/Main lists (train, val, test) as torchvision's
    VOCDetection reads them, each image labelled by a 20-dim multi-hot vector of the classes of its objects.

    ``_labels`` (float32 N×20) marks a class present when any object of it is, difficult ones included;
    ``difficult`` (bool N×20) marks the classes an image holds *only* difficult objects of: the VOC07
    devkit's classification ground truth (label 0 in ``<class>_<set>.txt``), which AP ignores for that class
    (:func:`bissl_kit.evaluate.average_precision`). The annotations are parsed once here, so labels need no
    image decoding."""

    multilabel = True
    classes = VOC_CLASSES

    def __init__(self, root, split: str = "train", transform=None, download: bool = False):
        import numpy as np
        from torchvision.datasets import VOCDetection
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test' (got {split!r})")
        voc = VOCDetection(root, year="2007", image_set=split, download=download)
        index = {c: i for i, c in enumerate(VOC_CLASSES)}
        present = np.zeros((len(voc), len(VOC_CLASSES)), bool)
        easy = np.zeros_like(present)  # a non-difficult object of the class is in the image
        for i, path in enumerate(voc.annotations):
            objects = voc.parse_voc_xml(_xml_root(path))["annotation"].get("object", [])
            for obj in objects if isinstance(objects, list) else [objects]:
                c = index[obj["name"].strip()]  # a name outside the 20 classes: the file is not VOC2007's
                present[i, c] = True
                easy[i, c] |= obj.get("difficult", "0").strip() != "1"
        self.files = [Path(p) for p in voc.images]
        self._labels = present.astype(np.float32)
        self.difficult = present & ~easy
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch
        image = _pil(self.files[i])
        return (self.transform(image) if self.transform else image), torch.from_numpy(self._labels[i])


def _xml_root(path):
    from xml.etree.ElementTree import parse
    return parse(path).getroot()
