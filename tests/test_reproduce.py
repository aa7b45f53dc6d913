"""``python -m bissl_kit reproduce``: the paper chain end to end at a tiny budget, its projection, resume and errors.

The chain runs the ICLR preset on a fake STL10 in its real on-disk layout (``tests/fake_datasets.py``): the
pretext set is its unlabeled + train images, as the paper's, and the downstream task its train/test
split, all through torchvision's reader; only the sizes are set down (``--set``) so that a CPU runs it in
seconds."""
import json
import os

import pytest
import torchvision

from bissl_kit.__main__ import main
from bissl_kit.presets import pretrain_values
from bissl_kit.reproduce import plan, scale
from fake_datasets import write_stl10

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "pretrain.image_size=8", "pretrain.width=4", "pretrain.small_stem=true", "pretrain.paper_augment=false",
        "pretrain.batch_size=16", "pretrain.proj_hidden=16", "pretrain.proj_dim=8", "pretrain.loader_workers=0",
        "bissl.lower_batch_size=16", "bissl.upper_batch_size=8", "compare.batch_size=64"]


@pytest.fixture
def fake_stl10(tmp_path, monkeypatch):
    """STL10's binary files under $BISSL_DATA (60 unlabeled images; 20 train, 8 test in 4 classes)."""
    write_stl10(tmp_path / "data", unlabeled=60)
    # torchvision compares the files' md5 with the official archive's: relaxed to "the file exists"
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    monkeypatch.setenv("BISSL_DATA", str(tmp_path / "data"))


def cli(out, *extra):
    return main(["reproduce", "--preset", "paper_iclr", "--budget", "1e-4", "--datasets", "stl10", "--out", str(out),
                 "--device", "cpu", "--measure-steps", "1", *extra, *TINY])


def test_the_budget_scales_every_count_to_at_least_one(tmp_path):
    assert (scale(51_500, 1e-4), scale(500, 1e-4), scale(10, 0.5), scale(None, 0.1)) == (5, 1, 5, None)
    steps = plan("paper_iclr", out=tmp_path, datasets=["cifar10"], budget=0.01,
                 sets=["pretrain.pretext_dataset=fashion_mnist", "pretrain.eval_dataset=digits"])
    pre, bissl, compare = (s.config for s in steps)
    assert (pre.steps, pre.warmup_steps, pre.batch_size, pre.lr) == (515, 10, 1024, 4.8)  # counts only
    assert (bissl.stages, bissl.lower_steps, bissl.upper_steps, bissl.head_warmup_epochs) == (5, 1, 1, 1)
    assert (compare.trials, compare.seeds, compare.epochs) == (2, 1, 4)
    assert compare.arms == ("baseline_matched", "bissl") and compare.bissl_runs == (str(tmp_path / "bissl_cifar10"),)
    assert pretrain_values("iclr")["steps"] == 51_500  # the preset itself is untouched


def test_reproduce_runs_the_chain_prints_its_projection_and_resumes(tmp_path, capsys, fake_stl10):
    out = tmp_path / "chain"
    assert cli(out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "projected time on this machine" in printed and "bissl_stl10" in printed and "compare_stl10" in printed
    assert not out.exists()  # a dry run writes nothing
    assert cli(out) == 0
    done = json.loads((out / "done.json").read_text())
    assert list(done) == ["pretrain", "bissl_stl10", "compare_stl10"]
    results = json.loads((out / "compare_stl10" / "comparison.json").read_text())
    assert "baseline_matched" in json.dumps(results) and "bissl" in json.dumps(results)
    capsys.readouterr()
    # the last step did not finish: a rerun skips the others and resumes it (its finished runs are re-read)
    del done["compare_stl10"]
    (out / "done.json").write_text(json.dumps(done))
    assert cli(out) == 0
    printed = capsys.readouterr().out
    assert "pretrain: done, skipped" in printed and "bissl_stl10: done, skipped" in printed
    assert "compare_stl10: running" in printed
    assert json.loads((out / "compare_stl10" / "comparison.json").read_text())["tasks"] == results["tasks"]


@pytest.mark.parametrize("extra, message", [
    (["--budget", "2"], "--budget 2.0 must be in (0, 1]"),
    (["--set", "pretrain=3"], "must be STAGE.FIELD=VALUE"),
    (["--set", "bissl.stagez=3"], "unknown BisslConfig parameter(s): 'stagez' (did you mean 'stages'?)"),
])
def test_bad_options_are_the_reproduce_usage_error(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--preset", "paper_iclr", "--out", str(tmp_path / "x"), *TINY, *extra])
    assert e.value.code == 2
    assert "reproduce: error:" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        plan("paper_iclr", out=tmp_path, budget=float(extra[1]) if extra[0] == "--budget" else 1.0,
             sets=TINY[1:] + (extra[1:] if extra[0] == "--set" else []))
