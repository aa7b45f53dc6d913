"""Data at any scale: the streamed pretext sets (STL10, CIFAR, ImageNet, a folder of images) and the
downstream data of one's own (task folders, registered datasets), on files in each reader's real layout
(tests/fake_datasets.py)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from torchvision.transforms.v2 import functional as F

from bissl_kit import data
from bissl_kit.config import ConfigError
from bissl_kit.data import DataNotFoundError, load_downstream, load_pretext
from bissl_kit.data.pretext import StepBatches, StreamedImages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_datasets import (TASK_CLASSES, shade, write_cifar10, write_image_folder, write_imagenet,  # noqa: E402
                           write_stl10, write_task_folder)

KW = dict(search=[], download=False)


def exists_only(fpath, md5=None):  # torchvision's md5 check of the official archives, relaxed (test_data.py)
    import os
    return os.path.isfile(fpath)


# ---- the streamed pretext sets -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [96, 32])
def test_stl10_unlabeled_streams_torchvision_readers_images(tmp_path, monkeypatch, size):
    write_stl10(tmp_path, unlabeled=7)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", exists_only)
    ref = torchvision.datasets.STL10(str(tmp_path), split="unlabeled")  # the oracle: how torchvision reads it
    want = torch.from_numpy(ref.data)
    if size != 96:
        want = F.center_crop(F.resize(want, size, antialias=True), [size, size])
    ds = load_pretext("stl10", root=tmp_path, image_size=size, **KW)
    assert isinstance(ds, StreamedImages) and len(ds) == 7 and ds.shape == (7, 3, size, size)
    assert torch.equal(ds[torch.arange(7)], want)
    both = load_pretext("stl10+train", root=tmp_path, image_size=size, **KW)
    train = torch.from_numpy(torchvision.datasets.STL10(str(tmp_path), split="train").data)
    if size != 96:
        train = F.center_crop(F.resize(train, size, antialias=True), [size, size])
    assert len(both) == 7 + 20 and torch.equal(both[torch.arange(27)], torch.cat([want, train]))


def test_cifar10_pretext_is_its_train_images(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists_only)
    ds = load_pretext("cifar10", root=tmp_path, image_size=16, **KW)
    assert len(ds) == len(written["train"]) == 50
    batch = ds[torch.arange(50)]
    assert batch.shape == (50, 3, 16, 16) and batch.dtype == torch.uint8
    assert batch.float().mean((1, 2, 3)).tolist() == [shade(y) for y in written["train"]]


def test_imagenet_train_folder_streams_every_image(tmp_path):
    n = write_imagenet(tmp_path)
    ds = load_pretext("imagenet", root=tmp_path, image_size=16, **KW)
    assert len(ds) == n
    means = ds[torch.arange(n)].float().mean((1, 2, 3))
    assert torch.allclose(means, torch.tensor([shade(0)] * 3 + [shade(1)] * 3, dtype=torch.float), atol=4)
    with pytest.raises(DataNotFoundError, match="imagenet/train/<wnid>"):
        load_pretext("imagenet", root=tmp_path / "imagenet", image_size=16, **KW)


def test_image_folder_at_any_depth_gives_the_written_images_in_sorted_order(tmp_path):
    want = torch.from_numpy(np.stack(write_image_folder(tmp_path / "pics"))).permute(0, 3, 1, 2)
    ds = load_pretext(str(tmp_path / "pics"), image_size=16)
    assert len(ds) == 12 and torch.equal(ds[torch.arange(12)], want)  # PNG: lossless, and 16 px already
    assert torch.equal(StreamedImages("x", ds.source, 16, "", workers=3)[torch.arange(12)], want)  # threads alike


def test_image_folder_errors_name_the_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match="no image files .* at any depth"):
        load_pretext(str(tmp_path / "empty"), image_size=16)
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        load_pretext(str(tmp_path / "missing"), image_size=16)
    from bissl_kit.pretrain import PretrainConfig
    with pytest.raises(ConfigError, match=r"pretext_dataset='stl' .* stl10\+train, .* './stl'"):
        PretrainConfig(pretext_dataset="stl")


def test_streamed_sets_hold_no_decoded_image(tmp_path):
    """Memory stays bounded: what the loader's workers receive is file names or a memory map's path."""
    write_stl10(tmp_path, unlabeled=50)
    write_image_folder(tmp_path / "pics", n=40)
    for name in ("stl10", str(tmp_path / "pics")):
        ds = load_pretext(name, root=tmp_path, image_size=16, **KW)
        ds[torch.arange(len(ds))]  # touched everything once
        held = pickle.dumps(ds.source)
        assert len(held) < 8_000, (name, len(held))  # 50 images at 96 px would be 1.4 MB, 40 PNGs 30 KB
        assert not any(isinstance(v, torch.Tensor) for v in vars(ds.source).values())


# ---- the training loader: order from the seed, resumable mid-epoch --------------------------------------

def order_of(seed, epoch_len, batch):
    def indices_of(step):
        epoch, i = divmod(step, epoch_len)
        perm = torch.randperm(epoch_len * batch, generator=torch.Generator().manual_seed(seed * 100 + epoch))
        return perm[i * batch:(i + 1) * batch]
    return indices_of


@pytest.mark.parametrize("workers", [0, 2])
def test_step_batches_stream_the_in_memory_batches_and_restart_anywhere(tmp_path, workers):
    write_image_folder(tmp_path / "pics", n=12)
    ds = load_pretext(str(tmp_path / "pics"), image_size=16)
    memory = ds[torch.arange(12)]
    indices_of = order_of(3, 4, 3)
    streamed = StepBatches(ds, indices_of, stop=10, workers=workers)
    sliced = StepBatches(memory, indices_of, stop=10)
    try:
        got = [streamed.get(s) for s in range(6)]
        assert all(torch.equal(g, sliced.get(s)) for s, g in enumerate(got))
        assert torch.equal(streamed.get(9), memory[indices_of(9)])  # out of sequence: a resume at step 9
        assert torch.equal(streamed.get(2), got[2])  # and back
        with pytest.raises(IndexError):
            streamed.get(10)
    finally:
        streamed.close()


@pytest.fixture
def folder_pretrain(tmp_path):
    from bissl_kit.pretrain import PretrainConfig
    write_image_folder(tmp_path / "pics", n=24)
    write_task_folder(tmp_path / "task", train=4, test=2)
    return PretrainConfig(pretext_dataset=str(tmp_path / "pics"), eval_dataset=str(tmp_path / "task"), image_size=16,
                          steps=5, batch_size=8, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, knn_every=0,
                          knn_k=3, checkpoint_every=2, loader_workers=1, progress=False, device="cpu",
                          out_dir=str(tmp_path / "pre"))


def test_pretraining_on_a_folder_is_seeded_and_resumes_to_the_same_weights(folder_pretrain, tmp_path):
    from bissl_kit.pretrain import Pretrainer
    full = Pretrainer(folder_pretrain)
    list(full.run())
    first = Pretrainer(folder_pretrain.replace(out_dir=str(tmp_path / "cut"), loader_workers=0))
    for rec in first.run():
        if rec.get("step") == 3 and "loss" in rec:
            break  # the last checkpoint is step 2: the resumed loader starts mid-epoch (3 batches an epoch)
    first.batches.close()
    resumed = Pretrainer(folder_pretrain.replace(out_dir=str(tmp_path / "cut")))
    assert resumed.step == 2
    list(resumed.run())
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the streamed batches are the in-memory ones: the same indices into the decoded set
    images = full.images[torch.arange(len(full.images))]
    assert torch.equal(full.batch(4), images[full.batch_indices(4)])
    full.batches.close()
