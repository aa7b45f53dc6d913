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
