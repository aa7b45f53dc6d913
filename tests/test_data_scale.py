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


# ---- downstream data of one's own: task folders --------------------------------------------------------

def counts(labels):
    return np.bincount(np.asarray(labels), minlength=len(TASK_CLASSES)).tolist()


def test_task_folder_without_val_carves_it_from_train_by_the_kit_rule(tmp_path):
    write_task_folder(tmp_path / "task", train=10, test=3)
    name = str(tmp_path / "task")
    splits = {s: load_downstream(name, s, image_size=16) for s in data.SPLITS}
    assert {s: counts(d.labels) for s, d in splits.items()} == {"train": [8] * 3, "val": [2] * 3, "test": [3] * 3}
    assert not set(splits["train"].indices.tolist()) & set(splits["val"].indices.tolist())
    for d in splits.values():  # the image is the one written for its label, numbered as in train/
        m = d.materialize()
        assert m.images.shape[1:] == (3, 16, 16) and m.num_classes == 3
        assert torch.allclose(m.images.float().mean((1, 2, 3)), torch.tensor([float(shade(y)) for y in m.labels]), atol=4)
    few = load_downstream(name, "train", image_size=16, labels_per_class=2, seed=1)
    assert counts(few.labels) == [2] * 3 and set(few.indices.tolist()) <= set(splits["train"].indices.tolist())


def test_task_folder_with_val_takes_it_whole(tmp_path):
    write_task_folder(tmp_path / "task", train=4, test=2, val=3)
    sizes = {s: counts(load_downstream(str(tmp_path / "task"), s, image_size=16).labels) for s in data.SPLITS}
    assert sizes == {"train": [4] * 3, "val": [3] * 3, "test": [2] * 3}


def test_task_folder_errors_name_the_layout(tmp_path):
    write_task_folder(tmp_path / "task", train=2, test=1)
    (tmp_path / "task" / "test" / "yak").mkdir()
    from fake_datasets import _jpg
    _jpg(tmp_path / "task" / "test" / "yak" / "y.jpg", 0)
    with pytest.raises(DataNotFoundError, match="classes that train/ lacks: yak"):
        load_downstream(str(tmp_path / "task"), "test", image_size=16)
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match=r"(?s)half/test is not a folder.*ImageFolder layout"):
        load_downstream(str(tmp_path / "half"), "train", image_size=16)


def test_a_task_is_a_name_or_a_path_and_colon_only_starts_the_labels_suffix(tmp_path):
    from bissl_kit.compare import parse_task
    from bissl_kit.finetune import FinetuneConfig
    assert parse_task("data/mine:5") == ("data/mine", 5) and parse_task("./mine") == ("./mine", None)
    with pytest.raises(ConfigError, match="more than one ':'"):
        parse_task("data/a:b:5")
    with pytest.raises(ConfigError, match="unknown dataset 'mine'"):
        parse_task("mine:5")
    with pytest.raises(ConfigError, match=r"downstream='mine' .* './mine'"):
        FinetuneConfig(downstream="mine")


# ---- registered datasets: at any time, and recorded so the command reruns ------------------------------

BLOBS = '''
import torch
from bissl_kit.data import register_dataset


def load(split, root, image_size):
    if split == "val":
        return None  # carved from train by the kit's rule
    n = 15 if split == "train" else 6
    labels = torch.arange(n) % 3
    noise = torch.randint(0, 30, (n, 3, 20, 24), generator=torch.Generator().manual_seed(n))
    return (labels[:, None, None, None] * 90 + noise).to(torch.uint8), labels


def register():
    register_dataset("blobs", load, num_classes=3, layout="made in memory by blobs_mod.load")
'''


@pytest.fixture
def blobs(tmp_path, monkeypatch):
    """A module that registers 'blobs'; the registry is restored afterwards."""
    from bissl_kit.data import registry
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "blobs_mod.py").write_text(BLOBS)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))
    monkeypatch.setattr(data, "DATASETS", registry.DATASETS)
    monkeypatch.setattr(registry, "_REGISTERED_BY", [])
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    yield tmp_path / "mods"
    sys.modules.pop("blobs_mod", None)


def test_registration_after_import_is_seen_by_every_config(blobs, monkeypatch):
    from bissl_kit.bissl import BisslConfig
    from bissl_kit.finetune import FinetuneConfig
    with pytest.raises(ConfigError, match="register_dataset"):
        FinetuneConfig(downstream="blobs")
    monkeypatch.setenv(data.ENV_VAR, "blobs_mod:register")  # $BISSL_DATASETS is read when a name is checked
    assert FinetuneConfig(downstream="blobs").downstream == BisslConfig(downstream="blobs").downstream == "blobs"
    assert data.registration_of("blobs") == "blobs_mod:register"
    splits = {s: load_downstream("blobs", s, image_size=16) for s in data.SPLITS}
    assert {s: counts(d.labels) for s, d in splits.items()} == {"train": [4] * 3, "val": [1] * 3, "test": [2] * 3}
    assert splits["val"].images.shape == (3, 3, 16, 16)  # shorter side to 16, centre crop
    with pytest.raises(ConfigError, match="cannot import 'nope:register'"):
        data.register_from("nope:register")


