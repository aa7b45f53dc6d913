"""Writers of tiny copies of the paper's datasets in their real on-disk formats.

Each writer puts files under ``root`` exactly where torchvision's reader looks (see
``torchvision/datasets/<reader>.py``) and returns {reader split: [labels]}. Every image is a
uniform colour that encodes its label (:func:`shade`), so a test can check that the image an item
yields belongs to the label it yields. Sizes are non-square (HEIGHT×WIDTH) so the resize + centre
crop matters.

CIFAR-10/100, STL10 and Flowers102 files are also checked by md5 against the official archives, so
the readers reject these copies; see tests/test_data.py for how that is handled.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 20, 12


def shade(label: int) -> int:
    """The grey level every pixel of an image of class ``label`` has."""
    return 30 + 40 * label


def _jpg(path: Path, label: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = shade(label) if mode == "L" else (shade(label),) * 3
    Image.new(mode, (WIDTH, HEIGHT), colour).save(path, quality=95)


def _labels(classes: int, per_class: int) -> list[int]:
    return [c for _ in range(per_class) for c in range(classes)]  # interleaved, like real files


def _pixels(labels, side: int) -> np.ndarray:
    """uint8 N×3×side×side, uniform per image."""
    return np.broadcast_to(np.array([shade(y) for y in labels], np.uint8)[:, None, None, None],
                           (len(labels), 3, side, side)).copy()


def write_cifar10(root: Path) -> dict:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    splits = {"train": [], "test": _labels(5, 4)}
    for i in range(1, 6):  # the reader needs all five batches
        labels = _labels(5, 2)
        splits["train"] += labels
        _pickle(base / f"data_batch_{i}", {"data": _pixels(labels, 32).reshape(len(labels), -1), "labels": labels})
    _pickle(base / "test_batch", {"data": _pixels(splits["test"], 32).reshape(-1, 3072), "labels": splits["test"]})
    _pickle(base / "batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return splits


def write_cifar100(root: Path) -> dict:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    splits = {"train": _labels(5, 10), "test": _labels(5, 2)}
    for name, labels in splits.items():
        _pickle(base / name, {"data": _pixels(labels, 32).reshape(len(labels), -1), "fine_labels": labels,
                              "coarse_labels": [y // 5 for y in labels]})
    _pickle(base / "meta", {"fine_label_names": [f"c{c}" for c in range(100)],
                            "coarse_label_names": [f"s{c}" for c in range(20)]})
    return splits


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_stl10(root: Path, unlabeled: int = 1) -> dict:
    """STL10's binary files; ``unlabeled`` images of random pixels in unlabeled_X.bin (the pretext set)."""
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    splits = {"train": _labels(4, 5), "test": _labels(4, 2)}
    for name, labels in splits.items():
        # Images are stored column-major (the reader transposes H and W); labels are 1-based.
        _pixels(labels, 96).transpose(0, 1, 3, 2).tofile(base / f"{name}_X.bin")
        (np.array(labels, np.uint8) + 1).tofile(base / f"{name}_y.bin")
    noise = np.random.default_rng(1).integers(0, 256, (unlabeled, 3, 96, 96), dtype=np.uint8)
    noise.transpose(0, 1, 3, 2).tofile(base / "unlabeled_X.bin")
    (base / "class_names.txt").write_text("\n".join(f"class{c}" for c in range(10)))
    return splits


def write_flowers102(root: Path) -> dict:
    from scipy.io import savemat
    base = root / "flowers-102"
    labels = _labels(3, 4)  # image ids 1..12
    for image_id, y in enumerate(labels, 1):
        _jpg(base / "jpg" / f"image_{image_id:05d}.jpg", y)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], np.uint8) + 1})  # 1-based, 1×N
    ids = np.arange(1, 13, dtype=np.uint16)
    savemat(base / "setid.mat", {"trnid": ids[None, :6], "valid": ids[None, 6:9], "tstid": ids[None, 9:]})
    return {"train": labels[:6], "val": labels[6:9], "test": labels[9:]}


def write_dtd(root: Path) -> dict:
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "braided"]  # the reader numbers the classes in sorted order
    splits = {"train": _labels(3, 3), "val": _labels(3, 2), "test": _labels(3, 2)}
    counter = 0
    for split, labels in splits.items():
        lines = []
        for y in labels:
            counter += 1
            name = f"{classes[y]}_{counter:04d}.jpg"
            _jpg(base / "images" / classes[y] / name, y)
            lines.append(f"{classes[y]}/{name}")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return splits


