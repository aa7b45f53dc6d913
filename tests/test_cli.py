"""The command line end to end on tiny settings: every stage, as a batch job would run it."""
import json
import os
import subprocess
import sys

import pytest

from bissl_kit.__main__ import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]




def test_bissl_presets_take_the_options_as_overrides_and_derive_from_them():
    import argparse

    from bissl_kit.__main__ import config_from_args
    from bissl_kit.bissl import BisslConfig

    def parsed(preset=None, **values):
        return config_from_args(BisslConfig, argparse.Namespace(paper_mode=False, preset=preset, **values))

    assert parsed("paper_neurips", lower_steps="10", downstream="dtd") == \
        BisslConfig.paper_neurips(lower_steps=10, downstream="dtd")
    assert parsed("paper_neurips", lower_steps="10").lower_warmup == 100
    assert parsed("paper_neurips_byol", downstream="dtd").upper_lr == 0.015
    assert parsed("paper_iclr", lower_warmup="50").lower_warmup_passes is None
    assert parsed(lower_warmup_passes="3").lower_warmup is None  # the warm-up given replaces the other one
    assert parsed() == BisslConfig.embedded()


def cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bissl_kit", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_stage_from_the_command_line(tmp_path, monkeypatch):
    out = cli("pretrain", "--steps", 4, "--batch-size", 16, "--warmup-steps", 1, "--width", 4, "--image-size", 8,
              "--proj-hidden", 16, "--proj-dim", 8, "--knn-every", 0, "--device", "cpu", "--progress", "false",
              "--out-dir", "runs/pre", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = cli("bissl", "--pretrain-checkpoint", "runs/pre/checkpoint.pt", "--stages", 1, "--lower-steps", 2,
              "--upper-steps", 2, "--lower-batch-size", 16, "--upper-batch-size", 16, "--head-warmup-epochs", 1,
              "--solver-iters", 3, "--device", "cpu", "--progress", "false", "--out-dir", "runs/bissl", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "stage 1: val top-1" in out.stdout
    saved = json.loads((tmp_path / "runs/bissl/config.json").read_text())
    assert saved["solver"] != "layerwise" and saved["stages"] == 1  # our mode unless --paper-mode
    # --paper-mode starts from the official values; options still override them (in-process: the same main())
    monkeypatch.chdir(tmp_path)
    assert main(["bissl", "--paper-mode", "--pretrain-checkpoint", "runs/pre/checkpoint.pt", "--stages", "1",
                 "--lower-steps", "1", "--upper-steps", "1", "--lower-batch-size", "16", "--upper-batch-size", "16",
                 "--head-warmup-epochs", "0", "--solver-iters", "2", "--device", "cpu", "--progress", "false",
                 "--out-dir", "runs/paper"]) == 0
    paper = json.loads((tmp_path / "runs/paper/config.json").read_text())
    assert (paper["solver"], paper["hvp"], paper["nonfinite"], paper["solver_iters"]) == ("layerwise", "recompute", "zero", 2)
    out = cli("finetune", "--backbone-checkpoint", "runs/bissl/checkpoint.pt", "--labels-per-class", 20,
              "--epochs", 1, "--batch-size", 64, "--device", "cpu", "--progress", "false", "--out-dir", "runs/ft",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test top-1" in out.stdout and "digits:20 test (n=359)" in out.stdout
    args = ["compare", "--pretrain-checkpoint", "runs/pre/checkpoint.pt", "--tasks", "digits", "--bissl-runs",
            "runs/bissl", "--trials", 2, "--seeds", 2, "--epochs", 1, "--batch-size", 64, "--probe", "false",
            "--device", "cpu", "--progress", "false", "--out-dir", "runs/cmp", "--results-dir", "results"]
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| digits | BiSSL | 2 |" in out.stdout
    res = json.loads((tmp_path / "results/comparison.json").read_text())
    assert res["command"] == "python -m bissl_kit " + " ".join(map(str, args))
    assert (tmp_path / "results/comparison.csv").exists() and (tmp_path / "results/comparison.md").exists()


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "--select", "best"], "select='best' is not allowed; select must be one of 'last', 'best_val'"),
    (["compare", "--arms", "bissl", "nope"], "arms=('bissl', 'nope') must be distinct values from"),
    (["compare", "--tasks", "digits", "fashion_mnist:50"], "bissl_runs has 1 entries but tasks has 2"),
    (["bissl", "--paper-mode", "--stages", "0"], "stages=0 is out of range"),
    (["finetune", "--epochs", "ten"], "'ten' is not a int"),
    (["bissl", "--preset", "paper_neurips", "--downstream", "digits"],
     "for downstream='digits' pass upper_lr and upper_weight_decay"),
    (["bissl", "--preset", "paper_iclr", "--paper-mode"], "--preset and --paper-mode are alternatives"),
    (["bissl", "--lower-warmup", "3", "--lower-warmup-passes", "2"], "exactly one of the two must be set"),
])
def test_bad_values_are_refused_before_anything_runs(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
