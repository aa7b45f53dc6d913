"""Reliability (issue 9): bad input fails early and clearly, divergence stops with its place named and the
last good checkpoint intact, a run killed with SIGKILL resumes to the same bits, and a seed reproduces a stage.

Every bad-input case asserts the error type; that the message names the field, the bad value and what is
allowed; that no backward pass ran before it (no training work); and that no file of the existing run
directories (one real run of every stage, built once for the module) or of the case's own folder changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from bissl_kit.__main__ import main as cli_main
from bissl_kit.bissl import BisslConfig, build_trainer
from bissl_kit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bissl_kit.compare import CompareConfig, run_comparison
from bissl_kit.config import ConfigError
from bissl_kit.data import DataCorruptError
from bissl_kit.features import FeaturesConfig
from bissl_kit.backbones import load_backbone
from bissl_kit.finetune import FinetuneConfig, Finetuner
from bissl_kit.notebooks import NotebookParameters
from bissl_kit.notebooks import main as notebooks_main
from bissl_kit.pretrain import PretrainConfig, Pretrainer, load_pretrained, pretext_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_datasets import write_dtd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FMNIST_RAW = REPO / "data" / "FashionMNIST" / "raw"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the tiniest run of every stage ------------------------------------------------------------------------

def tiny_pretrain(out_dir, **kw) -> PretrainConfig:
    base = dict(steps=4, batch_size=16, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, image_size=8,
                knn_every=0, knn_bn="running", checkpoint_every=2, progress=False, device="cpu", out_dir=str(out_dir))
    return PretrainConfig(**{**base, **kw})


def tiny_bissl(pretrain_checkpoint, out_dir, **kw) -> BisslConfig:
    base = dict(pretrain_checkpoint=str(pretrain_checkpoint), stages=1, lower_steps=1, upper_steps=1,
                lower_batch_size=16, upper_batch_size=16, head_warmup_epochs=1, progress=False, device="cpu",
                out_dir=str(out_dir))
    return BisslConfig.embedded(**{**base, **kw})


def tiny_finetune(backbone_checkpoint, out_dir, **kw) -> FinetuneConfig:
    base = dict(backbone_checkpoint=str(backbone_checkpoint), labels_per_class=5, epochs=1, batch_size=32,
                test=False, progress=False, device="cpu", checkpoint_every=1, out_dir=str(out_dir))
    return FinetuneConfig(**{**base, **kw})


@dataclass
class Workspace:
    root: Path

    @property
    def pre(self) -> Path:
        return self.root / "pretrain" / "checkpoint.pt"

    @property
    def pre8(self) -> Path:
        return self.root / "pretrain_w8" / "checkpoint.pt"

    @property
    def bissl(self) -> Path:
        return self.root / "bissl" / "checkpoint.pt"

    @property
    def ft(self) -> Path:
        return self.root / "ft" / "checkpoint.pt"

    def bissl_cfg(self, **kw) -> BisslConfig:
        return tiny_bissl(kw.pop("pretrain_checkpoint", self.pre), self.root / "bissl", **kw)

    def ft_cfg(self, **kw) -> FinetuneConfig:
        return tiny_finetune(kw.pop("backbone_checkpoint", self.pre), self.root / "ft", **kw)

    def cmp_cfg(self, **kw) -> CompareConfig:
        base = dict(pretrain_checkpoint=str(self.pre), tasks=("digits",), bissl_runs=(str(self.root / "bissl"),),
                    arms=("baseline",), trials=1, seeds=1, epochs=1, batch_size=32, probe=False, device="cpu",
                    progress=False, out_dir=str(self.root / "cmp"))
        return CompareConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """Finished runs of every stage: the earlier work that no bad input may overwrite."""
    w = Workspace(tmp_path_factory.mktemp("ws"))
    list(Pretrainer(tiny_pretrain(w.root / "pretrain")).run())
    list(Pretrainer(tiny_pretrain(w.root / "pretrain_w8", width=8, steps=2)).run())
    list(build_trainer(w.bissl_cfg()).run())
    list(Finetuner(w.ft_cfg()).run())
    run_comparison(w.cmp_cfg())
    assert (w.root / "cmp" / "comparison.json").exists()
    return w


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file added, removed or changed shows up)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def backward_calls(monkeypatch):
    """Every backward pass and autograd.grad call (training work), counted; the real ones still run."""
    calls = []
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

    def backward(*a, **k):
        calls.append("backward")
        return real_backward(*a, **k)

    def grad(*a, **k):
        calls.append("grad")
        return real_grad(*a, **k)

    monkeypatch.setattr(torch.autograd, "backward", backward)
    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


# ---- helpers that build bad inputs on disk ------------------------------------------------------------------

def truncated_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def fmnist_root(tmp: Path, *, truncate: str | None = None, side: int = 28) -> Path:
    """A data root with the four Fashion-MNIST files: real ones, one of them cut short, or train images
    rewritten at ``side`` × ``side`` pixels (a valid IDX file of the wrong image size)."""
    raw = tmp / "fmnist" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FMNIST_RAW.iterdir():
        if f.name == truncate:
            (raw / f.name).write_bytes(f.read_bytes()[:100_000])
        elif f.name == "train-images-idx3-ubyte" and side != 28:
            header = np.array([0x803, 60_000, side, side], dtype=">i4").tobytes()
            (raw / f.name).write_bytes(header + bytes(60_000 * side * side))
        else:
            shutil.copy(f, raw / f.name)
    return tmp / "fmnist"


def dtd_root(tmp: Path, *, drop: str | None = None) -> Path:
    root = tmp / "paper"
    write_dtd(root)
    if drop:
        (root / "dtd" / "dtd" / drop).unlink()
    return root


def pretrain_on(ws, data_root: Path) -> Callable[[], object]:
    return partial(Pretrainer, tiny_pretrain(ws.root / "pretrain", data_root=str(data_root)))


def resume_truncated_bissl(ws, tmp: Path) -> Callable[[], object]:
    """A copy of the finished BiSSL run whose checkpoint was cut short (a damaged disk, a bad copy)."""
    run = tmp / "b"
    shutil.copytree(ws.root / "bissl", run)
    truncated_copy(ws.bissl, run / "checkpoint.pt")
    return partial(build_trainer, tiny_bissl(ws.pre, run))


class CLIFailed(Exception):
    """A ``python -m bissl_kit`` subprocess exited with a non-zero status (the message is its stderr)."""

    def __init__(self, returncode, stderr):
        super().__init__(stderr)
        self.returncode = returncode


def cli_subprocess(tmp: Path, *args) -> Callable[[], None]:
    def run():
        out = subprocess.run([sys.executable, "-m", "bissl_kit", *map(str, args)], cwd=tmp, capture_output=True, check=False,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode != 0:
            raise CLIFailed(out.returncode, out.stderr)
    return run


def cli(*argv) -> Callable[[], None]:
    return lambda: cli_main([str(a) for a in argv])


def notebook(cls, extras=(), **values) -> Callable[[], None]:
    """What a notebook's first cells do with papermill's injected parameters."""
    def run():
        ns = {"cls": cls}
        params = NotebookParameters(ns)
        ns.update(params=params, live=False, **values)
        params.config(cls, extras=("live", *extras))
    return run


# ---- the matrix ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    make: Callable[[Workspace, Path], Callable[[], object]]
    error: type
    needles: tuple[str, ...]  # the field, the value and what is allowed, each a substring of the message


def config(cls, **kw):
    return lambda ws, tmp: (lambda: cls(**kw))


CASES = [
    # -- PretrainConfig
    Case("pretrain-image-size", config(PretrainConfig, image_size=4), ConfigError,
         ("image_size=4 is out of range", "image_size must be >= 8 and <= 512",)),
    Case("pretrain-width", config(PretrainConfig, width=0), ConfigError, ("width=0", "width must be >= 1")),
    Case("pretrain-batch-1", config(PretrainConfig, batch_size=1), ConfigError,
         ("batch_size=1 is out of range", "batch_size must be >= 2")),
    Case("pretrain-temperature", config(PretrainConfig, temperature=0.0), ConfigError,
         ("temperature=0.0", "temperature must be > 0")),
    Case("pretrain-flip-p", config(PretrainConfig, flip_p=1.5), ConfigError, ("flip_p=1.5", "flip_p must be >= 0 and <= 1")),
    Case("pretrain-knn-every", config(PretrainConfig, knn_every=-1), ConfigError, ("knn_every=-1", "must be >= 0")),
    Case("pretrain-eval-dataset", config(PretrainConfig, eval_dataset="mnist"), ConfigError,
         ("eval_dataset='mnist' is not allowed", "one of 'digits', 'fashion_mnist'", "the path of a task folder")),
    Case("pretrain-unknown-pretext", config(PretrainConfig, pretext_dataset="digits"), ConfigError,
         ("pretext_dataset='digits' is not allowed", "one of fashion_mnist, stl10", "path of a folder of images")),
    Case("pretrain-crop-zero", config(PretrainConfig, crop_scale=(0.0, 1.0)), ConfigError,
         ("crop_scale=(0.0, 1.0)", "0 < low <= high <= 1")),
    Case("pretrain-momentum", config(PretrainConfig, momentum=1.0), ConfigError, ("momentum=1.0", "< 1")),
    # -- BisslConfig
    Case("bissl-gamma", config(BisslConfig, gamma=-1.0), ConfigError, ("gamma=-1.0 is out of range", "gamma must be >= 0")),
    Case("bissl-upper-steps", config(BisslConfig, upper_steps=-1), ConfigError,
         ("upper_steps=-1", "upper_steps must be >= 0")),
    Case("bissl-solver-rtol", config(BisslConfig, solver_rtol=0.0), ConfigError, ("solver_rtol=0.0", "solver_rtol must be > 0")),
    Case("bissl-hessian-batches", config(BisslConfig, hessian_batches=0), ConfigError,
         ("hessian_batches=0", "hessian_batches must be >= 1")),
    Case("bissl-hessian-lower", config(BisslConfig, hessian_batch="lower", hessian_batches=3, lower_steps=2),
         ConfigError, ("hessian_batches=3 exceeds lower_steps=2", "hessian_batch='lower'")),
    Case("bissl-nonfinite", config(BisslConfig, nonfinite="ignore"), ConfigError,
         ("nonfinite='ignore' is not allowed", "one of 'raise', 'zero'")),
    Case("bissl-lower-batch-1", config(BisslConfig, lower_batch_size=1), ConfigError,
         ("lower_batch_size=1", "lower_batch_size must be >= 2")),
    Case("bissl-upper-clip", config(BisslConfig, upper_clip=0.0), ConfigError, ("upper_clip=0.0", "upper_clip must be > 0")),
    Case("bissl-preset-lam", lambda ws, tmp: (lambda: BisslConfig.paper_neurips(lam=0.0)), ConfigError,
         ("lam=0.0 is out of range", "lam must be > 0")),
    Case("bissl-unknown-downstream", config(BisslConfig, downstream="mnist"), ConfigError,
         ("downstream='mnist' is not allowed", "one of 'digits', 'fashion_mnist'")),
    # -- FinetuneConfig
    Case("finetune-batch-1", config(FinetuneConfig, batch_size=1), ConfigError, ("batch_size=1", "must be >= 2")),
    Case("finetune-momentum", config(FinetuneConfig, momentum=-0.1), ConfigError,
         ("momentum=-0.1", "momentum must be >= 0 and < 1")),
    Case("finetune-eval-every", config(FinetuneConfig, eval_every=-1), ConfigError, ("eval_every=-1", ">= 0")),
    Case("finetune-labels", config(FinetuneConfig, labels_per_class=0), ConfigError,
         ("labels_per_class=0", "labels_per_class must be >= 1")),
    # -- FeaturesConfig
    Case("features-stages", config(FeaturesConfig, stages=("pretrained", "imagenet")), ConfigError,
         ("stages=('pretrained', 'imagenet')", "each must be one of", "pretrained")),
    Case("features-umap-fit", config(FeaturesConfig, umap_fit="tsne"), ConfigError,
         ("umap_fit='tsne' is not allowed", "'aligned'")),
    Case("features-min-dist", config(FeaturesConfig, min_dist=2.0), ConfigError,
         ("min_dist=2.0 is out of range", "min_dist must be >= 0 and <= 1")),
    Case("features-labels-without-downstream", config(FeaturesConfig, labels_per_class=5), ConfigError,
         ("labels_per_class needs downstream",)),
    Case("features-max-points", config(FeaturesConfig, max_points=5), ConfigError,
         ("max_points=5", "max_points must be >= 10")),
    Case("features-unknown-downstream", config(FeaturesConfig, downstream="mnist"), ConfigError,
         ("downstream='mnist'", "must be one of 'digits'", "a dataset registered with")),
    # -- CompareConfig
    Case("compare-lr-range-zero", config(CompareConfig, lr_range=(0.0, 1.0)), ConfigError,
         ("lr_range=(0.0, 1.0) is out of range", "lr_range must be > 0")),
    Case("compare-seeds", config(CompareConfig, seeds=0), ConfigError, ("seeds=0", "seeds must be >= 1")),
    Case("compare-task-labels", config(CompareConfig, tasks=("fashion_mnist:0",)), ConfigError,
         ("tasks: 'fashion_mnist:0'", "int >= 1")),
    Case("compare-unknown-task", config(CompareConfig, tasks=("imagenet",)), ConfigError,
         ("tasks: 'imagenet'", "unknown dataset 'imagenet'", "digits, fashion_mnist")),
    # -- papermill parameters (the notebooks' parameters cell + injected cell)
    Case("notebook-02-unknown", lambda ws, tmp: notebook(BisslConfig, extras=("paper_mode",), stage=3), ConfigError,
         ("notebook parameters: unknown BisslConfig parameter(s): 'stage'", "did you mean 'stages'", "Known parameters")),
    Case("notebook-03-unknown", lambda ws, tmp: notebook(FinetuneConfig, epoch=3), ConfigError,
         ("unknown FinetuneConfig parameter(s): 'epoch'", "did you mean 'epochs'")),
    Case("notebook-04-unknown", lambda ws, tmp: notebook(FeaturesConfig, neighbours=5), ConfigError,
         ("unknown FeaturesConfig parameter(s): 'neighbours'", "Known parameters: runs_dir")),
    Case("notebook-05-unknown", lambda ws, tmp: notebook(CompareConfig, trial=3), ConfigError,
         ("unknown CompareConfig parameter(s): 'trial'", "did you mean 'trials'")),
    Case("notebook-01-type", lambda ws, tmp: notebook(PretrainConfig, steps="ten"), ConfigError,
         ("steps='ten' must be an integer",)),
    Case("notebook-series-unknown", lambda ws, tmp: (lambda: notebooks_main(["run", "06_extra"])), SystemExit,
         ("unknown notebook(s) ['06_extra']", "the series is 01_pretrain, 02_bilevel")),
    # -- the command line: real subprocesses, then main() in-process
    Case("cli-subprocess-lr", lambda ws, tmp: cli_subprocess(tmp, "pretrain", "--lr", "-1", "--out-dir", ws.root / "pretrain"),
         CLIFailed, ("lr=-1.0 is out of range", "lr must be > 0")),
    Case("cli-subprocess-unknown-option", lambda ws, tmp: cli_subprocess(tmp, "bissl", "--lamm", "0.1"), CLIFailed,
         ("unrecognized arguments: --lamm 0.1", "did you mean --lam?", "usage: python -m bissl_kit bissl")),
    Case("cli-unknown-option", lambda ws, tmp: cli("finetune", "--epcohs", 3), SystemExit,
         ("unrecognized arguments: --epcohs 3", "did you mean --epochs?")),
    Case("cli-subprocess-finetune-checkpoint-as-backbone",
         lambda ws, tmp: cli_subprocess(tmp, "finetune", "--backbone-checkpoint", ws.ft, "--device", "cpu",
                                        "--out-dir", ws.root / "ft2"),
         CLIFailed, ("finetune: error: backbone_checkpoint=", "'finetune' checkpoint",
                     "fine-tuning starts from a pre-training or a BiSSL run's checkpoint")),
    Case("cli-lr-range", lambda ws, tmp: cli("compare", "--lr-range", 1, 0.1), SystemExit,
         ("lr_range=(1.0, 0.1)", "low <= high")),
    Case("cli-nonfinite", lambda ws, tmp: cli("bissl", "--nonfinite", "nan"), SystemExit,
         ("nonfinite='nan' is not allowed", "one of 'raise', 'zero'")),
    Case("cli-config-file-unknown-key",
         lambda ws, tmp: (tmp.joinpath("c.json").write_text('{"lrr": 0.1}'), cli("pretrain", "--config", tmp / "c.json"))[1],
         SystemExit, ("unknown PretrainConfig parameter(s): 'lrr'", "did you mean 'lr'")),
    Case("cli-unknown-stage", lambda ws, tmp: cli("train"), SystemExit,
         ("invalid choice: 'train'", "'pretrain', 'bissl', 'finetune', 'compare'")),
    Case("cli-momentum", lambda ws, tmp: cli("finetune", "--momentum", 1), SystemExit,
         ("momentum=1.0 is out of range", "momentum must be >= 0 and < 1")),
    Case("cli-crop-scale-arity", lambda ws, tmp: cli("pretrain", "--crop-scale", 0.5), SystemExit,
         ("crop_scale=(0.5,)", "must have 2 elements")),
    Case("cli-bissl-from-bissl-checkpoint",
         lambda ws, tmp: cli("bissl", "--pretrain-checkpoint", ws.bissl, "--device", "cpu", "--out-dir", ws.root / "bissl"),
         SystemExit, ("pretrain_checkpoint=", "holds a 'bissl' checkpoint, expected 'pretrain'")),
    # -- data
    Case("data-truncated-fmnist", lambda ws, tmp: pretrain_on(ws, fmnist_root(tmp, truncate="train-images-idx3-ubyte")),
         DataCorruptError, ("Fashion-MNIST files in", "FashionMNIST/raw are unreadable", "python -m bissl_kit.data prepare")),
    Case("data-wrong-image-size", lambda ws, tmp: pretrain_on(ws, fmnist_root(tmp, side=14)),
         DataCorruptError, ("hold (60000, 14, 14) images", "expected (60000, 28, 28)")),
    Case("data-missing-dtd-labels",
         lambda ws, tmp: partial(Finetuner, ws.ft_cfg(downstream="dtd", labels_per_class=None,
                                                      data_root=str(dtd_root(tmp, drop="labels/train1.txt")))),
         DataCorruptError, ("dtd: torchvision's DTD cannot read", "train1.txt", "Expected layout")),
    Case("data-channels-bissl",
         lambda ws, tmp: partial(build_trainer, ws.bissl_cfg(downstream="dtd", data_root=str(dtd_root(tmp)),
                                                             upper_batch_size=4)),
         ConfigError, ("downstream='dtd' has 3 channels", "takes 1")),
    Case("data-channels-finetune",
         lambda ws, tmp: partial(Finetuner, ws.ft_cfg(downstream="dtd", labels_per_class=None,
                                                      data_root=str(dtd_root(tmp)))),
         ConfigError, ("downstream='dtd' has 3 channels", "takes 1")),
    Case("data-upper-batch-larger-than-train",
         lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(labels_per_class=5, upper_batch_size=64)),
         ConfigError, ("upper_batch_size=64 is larger than", "(50 items)", "upper_batch_size must be <= 50")),
    Case("data-lower-batch-larger-than-pretext",
         lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(lower_batch_size=100_000)),
         ConfigError, ("lower_batch_size=100000 is larger than", "lower_batch_size must be <= 60000")),
    Case("data-labels-per-class-too-many",
         lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(labels_per_class=200)),
         ConfigError, ("labels_per_class=200 is too large", "digits train: asked for 200 per class", "has only")),
    # -- checkpoints
    Case("ckpt-bissl-as-pretrain", lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(pretrain_checkpoint=str(ws.bissl))),
         CheckpointError, ("pretrain_checkpoint=", "holds a 'bissl' checkpoint, expected 'pretrain'")),
    Case("ckpt-truncated-pretrain",
         lambda ws, tmp: partial(build_trainer,
                                 ws.bissl_cfg(pretrain_checkpoint=str(truncated_copy(ws.pre, tmp / "cut.pt")))),
         CheckpointError, ("pretrain_checkpoint=", "unreadable or truncated", "it must be a pre-training run's checkpoint.pt")),
    Case("ckpt-missing-pretrain",
         lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(pretrain_checkpoint=str(tmp / "nope.pt"))),
         CheckpointError, ("pretrain_checkpoint=", "nope.pt' does not exist")),
    Case("ckpt-other-architecture",
         lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(pretrain_checkpoint=str(ws.pre8))),
         CheckpointError, ("is for another architecture", "width: checkpoint 4 vs model 8")),
    Case("ckpt-truncated-backbone",
         lambda ws, tmp: partial(Finetuner, tiny_finetune(truncated_copy(ws.bissl, tmp / "cut.pt"), tmp / "ft")),
         CheckpointError, ("backbone_checkpoint=", "unreadable or truncated")),
    Case("ckpt-truncated-resume",
         lambda ws, tmp: resume_truncated_bissl(ws, tmp),
         CheckpointError, ("checkpoint.pt' is unreadable or truncated", "delete it or point to another file")),
    Case("ckpt-finetune-into-bissl-run", lambda ws, tmp: lambda: Finetuner(tiny_finetune(ws.pre, ws.root / "bissl")),
         CheckpointError, ("holds a 'bissl' checkpoint, expected 'finetune'",)),
    Case("ckpt-pretrain-into-bissl-run", lambda ws, tmp: lambda: Pretrainer(tiny_pretrain(ws.root / "bissl")),
         CheckpointError, ("holds a 'bissl' checkpoint, expected 'pretrain'",)),
    Case("ckpt-compare-from-bissl", lambda ws, tmp: lambda: run_comparison(ws.cmp_cfg(pretrain_checkpoint=str(ws.bissl))),
         CheckpointError, ("pretrain_checkpoint=", "holds a 'bissl' checkpoint, expected 'pretrain'")),
    # -- a run or results folder from another config
    Case("run-bissl-other-config", lambda ws, tmp: lambda: build_trainer(ws.bissl_cfg(lam=0.5)), CheckpointError,
         ("holds a BiSSL run with another config", "lam: saved 0.001, now 0.5", "Choose another out_dir")),
    Case("run-finetune-other-config", lambda ws, tmp: lambda: Finetuner(ws.ft_cfg(lr=0.1)), CheckpointError,
         ("holds a fine-tuning run with another config", "lr: saved 0.05, now 0.1")),
    Case("run-finetune-other-backbone", lambda ws, tmp: lambda: Finetuner(ws.ft_cfg(backbone_checkpoint=str(ws.bissl))),
         CheckpointError, ("another config", "backbone_checkpoint: ", "bissl/checkpoint.pt", "their contents differ")),
    Case("results-compare-other-config", lambda ws, tmp: lambda: run_comparison(ws.cmp_cfg(epochs=2)), ConfigError,
         ("results_dir:", "comparison.json' holds the results of a comparison with another config",
          "epochs: saved 1, now 2")),
    Case("results-compare-other-search",
         lambda ws, tmp: lambda: run_comparison(ws.cmp_cfg(batch_size=16, results_dir=str(tmp / "results"))),
         ConfigError, ("out_dir:", "search.json' holds a search of a comparison with another config",
                       "batch_size: saved 32, now 16")),
    Case("results-compare-other-candidates",
         lambda ws, tmp: lambda: run_comparison(ws.cmp_cfg(search_seed=1, results_dir=str(tmp / "results"))),
         ConfigError, ("out_dir:", "the (lr, wd) candidates: search_seed, lr_range or wd_range differ")),
]


def test_the_matrix_is_big_and_its_ids_unique():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def assert_refused(case, ws, tmp_path, backward_calls, capsys) -> str:
    """Run a bad-input case: it raises its error (exit status 2 on the command line, no traceback from a
    subprocess), names every needle, starts no training work and leaves every file as it was; returns the
    message. Shared with tests/test_integrity.py."""
    run = case.make(ws, tmp_path)
    before = snapshot(ws.root, tmp_path)
    with pytest.raises(case.error) as err:
        run()
    if case.error is SystemExit:
        assert err.value.code == 2
        message = capsys.readouterr().err
    else:
        message = str(err.value)
        if case.error is CLIFailed:
            assert err.value.returncode == 2 and "Traceback" not in message
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert backward_calls == [], "training work started before the error"
    assert snapshot(ws.root, tmp_path) == before, "a file was written, changed or removed"
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_early_and_clearly_and_loses_nothing(case, ws, tmp_path, backward_calls, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative default paths (runs/...) land in the watched folder, not the repository
    assert_refused(case, ws, tmp_path, backward_calls, capsys)


# ---- divergence ---------------------------------------------------------------------------------------------

def run_until_error(records, path: Path):
    """Consume a run's records, remembering the checkpoint's bytes after each; return (error, last bytes)."""
    last = None
    with pytest.raises(FloatingPointError) as err:
        for _ in records:
            if path.exists():
                last = path.read_bytes()
    return err.value, last


def all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def test_pretraining_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # LARS at lr 1e6: the loss stays finite (BatchNorm), but the running variances overflow to Inf; a finite
    # loss must not let that state replace the last good checkpoint
    cfg = tiny_pretrain(tmp_path / "pre", steps=8, lr=1e6, checkpoint_every=1)
    error, last = run_until_error(Pretrainer(cfg).run(), tmp_path / "pre" / "checkpoint.pt")
    message = str(error)
    assert "pretrain checkpoint at step" in message and "not written: non-finite values" in message
    assert "running_var" in message and "is kept unchanged" in message
    assert last is not None and (tmp_path / "pre" / "checkpoint.pt").read_bytes() == last
    ckpt = load_checkpoint(tmp_path / "pre" / "checkpoint.pt", kind="pretrain")
    assert all_finite(ckpt) and 1 <= ckpt["step"] < 8
    load_pretrained(tmp_path / "pre" / "checkpoint.pt")


def test_bissl_divergence_names_stage_step_and_quantity_and_keeps_the_checkpoint(ws, tmp_path):
    # upper lr 1e30: stage 1 ends with finite (huge) parameters; stage 2's hypergradient overflows
    cfg = tiny_bissl(ws.pre, tmp_path / "b", stages=3, head_warmup_epochs=0, upper_lr=1e30)
    path = tmp_path / "b" / "checkpoint.pt"
    error, last = run_until_error(build_trainer(cfg).run(), path)
    assert str(error).startswith("hypergradient solve is non-finite at stage 2, upper step 1")
    assert last is not None and path.read_bytes() == last
    ckpt = load_checkpoint(path, kind="bissl")
    assert ckpt["step"] == 1 and all_finite(ckpt["state"])
    # a loss that diverges is named too (the head warm-up runs before any checkpoint: none is written)
    cfg = tiny_bissl(ws.pre, tmp_path / "warm", upper_lr=1e30)
    error, last = run_until_error(build_trainer(cfg).run(), tmp_path / "warm" / "checkpoint.pt")
    assert "head warm-up loss is nan at epoch 1, step" in str(error) and last is None
    assert not (tmp_path / "warm" / "checkpoint.pt").exists()


def test_bissl_nonfinite_zero_warns_counts_and_goes_on(ws, tmp_path):
    # λ + δ = 1e-300: A = I + H/(λ+δ) overflows in float32, so every solve is non-finite
    cfg = tiny_bissl(ws.pre, tmp_path / "z", lam=1e-300, damping=0.0, head_warmup_epochs=0, upper_steps=2,
                     nonfinite="zero")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(build_trainer(cfg).run())
    upper = [r for r in records if r["kind"] == "upper"]
    stage = [r for r in records if r["kind"] == "stage"][-1]
    assert len(upper) == 2 and all(r["solver_nonfinite"] > 0 for r in upper)
    assert stage["solver_nonfinite"] == sum(r["solver_nonfinite"] for r in upper)
    replaced = [w for w in caught if issubclass(w.category, RuntimeWarning) and "replaced by torch.nan_to_num" in str(w.message)]
    assert len(replaced) == 2
    assert json.loads((tmp_path / "z" / "metrics.jsonl").read_text().splitlines()[-1])["solver_nonfinite"] > 0
    with pytest.raises(FloatingPointError, match="hypergradient solve is non-finite at stage 1, upper step 1"):
        list(build_trainer(cfg.replace(nonfinite="raise", out_dir=str(tmp_path / "r"))).run())


def test_finetune_divergence_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path):
    cfg = tiny_finetune(ws.pre, tmp_path / "ft", labels_per_class=10, epochs=4, lr=300.0)
    path = tmp_path / "ft" / "checkpoint.pt"
    error, last = run_until_error(Finetuner(cfg).run(), path)
    assert str(error).startswith("fine-tuning loss is nan at epoch 2, step")
    assert last is not None and path.read_bytes() == last
    ckpt = load_checkpoint(path, kind="finetune")
    assert ckpt["step"] == 1 and all_finite(ckpt)
    load_backbone(ws.pre)  # the source is untouched as well


# ---- interruption ----------------------------------------------------------------------------------------------

def start_cli(tmp: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bissl_kit", *map(str, args)], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_after_checkpoints(proc: subprocess.Popen, path: Path, n: int, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as the ``n``-th checkpoint has replaced the one before (new inode each)."""
    seen, t0 = set(), time.monotonic()
    while len(seen) < n:
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout
        try:
            seen.add(path.stat().st_ino)
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


