"""Datasets for BiSSL: the pretext images, the downstream splits, and a deterministic batch iterator.

Protocols (the sizes are pinned by tests/test_data.py):

* **Pretext** (labels unused): by default the 60,000 Fashion-MNIST *training* images, uint8 N×1×28×28 in
  memory; also ``stl10`` (100k unlabeled), ``stl10+train`` (the paper's 105k), ``cifar10``/``cifar100``
  (train), ``imagenet`` (``<root>/imagenet/train/<wnid>/*.JPEG``) and any folder of images given as a path,
  all streamed (:mod:`~bissl_kit.data.pretext`: decoded in DataLoader workers, in the run's seeded order).
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
  - cars, cub200 (their official lists), sun397 (official partition 1): 20 % of each class of the
    official train → val; test = the official test.
  - a task folder given as a path (``<dir>/{train,test}[,val]/<class>/<image>``): val/ when there, else
    carved from train/ like the others; a registered dataset (:func:`register_dataset`): its loader's
    splits, val carved from train when the loader gives none.

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

Modules: :mod:`~bissl_kit.data.registry` (the datasets, where files are looked for, the errors,
:func:`register_dataset` / :func:`register_from` and the live name check of the configs),
:mod:`~bissl_kit.data.folders` (image folders and task folders), :mod:`~bissl_kit.data.pretext` (the
streamed pretext sets and their training loader), :mod:`~bissl_kit.data.more_readers` (CUB-200-2011,
SUN397's partition),
:mod:`~bissl_kit.data.fashion_mnist` (finding, installing and reading Fashion-MNIST),
:mod:`~bissl_kit.data.splits` (the split rules), :mod:`~bissl_kit.data.readers` (:class:`Split`, the
torchvision readers, :func:`load_pretext`, :func:`load_downstream`), :mod:`~bissl_kit.data.batches`
(:func:`iterate_batches`) and ``__main__`` (the ``prepare`` command). docs/data.md is the user's guide.
The constants re-exported here are copies: to change one in a test, patch the module that reads it (e.g.
``bissl_kit.data.registry.REPO_ROOT``, which :func:`data_roots` reads at each call).
"""

from __future__ import annotations

from .batches import iterate_batches
from .fashion_mnist import (DEBIAN_DIR, DEBIAN_PACKAGE, FMNIST_FILES, FMNIST_SIZES, find_fashion_mnist,
                            prepare_fashion_mnist)
from .folders import FOLDER_LAYOUT, IMAGE_EXTENSIONS
from .pretext import STREAMED_PRETEXT, StepBatches, StreamedImages, pretext_fingerprint
from .readers import MIN_IMAGE_SIZE, Split, fingerprint, load_downstream, load_pretext
from .registry import (ENV_VAR, PRETEXT_DATASETS, REPO_ROOT, SPLITS, DataCorruptError, DataNotFoundError, DatasetInfo,
                       DATASETS, check_dataset_name, data_roots, is_path, register_dataset, register_from,
                       register_from_env, registration_of)
from .splits import CALTECH_TRAINVAL_PER_CLASS, DIGITS_TEST_FRACTION, SPLIT_SEED, VAL_FRACTION

__all__ = [
    "DATASETS", "PRETEXT_DATASETS", "SPLITS", "DatasetInfo", "DataNotFoundError", "DataCorruptError",
    "data_roots", "find_fashion_mnist", "prepare_fashion_mnist", "load_pretext", "load_downstream", "Split", "fingerprint",
    "iterate_batches", "register_dataset", "register_from", "register_from_env", "registration_of", "check_dataset_name",
    "is_path", "ENV_VAR", "FOLDER_LAYOUT", "IMAGE_EXTENSIONS", "STREAMED_PRETEXT", "StreamedImages", "StepBatches",
    "pretext_fingerprint",
    "REPO_ROOT", "DEBIAN_DIR", "DEBIAN_PACKAGE", "FMNIST_FILES", "FMNIST_SIZES", "MIN_IMAGE_SIZE",
    "SPLIT_SEED", "VAL_FRACTION", "DIGITS_TEST_FRACTION", "CALTECH_TRAINVAL_PER_CLASS",
]