def write_pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    splits = {"trainval": _labels(3, 5), "test": _labels(3, 2)}
    (base / "annotations").mkdir(parents=True)
    counter = 0
    for split, labels in splits.items():
        lines = []
        for y in labels:
            counter += 1
            image_id = f"{breeds[y]}_{counter}"
            _jpg(base / "images" / f"{image_id}.jpg", y)
            lines.append(f"{image_id} {y + 1} {1 + (y == 1)} 1")  # id, class (1-based), species, breed id
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return splits


def write_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A320", "Cessna 172"]  # names may contain spaces; the reader splits once
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    splits = {"train": _labels(3, 3), "val": _labels(3, 2), "test": _labels(3, 2)}
    counter = 1_000_000
    for split, labels in splits.items():
        lines = []
        for y in labels:
            counter += 1
            _jpg(data / "images" / f"{counter}.jpg", y)
            lines.append(f"{counter} {variants[y]}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return splits


def write_food101(root: Path) -> dict:
    base = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    splits = {"train": _labels(3, 5), "test": _labels(3, 2)}
    (base / "meta").mkdir(parents=True)
    counter = 0
    for split, labels in splits.items():
        meta = {c: [] for c in classes}
        for y in labels:
            counter += 1
            _jpg(base / "images" / classes[y] / f"{counter}.jpg", y)
            meta[classes[y]].append(f"{classes[y]}/{counter}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    # The reader lists images class by class, in the json's order.
    return {split: sorted(labels) for split, labels in splits.items()}


CALTECH_COUNTS = {"Faces": 31, "accordion": 32, "airplanes": 34}  # the protocol needs > 30 per class


def write_caltech101(root: Path) -> dict:
    base = root / "caltech101" / "101_ObjectCategories"
    _jpg(base / "BACKGROUND_Google" / "image_0001.jpg", 0)  # the reader drops this folder, and needs it
    labels = []
    for y, (category, n) in enumerate(sorted(CALTECH_COUNTS.items())):
        for i in range(1, n + 1):
            # Real Caltech101 has some grayscale JPEGs: every third one here is.
            _jpg(base / category / f"image_{i:04d}.jpg", y, mode="L" if i % 3 == 0 else "RGB")
        labels += [y] * n
    return {"all": labels}


def write_cars(root: Path) -> dict:
    """Stanford Cars: images in cars_train/ and cars_test/, the annotations as .mat struct arrays
    (fname, class 1-based) the way torchvision's StanfordCars reads them (scipy's loadmat, squeeze_me)."""
    from scipy.io import savemat
    base = root / "stanford_cars"
    splits = {"train": _labels(3, 5), "test": _labels(3, 2)}
    for split, labels in splits.items():
        folder = base / f"cars_{split}"
        annos = np.zeros(len(labels), dtype=[("fname", "O"), ("class", "O")])
        for i, y in enumerate(labels):
            _jpg(folder / f"{i + 1:05d}.jpg", y)
            annos[i] = (f"{i + 1:05d}.jpg", np.uint8(y + 1))
        mat = base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat")
        mat.parent.mkdir(parents=True, exist_ok=True)
        savemat(mat, {"annotations": annos[None, :]})
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([[f"Car {c}" for c in range(196)]], dtype="O")})
    return splits


SUN_CLASSES = ("/a/abbey", "/b/bakery/shop", "/c/campus")  # SUN397's class names; some have two levels


def write_sun397(root: Path) -> dict:
    """SUN397's folders <letter>/<class>/sun_<id>.jpg, ClassName.txt, and partition 1's lists (4 train, 2 test
    per class here; 50 and 50 in the real lists), with one image per class in neither."""
    base = root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(SUN_CLASSES) + "\n")
    lists = {"train": [], "test": []}
    splits = {"train": [], "test": []}
    for y, cls in enumerate(SUN_CLASSES):
        for i in range(7):
            rel = f"{cls}/sun_{y}{i:04d}.jpg"
            _jpg(base / rel.lstrip("/"), y)
            split = "train" if i < 4 else "test" if i < 6 else None
            if split:
                lists[split].append(rel)
                splits[split].append(y)
    (base / "Partitions").mkdir()
    (base / "Partitions" / "Training_01.txt").write_text("\n".join(lists["train"]) + "\n")
    (base / "Partitions" / "Testing_01.txt").write_text("\n".join(lists["test"]) + "\n")
    return splits