def test_registration_rejects_bad_names_and_bad_splits(blobs):
    with pytest.raises(ValueError, match="built-in dataset"):
        data.register_dataset("cifar10", lambda *a: None, num_classes=10)
    with pytest.raises(ValueError, match="without '/' or ':'"):
        data.register_dataset("my/set", lambda *a: None, num_classes=10)
    data.register_dataset("bad", lambda split, root, size: (torch.zeros(4, 3, 8, 8), torch.zeros(4)), num_classes=2)
    with pytest.raises(data.DataCorruptError, match="uint8 N×3×H×W"):
        load_downstream("bad", "train", image_size=8)
    assert data.registration_of("bad") is None  # by hand: nothing to rerun it with


# ---- end to end: one's own images and task through the command line, and a notebook --------------------

@pytest.fixture
def chain(tmp_path, blobs, monkeypatch):
    """pretrain on a folder of images → BiSSL on a task folder and on a registered set → compare, through the
    command line's main (in this process, so the registration is made from $BISSL_DATASETS)."""
    from bissl_kit.__main__ import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(data.ENV_VAR, "blobs_mod:register")
    write_image_folder(tmp_path / "pics", n=24)
    write_task_folder(tmp_path / "task", train=6, test=2)
    common = ["--device", "cpu", "--progress", "false"]
    assert main(["pretrain", "--pretext-dataset", "pics/", "--eval-dataset", "./task", "--image-size", "16",
                 "--width", "4", "--proj-hidden", "16", "--proj-dim", "8", "--steps", "3", "--batch-size", "8",
                 "--warmup-steps", "1", "--knn-every", "0", "--knn-k", "3", "--loader-workers", "1",
                 "--out-dir", "runs/pre", *common]) == 0
    for task, out in (("./task", "runs/bissl_task"), ("blobs", "runs/bissl_blobs")):
        assert main(["bissl", "--pretrain-checkpoint", "runs/pre/checkpoint.pt", "--downstream", task, "--stages", "1",
                     "--lower-steps", "2", "--upper-steps", "1", "--lower-batch-size", "8", "--upper-batch-size", "4",
                     "--head-warmup-epochs", "1", "--loader-workers", "2", "--out-dir", out, *common]) == 0
    return tmp_path


def test_own_images_and_tasks_run_pretrain_bissl_finetune_compare_and_the_recorded_command_reruns(chain, capsys):
    import json
    import os
    import shlex
    import subprocess
    from bissl_kit.__main__ import main
    assert main(["finetune", "--backbone-checkpoint", "runs/bissl_task/checkpoint.pt", "--downstream", "./task",
                 "--epochs", "1", "--batch-size", "4", "--out-dir", "runs/ft", "--device", "cpu", "--progress",
                 "false"]) == 0
    assert "val top-1" in capsys.readouterr().out
    argv = ["compare", "--pretrain-checkpoint", "runs/pre/checkpoint.pt", "--tasks", "./task", "blobs",
            "--bissl-runs", "runs/bissl_task", "runs/bissl_blobs", "--trials", "1", "--seeds", "1", "--epochs", "1",
            "--batch-size", "4", "--probe", "false", "--out-dir", "runs/cmp", "--device", "cpu", "--progress", "false"]
    assert main(argv) == 0
    results = json.loads((chain / "runs/cmp/comparison.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["./task", "blobs"]
    assert results["registrations"] == {"blobs": "blobs_mod:register"}
    words = shlex.split(results["command"])
    assert words[:5] == ["python", "-m", "bissl_kit", "compare", "--register"] and words[5] == "blobs_mod:register"
    env = {k: v for k, v in os.environ.items() if k != data.ENV_VAR}  # a fresh shell: no $BISSL_DATASETS
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(chain / "mods")])
    again = subprocess.run([sys.executable, *words[1:]], cwd=chain, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((chain / "runs/cmp/comparison.json").read_text())["tasks"] == results["tasks"]


@pytest.mark.slow
def test_a_task_folder_runs_through_the_finetune_notebook_with_papermill_parameters(tmp_path):
    import json
    from bissl_kit.notebooks import execute
    from bissl_kit.pretrain import PretrainConfig, pretrain
    write_image_folder(tmp_path / "pics", n=16)
    write_task_folder(tmp_path / "task", train=5, test=2)
    pretrain(PretrainConfig(pretext_dataset=str(tmp_path / "pics"), eval_dataset=str(tmp_path / "task"), image_size=16,
                            width=4, proj_hidden=16, proj_dim=8, steps=2, batch_size=8, warmup_steps=1, knn_every=0,
                            knn_k=3, loader_workers=0, progress=False, device="cpu", out_dir=str(tmp_path / "pre")))
    out = execute("03_finetune", {"backbone_checkpoint": str(tmp_path / "pre" / "checkpoint.pt"),
                                  "downstream": str(tmp_path / "task"), "epochs": 1, "batch_size": 4,
                                  "out_dir": str(tmp_path / "ft"), "figures_dir": str(tmp_path / "fig")},
                  output_dir=tmp_path / "executed")
    text = json.dumps(json.loads(out.read_text())["cells"])
    assert str(tmp_path / "task") in text and "Error" not in text.replace("StdErr", "")
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["downstream"] == str(tmp_path / "task")