PRETRAIN_ARGS = ("--steps", 24, "--batch-size", 16, "--warmup-steps", 2, "--width", 4, "--image-size", 8,
                 "--proj-hidden", 16, "--proj-dim", 8, "--knn-every", 0, "--knn-bn", "running",
                 "--checkpoint-every", 4, "--device", "cpu",
                 "--progress", "false")


def test_killed_pretraining_resumes_to_the_same_bits(tmp_path):
    out = tmp_path / "runs" / "pre"
    proc = start_cli(tmp_path, "pretrain", *PRETRAIN_ARGS, "--out-dir", out)
    kill_after_checkpoints(proc, out / "checkpoint.pt", 2)
    killed_at = load_checkpoint(out / "checkpoint.pt", kind="pretrain")["step"]
    assert 4 <= killed_at < 24  # killed mid-run, after a checkpoint
    done = subprocess.run([sys.executable, "-m", "bissl_kit", "pretrain", *map(str, PRETRAIN_ARGS), "--out-dir", out],
                          cwd=tmp_path, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    full = Pretrainer(PretrainConfig(steps=24, batch_size=16, warmup_steps=2, width=4, image_size=8, proj_hidden=16,
                                     proj_dim=8, knn_every=0, knn_bn="running", checkpoint_every=4, progress=False, device="cpu",
                                     out_dir=str(tmp_path / "full")))
    list(full.run())
    resumed = load_checkpoint(out / "checkpoint.pt", kind="pretrain")
    assert resumed["step"] == 24
    assert state_equal(pretext_state(resumed), full.model.state_dict())
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 25))  # the steps redone after the kill are logged once


