"""TensorBoard: every stage's records as scalars beside metrics.jsonl, read back with TensorBoard's own reader;
a resumed run's curves hold each step once; the switch and a missing package leave the log alone; a sweep's
points as an hparams table."""

import sys

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from bissl_kit import tensorboard as tb  # noqa: E402
from bissl_kit.bissl import BisslConfig, build_trainer  # noqa: E402
from bissl_kit.finetune import FinetuneConfig, finetune  # noqa: E402
from bissl_kit.pretrain import PretrainConfig, Pretrainer, pretrain  # noqa: E402
from bissl_kit.rundir import MetricsLog  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_events(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def curve(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores simple values as float32


def tiny_pretrain_config(out_dir, **kw) -> PretrainConfig:
    base = dict(steps=4, batch_size=16, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, image_size=8, knn_every=2,
                checkpoint_every=2, progress=False, device="cpu", out_dir=str(out_dir))
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    pretrain(tiny_pretrain_config(root / "pretrain"))
    return root / "pretrain"


def test_pretraining_writes_its_records_as_scalars_at_their_steps(pretrained):
    recs = MetricsLog(pretrained).records()
    acc = read_events(pretrained)
    steps = [r for r in recs if r["kind"] == "step"]
    assert curve(acc, "step/loss") == [(r["step"], f32(r["loss"])) for r in steps]
    assert curve(acc, "step/lr") == [(r["step"], f32(r["lr"])) for r in steps]
    knn = [r for r in recs if r["kind"] == "knn"]
    assert [s for s, _ in curve(acc, "knn/knn")] == [0, 2, 4]
    assert curve(acc, "knn/knn_by_bn/running") == [(r["step"], f32(r["knn_by_bn"]["running"])) for r in knn]
    assert "step/step" not in acc.Tags()["scalars"]  # the step is the axis, not a curve


def test_a_resumed_run_holds_each_step_once(tmp_path):
    cfg = tiny_pretrain_config(tmp_path / "run", steps=5, knn_every=0)
    run = Pretrainer(cfg).run()
    for rec in run:  # stop after step 3: its record is past the checkpoint of step 2
        if rec.get("step") == 3 and rec["kind"] == "step":
            break
    run.close()
    assert [s for s, _ in curve(read_events(tmp_path / "run"), "step/loss")] == [1, 2, 3]
    for _ in Pretrainer(cfg).run():
        pass
    recs = [r for r in MetricsLog(tmp_path / "run").records() if r["kind"] == "step"]
    assert curve(read_events(tmp_path / "run"), "step/loss") == [(r["step"], f32(r["loss"])) for r in recs]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    written = (tmp_path / "run" / tb.EVENT_FILE).read_bytes()
    Pretrainer(cfg)  # a finished run read again leaves its event file as it was
    assert (tmp_path / "run" / tb.EVENT_FILE).read_bytes() == written


def test_bissl_and_finetuning_draw_at_their_own_steps(pretrained, tmp_path):
    bissl = BisslConfig.embedded(pretrain_checkpoint=str(pretrained / "checkpoint.pt"), stages=1, lower_steps=2,
                                 upper_steps=2, lower_batch_size=16, upper_batch_size=16, head_warmup_epochs=1,
                                 solver_iters=2, progress=False, device="cpu", out_dir=str(tmp_path / "bissl"))
    for _ in build_trainer(bissl).run():
        pass
    acc = read_events(tmp_path / "bissl")
    recs = MetricsLog(tmp_path / "bissl").records()
    upper = [r for r in recs if r["kind"] == "upper"]
    assert curve(acc, "upper/implicit_loss") == [(r["upper_step"], f32(r["implicit_loss"])) for r in upper]
    assert [s for s, _ in curve(acc, "lower/pretext_loss")] == [1, 2]
    assert [s for s, _ in curve(acc, "stage/val_top1")] == [0, 1]
    assert "upper/solver_converged" in acc.Tags()["scalars"]  # a bool as 0/1

    ft = FinetuneConfig(backbone_checkpoint=str(tmp_path / "bissl" / "checkpoint.pt"), labels_per_class=10, epochs=2,
                        batch_size=64, progress=False, device="cpu", out_dir=str(tmp_path / "ft"))
    final = finetune(ft)
    acc = read_events(tmp_path / "ft")
    recs = MetricsLog(tmp_path / "ft").records()
    assert [s for s, _ in curve(acc, "step/loss")] == [r["step"] for r in recs if r["kind"] == "step"] == [1, 2, 3, 4]
    assert [s for s, _ in curve(acc, "epoch/val_top1")] == [1, 2]
    assert curve(acc, "final/test_top1") == [(2, f32(final["test_top1"]))]


def test_the_switch_turns_the_event_files_off(tmp_path, monkeypatch):
    monkeypatch.setenv("BISSL_TENSORBOARD", "0")
    log = MetricsLog(tmp_path, stage="pretrain")
    log.append({"kind": "step", "step": 1, "loss": 0.5})
    assert log.records() == [{"kind": "step", "step": 1, "loss": 0.5}]
    assert not (tmp_path / tb.EVENT_FILE).exists()


def test_without_the_package_runs_go_on_and_say_so_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when it is not installed
    monkeypatch.setattr(tb, "_warned_missing", False)
    with pytest.warns(RuntimeWarning, match=r"bissl_kit\[tensorboard\]") as caught:
        for name in ("a", "b"):
            log = MetricsLog(tmp_path / name, stage="finetune")
            log.append({"kind": "epoch", "epoch": 1, "val_top1": 0.5})
    assert len([w for w in caught if "TensorBoard" in str(w.message)]) == 1
    assert MetricsLog(tmp_path / "b").records() == [{"kind": "epoch", "epoch": 1, "val_top1": 0.5}]
    assert not (tmp_path / "a" / tb.EVENT_FILE).exists()


def test_a_sweeps_points_read_back_as_an_hparams_table(tmp_path):
    points = [{"hparams": {"lam": lam, "solver": solver}, "metrics": {"diff": d, "p": p}}
              for lam, solver, d, p in ((1e-3, "minres", 0.25, 0.5), (1e-1, "minres", -0.5, 0.125), (1e-1, "x=v", 1.5, 0.75))]
    tb.write_hparams(tmp_path, points)
    root = read_events(tmp_path).PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(root["_hparams_/experiment"]).experiment
    assert [h.name for h in exp.hparam_infos] == ["lam", "solver"]
    assert [m.name.tag for m in exp.metric_infos] == ["diff", "p"]
    assert list(next(h for h in exp.hparam_infos if h.name == "solver").domain_discrete.values[i].string_value
                for i in range(2)) == ["minres", "x=v"]
    for i, point in enumerate(points):
        acc = read_events(tmp_path / f"point_{i:03d}")
        start = plugin_data_pb2.HParamsPluginData.FromString(
            acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["lam"].number_value == point["hparams"]["lam"]
        assert start.hparams["solver"].string_value == point["hparams"]["solver"]
        assert {t: curve(acc, t) for t in ("diff", "p")} == {t: [(0, v)] for t, v in point["metrics"].items()}
