"""Sweeps: points as one field's values or as named bundles of fields, a tiny sweep end to end through the
command line (runs shared between points, sweep.json/.csv/.md, the sensitivity figure)."""
import json

import pytest

from bissl_kit.__main__ import main
from bissl_kit.config import ConfigError
from bissl_kit.experiments.sweep import SweepConfig, parse_point, parse_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_points_are_one_fields_values_or_named_bundles():
    assert parse_point("MINRES-5:solver=minres,solver_iters=5") == ("MINRES-5", {"solver": "minres", "solver_iters": 5})
    assert parse_point("x=v:solver=none") == ("x=v", {"solver": "none"})
    assert (parse_value("1e-3"), parse_value("none"), parse_value("true"), parse_value("cg")) == (1e-3, None, True, "cg")
    assert (parse_value("none", "solver"), parse_value("none", "solver_iters")) == ("none", None)
    cfg = SweepConfig(field="lam", values=("1e-3", "0.1"), points=("x=v:solver=none",))
    assert cfg.point_list() == [("lam=1e-3", {"lam": 1e-3}), ("lam=0.1", {"lam": 0.1}), ("x=v", {"solver": "none"})]
    point, overrides = cfg.point_config("lam=0.1", {"lam": 0.1, "epochs": 3})
    assert point.epochs == 3 and overrides == {"lam": 0.1} and point.shared_dir.endswith("shared")


@pytest.mark.parametrize("values, needle", [
    (dict(), "a sweep needs points"),
    (dict(field="lam"), "give both"),
    (dict(points=("a:lam=1", "a:lam=2")), "repeat"),
    (dict(points=("a:out_dir=x",)), "which a sweep cannot vary"),
    (dict(points=("nocolon",)), "must be 'name:field=value"),
])
def test_a_bad_sweep_is_refused_naming_what(values, needle):
    with pytest.raises(ConfigError, match=needle):
        SweepConfig(**values)


def test_a_bad_point_value_is_refused_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="lam"):
        SweepConfig(points=("a:lam=-1",), out_dir=str(tmp_path)).point_config("a", {"lam": -1})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from test_finetune import tiny_runs
    return tiny_runs(tmp_path_factory.mktemp("sources"))


def test_a_sweep_end_to_end_through_the_command_line(sources, tmp_path, capsys):
    pre_ckpt, bissl_ckpt = sources
    out, figs = tmp_path / "sweep", tmp_path / "figures"
    argv = ["sweep", "--pretrain-checkpoint", str(pre_ckpt), "--tasks", "digits", "--bissl-runs", str(bissl_ckpt.parent),
            "--bissl-replicates", "2", "--arms", "baseline_matched", "bissl", "--trials", "1", "--seeds", "2",
            "--epochs", "1", "--batch-size", "64", "--probe", "false", "--device", "cpu", "--progress", "false",
            "--points", "x=v:solver=none", "MINRES-2:solver=minres,solver_iters=2", "--out-dir", str(out),
            "--figures-dir", str(figs)]
    assert main(argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == ["x=v", "MINRES-2"]
    rows = [r for r in sweep["rows"] if r["metric"] == "test_top1" and r["b"] == "baseline_matched"]
    # every replicate is fine-tuned with the same 2 seeds: the headline is the run × seed test
    assert len(rows) == 2 and all(r["unit"] == "BiSSL run × fine-tuning seed" and (r["n"], r["seeds"]) == (2, 2)
                                  and r["runs_only"]["df"] == 1 for r in rows)
    assert sweep["command"].startswith("python -m bissl_kit sweep --pretrain-checkpoint")
    # the points differ only in the solver: the matched continuations (one per seed) and their searches are shared
    shared = out / "shared"
    assert len(list(shared.glob("pretext_matched_*"))) == 2
    assert len(list((shared / "digits").glob("baseline_matched_*"))) == 2
    assert len(list((shared / "digits").glob("bissl_*"))) == 4
    for name, solver in (("x=v", "none"), ("MINRES-2", "minres")):
        res = json.loads((out / "points" / name / "comparison.json").read_text())
        assert {t["bissl_run"]["solver"] for t in res["tasks"]} == {solver}
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("point,fields,task")
    table = (out / "sweep.md").read_text()
    assert "| x=v | digits | BiSSL − baseline, compute-matched | BiSSL run × fine-tuning seed (2 × 2) |" in table
    assert "Command: `" in table
    assert (figs / "sweep.html").exists()
    from bissl_kit.viz.figures import png_export_available
    if png_export_available():
        assert (figs / "sweep.png").stat().st_size > 10_000
    assert "sweep.{json,csv,md}" in capsys.readouterr().out


@pytest.mark.slow
def test_06_ablations_notebook_runs_headless_and_shows_the_committed_ablation(tmp_path, monkeypatch):
    import base64
    from pathlib import Path

    from bissl_kit.notebooks import QUICK, execute
    from test_finetune import tiny_runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pre_ckpt, bissl_ckpt = tiny_runs(tmp_path / "sources")
    repo = Path(__file__).parents[1]
    params = {**QUICK["06_ablations"], "pretrain_checkpoint": str(pre_ckpt), "bissl_runs": [str(bissl_ckpt.parent)],
              "out_dir": str(tmp_path / "sweep"), "figures_dir": str(tmp_path / "fig"),
              "committed_sweeps": [str(repo / "results" / "ablations" / s / "sweep.json") for s in ("lam", "solver", "gamma")]}
    out = execute("06_ablations", params, output_dir=tmp_path / "nb")
    nb = json.loads(out.read_text())
    shown = json.dumps([o for c in nb["cells"] for o in c.get("outputs", [])], ensure_ascii=False)
    assert out.stat().st_size < 2_000_000
    assert "BiSSL run × fine-tuning seed (2 × 2)" in shown  # the demo's own sweep, replicated
    # the committed ablation: its three sweeps with their commands and tables
    assert all(f"**{s}** — command" in shown for s in ("lam", "solver", "gamma")) and "layerwise-5" in shown
    assert "no committed sweep" not in shown
    assert (tmp_path / "fig" / f"{params.get('sweep_stem', '06_demo_sweep')}.html").exists()
    assert base64.b64encode((repo / "figures" / "06_ablation_lam.png").read_bytes())  # committed, non-empty