def write_cub200(root: Path) -> dict:
    """CUB-200-2011's lists (images.txt, image_class_labels.txt 1-based, train_test_split.txt 1 = train) and
    images/<nnn.Class>/<file>.jpg; ids are listed out of order (the split must not depend on it)."""
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    rows, splits = [], {"train": [], "test": []}
    for i, y in enumerate(_labels(3, 6), 1):
        train = i % 3 != 0
        rel = f"{classes[y]}/{classes[y].split('.')[1]}_{i:04d}.jpg"
        _jpg(base / "images" / rel, y)
        rows.append((i, rel, y + 1, int(train)))
        splits["train" if train else "test"].append(y)
    rows = rows[::-1]
    (base / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {y}\n" for i, _, y, _ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    return splits


VOC_FAKE_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
                    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def write_voc2007(root: Path, per_split: dict | None = None, seed: int = 0) -> dict:
    """VOC2007 as the trainval and test archives extract: VOCdevkit/VOC2007/{JPEGImages/<id>.jpg,
    Annotations/<id>.xml, ImageSets/Main/{train,val,test}.txt}. Each image holds 1–3 objects of random classes
    (some marked ``<difficult>1</difficult>``); its shade is :func:`shade` of its first object's class mod 6. Returns,
    per split, (multi-hot float N×20, difficult-only bool N×20, shade classes) in the order of the split's list."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    per_split = per_split or {"train": 12, "val": 10, "test": 10}
    out, next_id = {}, 1
    for split, n in per_split.items():
        ids, shades, present, easy = [], [], np.zeros((n, 20), bool), np.zeros((n, 20), bool)
        for i in range(n):
            name = f"{next_id:06d}"
            next_id += 1
            objects = [(int(c), bool(rng.random() < 0.3)) for c in rng.integers(0, 20, rng.integers(1, 4))]
            shades.append(objects[0][0] % 6)
            _jpg(base / "JPEGImages" / f"{name}.jpg", shades[-1])
            xml = "".join(f"<object><name>{VOC_FAKE_CLASSES[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                          f"<difficult>{int(d)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                          f"<ymax>5</ymax></bndbox></object>" for c, d in objects)
            (base / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><size><width>{WIDTH}</width>"
                f"<height>{HEIGHT}</height><depth>3</depth></size><segmented>0</segmented>{xml}</annotation>")
            for c, d in objects:
                present[i, c] = True
                easy[i, c] |= not d
            ids.append(name)
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))
        out[split] = (present.astype(np.float32), present & ~easy, shades)
    return out


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "stl10": write_stl10,
           "flowers102": write_flowers102, "dtd": write_dtd, "pets": write_pets, "aircraft": write_aircraft,
           "food101": write_food101, "caltech101": write_caltech101, "cars": write_cars, "sun397": write_sun397,
           "cub200": write_cub200}


# ---- pretext folders and task folders -----------------------------------------------------------------

def noise_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """uint8 n×side×side×3 of random pixels: images that differ, so an order or a mix-up shows."""
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def write_image_folder(root: Path, n: int = 12, side: int = 16) -> list[np.ndarray]:
    """A pretext folder: ``n`` lossless PNGs of random pixels at several depths (and a text file and an
    upper-case extension, which a listing must handle); returns the images in the folder's sorted order."""
    images = noise_images(n, side)
    names = []
    for i, img in enumerate(images):
        rel = Path(*[f"d{j}" for j in range(i % 3)]) / f"img{i:03d}.{'PNG' if i % 4 == 0 else 'png'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        names.append(str(rel))
    (root / "README.txt").write_text("not an image")
    return [images[i] for i in sorted(range(n), key=lambda i: names[i])]


def write_imagenet(root: Path, wnids=("n01440764", "n01443537"), per_class: int = 3) -> int:
    """ImageNet's train folder layout, <root>/imagenet/train/<wnid>/<wnid>_<n>.JPEG; returns the count."""
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            _jpg(root / "imagenet" / "train" / wnid / f"{wnid}_{i}.JPEG", c)
    return len(wnids) * per_class


TASK_CLASSES = ("cat", "dog", "emu")


def write_task_folder(root: Path, *, train: int = 10, test: int = 3, val: int | None = None) -> dict:
    """A downstream task of one's own in ImageFolder layout, <root>/{train,test[,val]}/<class>/<n>.jpg,
    ``train``/``test``/``val`` images per class; returns {split: labels}. The test folder lacks nothing,
    but its class folders are written in reverse order (the numbering must come from train/)."""
    out = {}
    for split, per in (("train", train), ("test", test), ("val", val)):
        if per is None:
            continue
        classes = TASK_CLASSES if split == "train" else TASK_CLASSES[::-1]
        for name in classes:
            for i in range(per):
                _jpg(root / split / name / f"{split}_{i}.jpg", TASK_CLASSES.index(name))
        out[split] = sorted(c for c in range(len(TASK_CLASSES)) for _ in range(per))
    return out