def test_killed_bissl_run_resumes_to_the_same_bits(ws, tmp_path):
    args = ("--pretrain-checkpoint", ws.pre, "--stages", 4, "--lower-steps", 2, "--upper-steps", 2,
            "--lower-batch-size", 16, "--upper-batch-size", 16, "--head-warmup-epochs", 1, "--device", "cpu",
            "--progress", "false")
    out = tmp_path / "runs" / "bissl"
    proc = start_cli(tmp_path, "bissl", *args, "--out-dir", out)
    kill_after_checkpoints(proc, out / "checkpoint.pt", 2)  # the head warm-up's, then stage 1's
    killed_at = load_checkpoint(out / "checkpoint.pt", kind="bissl")["step"]
    assert 1 <= killed_at < 4
    done = subprocess.run([sys.executable, "-m", "bissl_kit", "bissl", *map(str, args), "--out-dir", out],
                          cwd=tmp_path, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    full = build_trainer(tiny_bissl(ws.pre, tmp_path / "full", stages=4, lower_steps=2, upper_steps=2))
    list(full.run())
    resumed = load_checkpoint(out / "checkpoint.pt", kind="bissl")
    assert resumed["step"] == resumed["state"]["stage"] == 4
    assert state_equal(resumed["backbones"]["lower"], full.lower.backbone.state_dict())
    assert state_equal(resumed["backbones"]["upper"], full.upper.state_dict())
    for part in ("lower_rest", "head"):
        assert state_equal(resumed["state"][part], full.state()[part]), part


def test_a_half_written_checkpoint_is_never_read(tmp_path):
    """A real process killed while it writes a big checkpoint leaves the previous one whole; the partial
    temporary file is never taken for a checkpoint."""
    path = tmp_path / "checkpoint.pt"
    script = (f"import torch, sys\nfrom bissl_kit.checkpoint import save_checkpoint\n"
              f"save_checkpoint({str(path)!r}, {{'kind': 'test', 'step': 1, 'w': torch.ones(3)}})\n"
              f"print('ready', flush=True)\n"
              f"big = torch.ones(8 * 2**20)\n"
              f"while True:\n    save_checkpoint({str(path)!r}, {{'kind': 'test', 'step': 2, 'w': big}})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    while True:  # kill while the temporary file is half written
        tmps = [p for p in tmp_path.glob(".checkpoint.pt.*.tmp") if 0 < p.stat().st_size < 4 * 8 * 2**20]
        if tmps:
            break
        assert time.monotonic() - t0 < 60 and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(path, kind="test")
    if ckpt["step"] == 2:  # the rename of an earlier complete write won the race: still a whole checkpoint
        assert ckpt["w"].numel() == 8 * 2**20
    else:
        assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    leftovers = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert leftovers  # what the kill left behind
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(leftovers[0])


def test_a_leftover_temporary_file_is_not_resumed_from(tmp_path):
    cfg = tiny_pretrain(tmp_path / "pre", steps=2)
    list(Pretrainer(cfg).run())
    good = (tmp_path / "pre" / "checkpoint.pt").read_bytes()
    # a run killed inside save_checkpoint: a half temporary file beside the last complete checkpoint
    (tmp_path / "pre" / ".checkpoint.pt.abc123.tmp").write_bytes(good[: len(good) // 2])
    assert Pretrainer(cfg).step == 2
    # and without any complete checkpoint the run starts afresh instead of reading the partial file
    (tmp_path / "pre" / "checkpoint.pt").unlink()
    assert Pretrainer(cfg).step == 0
    with pytest.raises(FloatingPointError, match=r"test checkpoint at step 3 not written: non-finite values \(NaN/Inf\) in w;"):
        save_checkpoint(tmp_path / "pre" / "checkpoint.pt", {"kind": "test", "step": 3, "w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "pre" / "checkpoint.pt").exists() and len(list((tmp_path / "pre").glob("*.tmp"))) == 1


# ---- determinism ---------------------------------------------------------------------------------------------------
# pre-training and fine-tuning: tests/test_pretrain.py::test_same_seed_same_parameters_other_seed_differs and
# tests/test_finetune.py::test_same_seed_reproduces_the_run_and_another_seed_differs; the interruption tests
# above compare a subprocess with an in-process run bit for bit. The BiSSL stage on real data is checked here.

def test_bissl_stage_is_bit_identical_for_a_seed_and_differs_for_another(ws, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        trainer = build_trainer(tiny_bissl(ws.pre, tmp_path / name, seed=seed, stages=2, upper_steps=2))
        records = list(trainer.run())
        states = {"lower": trainer.lower.state_dict(), "upper": trainer.upper.state_dict(), "head": trainer.head.state_dict()}
        runs[name] = (states, [r.get("implicit_loss") for r in records if r["kind"] == "upper"])
    for part in ("lower", "upper", "head"):
        assert state_equal(runs["a"][0][part], runs["b"][0][part]), part
    assert runs["a"][1] == runs["b"][1]
    assert not state_equal(runs["a"][0]["upper"], runs["c"][0]["upper"])
