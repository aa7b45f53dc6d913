"""Run integrity (issue 17): errors a user can cause end as ``STAGE: error: ...`` with exit status 2, name
the field and what is allowed, come before any training, and change no file; a run folder has one owner;
a damaged log or a full disk loses nothing; a finished result is never re-read as a failure.

The matrix reuses tests/test_reliability.py's workspace (finished runs of every stage that no bad input
may touch) and checks; the classes follow the issue: paths, config files, checkpoints, data roots,
devices, sizes, notebooks. Concurrency, damaged files and a full disk have tests of their own below.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reliability import (  # noqa: E402,F401  (ws and backward_calls are fixtures)
    PRETRAIN_ARGS, REPO, Case, CLIFailed, assert_refused, backward_calls, cli, cli_subprocess, snapshot, start_cli,
    tiny_pretrain, ws,
)

from bissl_kit.checkpoint import CheckpointError  # noqa: E402
from bissl_kit.compare import run_comparison  # noqa: E402
from bissl_kit.config import ConfigError  # noqa: E402
from bissl_kit.hpo import SearchFailedError  # noqa: E402
from bissl_kit.notebooks import NotebookParameters  # noqa: E402
from bissl_kit.bissl import BisslConfig  # noqa: E402
from bissl_kit.pretrain import Pretrainer  # noqa: E402
from bissl_kit.rundir import RunLock, RunLockedError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [str(a) for a in PRETRAIN_ARGS]  # a pre-training run of a few seconds


def env(**kw):
    return {**os.environ, "OMP_NUM_THREADS": "1", **kw}


def on_disk(ws, tmp: Path, what: str) -> Path:
    """Bad inputs made on disk: files where folders should be, damaged JSON and checkpoints."""
    if what == "file":
        (tmp / "afile").write_text("not a folder")
        return tmp / "afile"
    if what == "broken.json":
        (tmp / what).write_text('{"lr": ')
        return tmp / what
    if what == "list.json":
        (tmp / what).write_text("[1, 2]")
        return tmp / what
    if what == "missing-key.pt":  # a pre-training checkpoint whose backbone lost a tensor
        ckpt = torch.load(ws.pre, weights_only=True)
        ckpt["backbones"]["pretrained"].pop("conv1.weight")
        torch.save(ckpt, tmp / what)
        return tmp / what
    raise ValueError(what)


def notebook_options(**values):
    def run():
        ns = {}
        params = NotebookParameters(ns)
        ns.update(values)
        params.options(*values)
    return run


CASES = [
    # -- paths and permissions: out_dir, results_dir, figures_dir
    Case("path-out-dir-empty", lambda ws, tmp: cli("pretrain", *TINY, "--out-dir", ""), SystemExit,
         ("pretrain: error:", "out_dir='' must name a folder")),
    Case("path-out-dir-file", lambda ws, tmp: cli("pretrain", *TINY, "--out-dir", on_disk(ws, tmp, "file")), SystemExit,
         ("pretrain: error:", "out_dir=", "afile' is a file, not a folder")),
    Case("path-out-dir-under-file",
         lambda ws, tmp: cli("finetune", "--backbone-checkpoint", ws.pre, "--out-dir", on_disk(ws, tmp, "file") / "x"),
         SystemExit, ("finetune: error:", "out_dir=", "lies under the file")),
    Case("path-out-dir-unwritable", lambda ws, tmp: cli("pretrain", *TINY, "--out-dir", "/proc/bissl-kit-run"),
         SystemExit, ("pretrain: error:", "out_dir='/proc/bissl-kit-run' cannot be written")),
    Case("path-out-dir-too-long", lambda ws, tmp: cli("pretrain", *TINY, "--out-dir", tmp / ("x" * 300)), SystemExit,
         ("pretrain: error:", "is longer than the file system allows")),
    Case("path-results-dir-file",
         lambda ws, tmp: partial(run_comparison, ws.cmp_cfg(results_dir=str(on_disk(ws, tmp, "file")))), ConfigError,
         ("results_dir=", "is a file, not a folder")),
    Case("path-figures-dir-under-file",
         lambda ws, tmp: partial(run_comparison, ws.cmp_cfg(figures_dir=str(on_disk(ws, tmp, "file") / "f"))),
         ConfigError, ("figures_dir=", "lies under the file")),
    # -- config files
    Case("config-missing", lambda ws, tmp: cli("pretrain", "--config", tmp / "nope.json"), SystemExit,
         ("pretrain: error:", "--config", "nope.json' cannot be read (No such file or directory)")),
    Case("config-broken-json", lambda ws, tmp: cli("bissl", "--config", on_disk(ws, tmp, "broken.json")), SystemExit,
         ("bissl: error:", "broken.json' is not valid JSON")),
    Case("config-not-an-object", lambda ws, tmp: cli("finetune", "--config", on_disk(ws, tmp, "list.json")), SystemExit,
         ("finetune: error:", "must hold one JSON object of config fields", "not a list")),
    Case("config-error-shows-the-stage-usage", lambda ws, tmp: cli("pretrain", "--steps", 0), SystemExit,
         ("usage: python -m bissl_kit pretrain", "steps=0 is out of range")),
    # -- checkpoints
    Case("ckpt-missing-key",
         lambda ws, tmp: cli("finetune", "--backbone-checkpoint", on_disk(ws, tmp, "missing-key.pt"), "--out-dir",
                             tmp / "ft"), SystemExit,
         ("finetune: error:", "backbone_checkpoint=", "pretrained backbone does not fit the network",
          "conv1.weight")),
    Case("ckpt-a-folder", lambda ws, tmp: cli("finetune", "--backbone-checkpoint", ws.root / "pretrain",
                                              "--out-dir", tmp / "ft"), SystemExit,
         ("finetune: error:", "is a folder, not a checkpoint file", "pretrain/checkpoint.pt")),
    Case("ckpt-bissl-from-another-width",
         lambda ws, tmp: cli("bissl", "--pretrain-checkpoint", ws.pre8, "--out-dir", ws.root / "bissl",
                             "--device", "cpu", "--progress", "false", "--stages", 1, "--lower-steps", 1,
                             "--upper-steps", 1, "--lower-batch-size", 16, "--upper-batch-size", 16,
                             "--head-warmup-epochs", 1), SystemExit,
         ("bissl: error:", "is for another architecture", "width: checkpoint 4 vs model 8")),
    # -- data roots
    Case("data-root-missing", lambda ws, tmp: cli("pretrain", *TINY, "--out-dir", tmp / "p", "--data-root", tmp / "nope"),
         SystemExit, ("pretrain: error:", "data_root=", "nope' does not exist")),
    Case("data-env-missing",
         lambda ws, tmp: lambda: _run_env(tmp, "pretrain", *TINY, "--out-dir", tmp / "p", BISSL_DATA=str(tmp / "nope")),
         CLIFailed, ("pretrain: error:", "$BISSL_DATA=", "nope' does not exist")),
    # -- devices
    Case("device-cuda-absent", lambda ws, tmp: cli("pretrain", *[a for a in TINY if a != "cpu" and a != "--device"],
                                                   "--device", "cuda", "--out-dir", tmp / "p"), SystemExit,
         ("pretrain: error:", "device='cuda' was asked for, but CUDA is not available")),
    Case("device-malformed", lambda ws, tmp: cli("finetune", "--device", "cuda:first"), SystemExit,
         ("finetune: error:", "device='cuda:first' is not allowed", "'cuda:N'")),
    # -- sizes
    Case("size-labels-per-class",
         lambda ws, tmp: cli("finetune", "--backbone-checkpoint", ws.pre, "--labels-per-class", 1000, "--device", "cpu",
                             "--out-dir", tmp / "ft"), SystemExit,
         ("finetune: error:", "labels_per_class=1000 is too large", "has only")),
    Case("size-optional-tuple-from-the-cli", lambda ws, tmp: cli("pretrain", "--lowres-size", 6, 40), SystemExit,
         ("pretrain: error:", "lowres_size=(6, 40) must be (min, max)", "image_size=16")),
    # -- notebooks: the notebook-only parameters are validated like fields
    Case("notebook-paper-mode-string", lambda ws, tmp: notebook_options(paper_mode="False"), ConfigError,
         ("notebook parameters: paper_mode='False' must be True or False",)),
    Case("notebook-live-string", lambda ws, tmp: notebook_options(live="no"), ConfigError,
         ("notebook parameters: live='no' must be True or False",)),
    Case("notebook-figures-dir-file", lambda ws, tmp: notebook_options(figures_dir=str(on_disk(ws, tmp, "file"))),
         ConfigError, ("notebook parameters: figures_dir=", "is a file, not a folder")),
]


def _run_env(tmp: Path, *args, **extra_env):
    out = subprocess.run([sys.executable, "-m", "bissl_kit", *map(str, args)], cwd=tmp, capture_output=True,
                         text=True, timeout=300, env=env(**extra_env))
    if out.returncode != 0:
        raise CLIFailed(out.returncode, out.stderr)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_user_error_is_refused_early_and_clearly_and_loses_nothing(case, ws, tmp_path, backward_calls, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BISSL_DATA", raising=False)
    message = assert_refused(case, ws, tmp_path, backward_calls, capsys)
    assert "Traceback" not in message  # here in every case, not only from a subprocess


def test_real_processes_end_user_errors_with_status_2_and_no_traceback(ws, tmp_path):
    (tmp_path / "broken.json").write_text("{")
    for args, needle in ((("finetune", "--config", "broken.json"), "finetune: error: --config 'broken.json' is not valid"),
                         (("pretrain", *TINY, "--out-dir", "/proc/x"), "pretrain: error: out_dir='/proc/x' cannot be written"),
                         (("finetune", "--backbone-checkpoint", ws.root / "pretrain", "--out-dir", "ft"),
                          "is a folder, not a checkpoint file")):
        with pytest.raises(CLIFailed) as err:
            _run_env(tmp_path, *args)
        assert err.value.returncode == 2 and needle in str(err.value) and "Traceback" not in str(err.value)


def test_an_out_of_memory_step_names_the_sizes_to_lower(tmp_path, monkeypatch, capsys):
    from bissl_kit.__main__ import main

    def no_memory(self, step):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 98304000000 bytes.")
    monkeypatch.setattr(Pretrainer, "train_step", no_memory)
    with pytest.raises(SystemExit) as err:
        main(["pretrain", *TINY, "--out-dir", str(tmp_path / "p")])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "does not fit in memory (batch_size=16, width=4, image_size=8)" in message


def test_a_search_in_which_every_trial_diverged_is_an_error_not_a_result(ws, tmp_path):
    cfg = ws.cmp_cfg(out_dir=str(tmp_path / "cmp"), lr_range=(1e6, 1e7), trials=2)
    with pytest.raises(SearchFailedError, match="every one of the 2 search trials failed, so there is nothing to "
                                                "choose .trial 0: FloatingPointError: fine-tuning loss is"):
        run_comparison(cfg)
    assert not (tmp_path / "cmp" / "comparison.json").exists()


# ---- one owner per run folder ----------------------------------------------------------------------------------

def test_a_second_process_on_a_busy_run_folder_is_refused_at_once(tmp_path):
    out = tmp_path / "runs" / "pre"
    long = [*TINY]
    long[long.index("--steps") + 1] = "400"
    first = start_cli(tmp_path, "pretrain", *long, "--out-dir", out)
    try:
        t0 = time.monotonic()
        while not (out / ".lock").exists():
            assert first.poll() is None and time.monotonic() - t0 < 120, first.stderr.read() if first.poll() else ""
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "bissl_kit", "pretrain", *long, "--seed", "1", "--out-dir",
                                 str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env())
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by process {first.pid} on " in second.stderr and "since" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the holder is gone: the next run takes the lock over, says so, and resumes the killed run
    done = subprocess.run([sys.executable, "-m", "bissl_kit", "pretrain", *long, "--out-dir", str(out),
                           "--steps", "6"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert "taking over the lock of process" in done.stderr and "no longer runs" in done.stderr


def test_a_lock_held_on_another_node_is_taken_over_only_when_its_heartbeat_stops(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": 1, "host": "node-17", "since": "2026-12-01 10:00:00"}))
    with pytest.raises(RunLockedError, match="in use by process 1 on node-17 .since 2026-12-01 10:00:00"):
        RunLock(folder).acquire()
    old = time.time() - 3600  # an hour without a heartbeat
    os.utime(folder / ".lock", (old, old))
    with pytest.warns(RuntimeWarning, match="taking over the lock of process 1 on node-17.*heartbeat is 3[56][0-9]{2} s old"):
        lock = RunLock(folder).acquire()
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / ".lock").exists()


def test_a_comparison_folder_has_one_owner_too(ws, tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (folder / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "since": "now"}))
        with pytest.raises(RunLockedError, match=f"in use by process {sleeper.pid}"):
            run_comparison(ws.cmp_cfg(out_dir=str(folder)))
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- the checkpoint is the record ------------------------------------------------------------------------------

def test_a_cut_short_log_is_repaired_from_the_checkpoint_on_resume(tmp_path):
    cfg = tiny_pretrain(tmp_path / "pre", steps=4)
    list(Pretrainer(cfg).run())
    log = tmp_path / "pre" / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"kind": "step", "st')  # a full disk cut the last write
    with pytest.warns(RuntimeWarning, match="dropped 1 damaged line"):
        trainer = Pretrainer(cfg)
    assert trainer.step == 4 and log.read_text() == whole
    log.write_text(whole[:-25])  # the last record cut short: it is dropped, and the run's records stay readable
    with pytest.warns(RuntimeWarning, match="dropped 1 damaged line"):
        Pretrainer(cfg)
    assert log.read_text() == "".join(line + "\n" for line in whole.splitlines()[:-1])


def test_a_damaged_trial_log_does_not_change_a_finished_comparison(ws, tmp_path):
    cmp = tmp_path / "cmp"
    shutil.copytree(ws.root / "cmp", cmp)
    cfg = ws.cmp_cfg(out_dir=str(cmp))
    results = json.loads((cmp / "comparison.json").read_text())
    chosen = Path(results["tasks"][0]["arms"]["baseline"]["chosen"]["run"].replace(str(ws.root / "cmp"), str(cmp)))
    log = chosen / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:-25])
    with pytest.warns(RuntimeWarning, match="damaged line"):
        again = run_comparison(cfg)
    for key in ("test_top1", "chosen"):
        assert json.dumps(again["tasks"][0]["arms"]["baseline"][key], sort_keys=True).replace(str(cmp), "") == \
            json.dumps(results["tasks"][0]["arms"]["baseline"][key], sort_keys=True).replace(str(ws.root / "cmp"), "")


def test_a_finished_trial_that_cannot_be_read_back_stops_the_search_naming_it(ws, tmp_path):
    cmp = tmp_path / "cmp"
    shutil.copytree(ws.root / "cmp", cmp)
    trial = next(cmp.glob("digits/baseline/trial_00"))
    ckpt = trial / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trial_00/checkpoint.pt' is unreadable or truncated"):
        run_comparison(ws.cmp_cfg(out_dir=str(cmp)))
    search = cmp / "digits" / "baseline" / "search.json"
    search.write_text(search.read_text()[:40])
    with pytest.raises(ConfigError, match="search.json' is damaged"):
        run_comparison(ws.cmp_cfg(out_dir=str(cmp)))


# ---- a full disk -----------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs (needs root, as CI and this machine have); skipped with the reason where mounting fails."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({out.stderr.strip() or out.returncode})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_clearly_and_loses_nothing(small_disk, tmp_path, monkeypatch):
    cfg = tiny_pretrain(small_disk / "pre", steps=12, checkpoint_every=4)
    trainer = Pretrainer(cfg)
    with pytest.raises(OSError, match="No space left on device while writing .*checkpoint.pt'; the previous file is kept"):
        for rec in trainer.run():
            if rec.get("step") == 9 and rec["kind"] == "step":  # the checkpoint of step 8 is written: fill the disk
                good = (small_disk / "pre" / "checkpoint.pt").read_bytes()
                (small_disk / "filler").write_bytes(b"\0" * max(shutil.disk_usage(small_disk).free - 20_000, 0))
    assert not list((small_disk / "pre").glob(".checkpoint.pt.*.tmp"))  # the half-written checkpoint is gone
    assert (small_disk / "pre" / "checkpoint.pt").read_bytes() == good  # the previous one is whole
    del trainer
    # the command line says so plainly: a full disk is exit status 2 and a message, no traceback
    full = subprocess.run([sys.executable, "-m", "bissl_kit", "pretrain", *TINY, "--out-dir", str(small_disk / "new")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert full.returncode == 2 and "No space left on device" in full.stderr and "Traceback" not in full.stderr
    # room again: the run resumes from step 8 and its log holds each step once
    (small_disk / "filler").unlink()
    list(Pretrainer(cfg).run())
    steps = [r["step"] for r in map(json.loads, (small_disk / "pre" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps == list(range(1, 13))


def test_checkpoints_and_results_take_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        list(Pretrainer(tiny_pretrain(tmp_path / "pre", steps=2)).run())
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "config.json"):
        assert (tmp_path / "pre" / name).stat().st_mode & 0o777 == 0o644, name


def test_resume_checks_the_content_of_its_inputs_not_their_paths(ws, tmp_path):
    """A BiSSL run resumed with a moved copy of its pre-training checkpoint goes on; with another run's
    checkpoint at the same path it is refused (issue 17, item 4)."""
    from bissl_kit.bissl import build_trainer
    moved = tmp_path / "moved" / "checkpoint.pt"
    moved.parent.mkdir()
    shutil.copy(ws.pre, moved)
    run = tmp_path / "b"
    shutil.copytree(ws.root / "bissl", run)
    cfg = BisslConfig.from_dict({**json.loads((run / "config.json").read_text()), "out_dir": str(run),
                                 "pretrain_checkpoint": str(moved)})
    assert build_trainer(cfg).stage == 1
    other = tiny_pretrain(tmp_path / "other", seed=1, steps=2)  # the same network, other weights
    list(Pretrainer(other).run())
    shutil.copy(tmp_path / "other" / "checkpoint.pt", moved)  # another pre-training run where the first one was
    with pytest.raises(CheckpointError, match="pretrain_checkpoint: .* is not the file this run started from"):
        build_trainer(cfg)
