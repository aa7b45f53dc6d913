"""The search (selection on val only, failures, resume), the statistics against scipy and by hand, the
compute-matched continuation, the comparison end to end and notebook 05."""
import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from bissl_kit.checkpoint import CheckpointError, load_checkpoint
from bissl_kit.backbones import load_backbone
from bissl_kit.compare import CompareConfig, check_bissl_run, matched_config, parse_task, run_comparison, run_matched
from bissl_kit.reports import ARM_LABELS, comparison_table
from bissl_kit.stats import mean_ci, paired_ttest
from bissl_kit.config import ConfigError
from bissl_kit.downstream import load_data
from bissl_kit.finetune import FinetuneConfig, describe_source
from bissl_kit.hpo import run_search, sample_candidates, search_edges, select_best


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from test_finetune import tiny_runs
    return tiny_runs(tmp_path_factory.mktemp("sources"))


@pytest.fixture
def base(sources, tmp_path):
    """Fine-tuning of the BiSSL backbone on 20 digits per class: one short epoch per run."""
    return FinetuneConfig(backbone_checkpoint=str(sources[1]), labels_per_class=20, epochs=1, batch_size=64,
                          eval_every=0, progress=False, device="cpu", out_dir=str(tmp_path / "unused"))


@pytest.fixture
def data(base):
    return load_data("digits", load_backbone(base.backbone_checkpoint).pretrain_config, labels_per_class=20)


# ---- statistics ---------------------------------------------------------------------------------------------

def test_mean_ci_by_hand_and_against_scipy():
    # 1..5: mean 3, s = sqrt(2.5), t_{0.975, 4} = 2.776445 → half-width 2.776445·sqrt(2.5)/sqrt(5) = 1.963243
    res = mean_ci([1, 2, 3, 4, 5])
    assert res["n"] == 5 and res["mean"] == 3.0
    assert res["half_width"] == pytest.approx(1.963243, abs=1e-6)
    x = np.array([0.91, 0.87, 0.93, 0.88, 0.90, 0.86, 0.92])
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    res = mean_ci(x)
    assert (res["lo"], res["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert math.isnan(mean_ci([0.5])["half_width"])  # one value: no interval


def test_paired_ttest_by_hand_and_against_scipy():
    a = [0.90, 0.85, 0.88, 0.92, 0.87]
    b = [0.88, 0.84, 0.85, 0.91, 0.86]
    # d = (0.02, 0.01, 0.03, 0.01, 0.01): mean 0.016, s_d = sqrt(0.00008) = 0.0089443, t = 0.016/(s_d/√5) = 4.0
    res = paired_ttest(a, b)
    assert res["n"] == 5 and res["df"] == 4
    assert res["mean_diff"] == pytest.approx(0.016)
    assert res["t"] == pytest.approx(4.0, rel=1e-9)
    ref = stats.ttest_rel(a, b)
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert res["p"] == pytest.approx(0.016130, abs=1e-5)  # two-sided, 4 degrees of freedom
    lo, hi = stats.t.interval(0.95, 4, loc=0.016, scale=stats.sem(np.subtract(a, b)))
    assert (res["lo"], res["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert "n = 5" in res["test"]
    # the unpaired mistake would give a much larger p: pairing is what the test uses
    assert stats.ttest_ind(a, b).pvalue > 0.3 > res["p"]
    with pytest.raises(ValueError, match="same length"):
        paired_ttest([1, 2], [1])


# ---- the search ------------------------------------------------------------------------------------------------

def test_candidates_are_log_uniform_in_range_and_stable_under_a_bigger_budget():
    five = sample_candidates(5, seed=3)
    assert sample_candidates(3, seed=3) == five[:3]  # trial i depends on (seed, i) only
    assert sample_candidates(5, seed=4) != five
    big = sample_candidates(400, seed=0)
    lrs = np.log10([c[0] for c in big])
    wds = np.log10([c[1] for c in big])
    assert lrs.min() >= -4 and lrs.max() <= 0 and wds.min() >= -5 and wds.max() <= -2
    # log-uniform: about a quarter of the draws in each quarter of the log range
    assert 0.18 < np.mean(lrs < -3) < 0.32 and 0.18 < np.mean(wds > -2.75) < 0.32


def test_select_best_uses_val_only():
    trials = [{"trial": 0, "status": "ok", "val_top1": 0.80, "test_top1": 0.99},
              {"trial": 1, "status": "ok", "val_top1": 0.85, "test_top1": 0.10},
              {"trial": 2, "status": "failed", "error": "boom"},
              {"trial": 3, "status": "ok", "val_top1": 0.85, "test_top1": 0.50}]
    assert select_best(trials)["trial"] == 1  # best val; the tie goes to the earlier trial
    with pytest.raises(ValueError, match="val number"):
        select_best(trials, key="test_top1")
    with pytest.raises(RuntimeError, match="trial 2: boom"):
        select_best([trials[2]])


def test_search_edges_flag_a_choice_at_the_end_of_what_was_tried():
    trials = [{"trial": 0, "status": "ok", "lr": 0.01, "weight_decay": 1e-4},
              {"trial": 1, "status": "ok", "lr": 0.1, "weight_decay": 1e-3},
              {"trial": 2, "status": "ok", "lr": 0.03, "weight_decay": 1e-5},
              {"trial": 3, "status": "failed", "lr": 1.0, "weight_decay": 1e-2}]  # a failed trial was not tried
    assert search_edges(trials, trials[1]) == ["lr: the largest of 3 finished trials",
                                               "weight_decay: the largest of 3 finished trials"]
    assert search_edges(trials, trials[0]) == ["lr: the smallest of 3 finished trials"]
    assert search_edges(trials, trials[2]) == ["weight_decay: the smallest of 3 finished trials"]
    inside = {"trial": 4, "status": "ok", "lr": 0.02, "weight_decay": 2e-4}
    assert search_edges(trials + [inside], inside) == []
    assert search_edges(trials[:1], trials[0]) == []  # one value: no edge to speak of


def test_search_selects_on_val_and_never_reads_test(base, data, tmp_path):
    """A test split whose labels do not exist would crash any run that evaluates on it: the search trials
    must all succeed and score exactly as with the real test split; changing val must change the scores."""
    candidates = [(0.3, 1e-4), (0.003, 1e-4)]
    clean = run_search(base, candidates, seeds=0, out_dir=tmp_path / "clean", data=data)
    real_test = data.test()
    poisoned = data.__class__(**{**data.__dict__, "_test": None})
    poisoned.load_test = lambda: real_test.__class__(real_test.name, "test", torch.full_like(real_test.labels, 10**6),
                                                     real_test.num_classes, images=real_test.images)
    leak_check = run_search(base, candidates, seeds=0, out_dir=tmp_path / "poisoned", data=poisoned)
    assert [t["status"] for t in leak_check["trials"]] == ["ok", "ok"]
    assert poisoned._test is None  # the search never loaded the test split
    assert [t["val_top1"] for t in leak_check["trials"]] == [t["val_top1"] for t in clean["trials"]]
    assert not any(k.startswith("test") for t in leak_check["trials"] for k in t)
    assert leak_check["chosen"]["trial"] == select_best(clean["trials"])["trial"]
    # the final runs are where the test split is read, once each: with it poisoned they fail and say so
    with_seeds = run_search(base, candidates, seeds=1, out_dir=tmp_path / "poisoned", data=poisoned)
    assert with_seeds["seeds"][0]["status"] == "failed" and "out of bounds" in with_seeds["seeds"][0]["error"]
    # val drives the choice: the same runs scored against other val labels (all class 0) get other scores
    relabelled = data.__class__(**{**data.__dict__, "val": data.val.__class__(
        data.val.name, "val", torch.zeros_like(data.val.labels), data.val.num_classes, images=data.val.images)})
    other = run_search(base, candidates, seeds=0, out_dir=tmp_path / "relabelled", data=relabelled)
    assert [t["val_top1"] for t in other["trials"]] != [t["val_top1"] for t in clean["trials"]]
    # once the chosen trial has gone on to its test evaluation (seed 0), a re-read records the same trials
    run_search(base, candidates, seeds=1, out_dir=tmp_path / "clean", data=data)
    assert run_search(base, candidates, seeds=1, out_dir=tmp_path / "clean", data=data)["trials"] == clean["trials"]


def test_a_trial_folder_of_another_config_stops_the_search_instead_of_counting_as_failed(base, data, tmp_path):
    """A search killed before its first search.json leaves only trial folders; rerun with another config,
    each trial would fail the same way, and recording them as failed trials would hide the user's error."""
    from bissl_kit.checkpoint import RunConflictError
    out = tmp_path / "search"
    run_search(base, [(0.01, 1e-4)], seeds=0, out_dir=out, data=data)
    (out / "search.json").unlink()
    before = (out / "trial_00" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunConflictError, match="trial_00' holds a fine-tuning run with another config .*epochs"):
        run_search(base.replace(epochs=base.epochs + 1), [(0.01, 1e-4)], seeds=0, out_dir=out, data=data)
    assert (out / "trial_00" / "checkpoint.pt").read_bytes() == before


def test_a_failed_trial_keeps_the_others_and_a_rerun_resumes(base, data, tmp_path):
    candidates = [(0.01, 1e-4), (1e8, 0.0), (0.05, 1e-4)]  # lr 1e8 makes the loss non-finite
    out = tmp_path / "search"
    first = run_search(base, candidates, seeds=2, out_dir=out, data=data)
    status = [t["status"] for t in first["trials"]]
    assert status == ["ok", "failed", "ok"] and "FloatingPointError" in first["trials"][1]["error"]
    assert first["chosen"]["trial"] in (0, 2)
    assert [s["status"] for s in first["seeds"]] == ["ok", "ok"]
    assert all("test_top1" in s and "test (n=359)" in s["test_protocol"] for s in first["seeds"])
    assert first["seeds"][0]["run"] == first["chosen"]["run"]  # the chosen trial is seed 0's run
    saved = json.loads((out / "search.json").read_text())
    assert saved["chosen"] == first["chosen"]
    # a rerun re-reads finished runs instead of training them again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    again = run_search(base, candidates, seeds=2, out_dir=out, data=data)
    assert again["seeds"] == first["seeds"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")} == stamps


# ---- the compute-matched continuation and the comparison --------------------------------------------------------

def test_matched_continuation_is_the_pretraining_run_continued_with_the_lower_levels_steps(sources, tmp_path):
    from bissl_kit.pretrain import Pretrainer
    pre_ckpt, bissl_ckpt = sources
    b = load_checkpoint(bissl_ckpt, kind="bissl")["config"]
    cfg = CompareConfig(pretrain_checkpoint=str(pre_ckpt), out_dir=str(tmp_path), progress=False, device="cpu")
    matched = matched_config(cfg, b)
    assert matched.steps == b["stages"] * b["lower_steps"] == 2 and matched.init_checkpoint == str(pre_ckpt)
    assert (matched.batch_size, matched.lr, matched.warmup_steps, matched.seed, matched.official_first_step) == \
        (b["lower_batch_size"], b["lower_lr"], b["lower_warmup"], b["seed"], b["official_first_step"])
    a = run_matched(matched)
    again = run_matched(matched.replace(out_dir=str(tmp_path / "b")))
    la, lb = load_backbone(a), load_backbone(again)
    assert describe_source(la) == {"kind": "pretrain", "role": "pretrained", "path": str(a), "steps": 2,
                                   "continued_from": str(pre_ckpt)}
    assert all(torch.equal(p, q) for p, q in zip(la.backbone.parameters(), lb.backbone.parameters()))
    assert not torch.equal(la.backbone.conv1.weight, load_backbone(pre_ckpt).backbone.conv1.weight)
    with pytest.raises(CheckpointError, match="holds a pre-training run with another config .lr: saved 1.0, now 0.5"):
        Pretrainer(matched.replace(lr=0.5))


def test_bissl_runs_are_checked_against_the_task_and_the_pretext_run(sources, tmp_path):
    pre_ckpt, bissl_ckpt = sources
    run = bissl_ckpt.parent
    assert check_bissl_run(run, "digits", pre_ckpt)["finished_stages"] == 1
    with pytest.raises(ConfigError, match="is for task 'digits', not 'fashion_mnist:50'"):
        check_bissl_run(run, "fashion_mnist:50", pre_ckpt)
    with pytest.raises(ConfigError, match="no BiSSL run in .*python -m bissl_kit bissl"):
        check_bissl_run(tmp_path, "digits", pre_ckpt)


@pytest.mark.parametrize("values,needle", [
    ({"tasks": ("digits", "mnist")}, "unknown dataset 'mnist'"),
    ({"tasks": ("fashion_mnist:x",)}, "labelled images per class"),
    ({"arms": ("bissl", "finetuned")}, "arms=.* must be distinct values from"),
    ({"tasks": ("digits", "fashion_mnist:50")}, "bissl_runs has 1 entries but tasks has 2"),
    ({"lr_range": (1.0, 0.1)}, "lr_range=.* low <= high"),
    ({"trials": 0}, "trials=0 is out of range"),
])
def test_bad_compare_config_is_rejected(values, needle):
    with pytest.raises(ConfigError, match=needle):
        CompareConfig(**values)
    assert parse_task("fashion_mnist:50") == ("fashion_mnist", 50)


def test_comparison_end_to_end(sources, tmp_path):
    pre_ckpt, bissl_ckpt = sources
    cfg = CompareConfig(pretrain_checkpoint=str(pre_ckpt), tasks=("digits:20",), bissl_runs=(str(bissl_ckpt.parent),),
                        arms=("baseline_matched", "bissl", "baseline"), trials=2, seeds=2, epochs=1, batch_size=64,
                        probe_epochs=5, device="cpu", progress=False, out_dir=str(tmp_path / "cmp"))
    with pytest.raises(ConfigError, match="is for task 'digits', not 'digits:20'"):
        run_comparison(cfg)  # the BiSSL run trained its upper level on all of digits' train split
    cfg = cfg.replace(tasks=("digits",), results_dir=str(tmp_path / "results"))
    res = run_comparison(cfg, command="python -m bissl_kit compare ...")
    task = res["tasks"][0]
    assert task["matched_extra_steps"] == 2 and set(task["arms"]) == {"baseline_matched", "bissl", "baseline"}
    for arm in task["arms"].values():
        assert arm["test_top1"]["n"] == 2 and arm["frozen"]["knn_protocol"].startswith("digits test")
        assert [s["seed"] for s in arm["seeds"]] == [0, 1]
        assert [c["lr"] for c in arm["trials"]] == [c[0] for c in res["candidates"]]  # the same search for all
    assert task["distance_from_pretext"]["baseline"] == 0.0 and task["distance_from_pretext"]["bissl"] > 0
    pairs = {(p["a"], p["b"], p["metric"]) for p in task["paired"]}
    assert ("bissl", "baseline_matched", "test_top1") in pairs and ("bissl", "baseline", "test_top5") in pairs
    saved = json.loads((tmp_path / "results" / "comparison.json").read_text())
    assert saved["command"] == "python -m bissl_kit compare ..." and saved["tasks"] == json.loads(json.dumps(res["tasks"]))
    rows = (tmp_path / "results" / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("task,arm,seed,status") and len(rows) == 1 + 3 * 2
    table = (tmp_path / "results" / "comparison.md").read_text()
    assert table.startswith(comparison_table(res)) and "BiSSL − baseline, compute-matched" in table
    # two trials: whichever wins, its lr is the largest or the smallest tried, and the table says so
    for name, arm in task["arms"].items():
        assert any(e.startswith("lr: the ") for e in arm["chosen"]["edges"])
        assert f"{ARM_LABELS[name]}: lr: the " in table
    assert table.count(" † |") == 3 and "† chosen at the edge of the search" in table


def test_the_comparison_figure_is_exported_by_its_caller_where_figures_dir_says(tmp_path):
    """run_comparison writes text only; the command line exports the figure through export_comparison."""
    from bissl_kit.reports import load_results
    from bissl_kit.viz.compare import export_comparison
    results = load_results(Path(__file__).parents[1] / "results" / "comparison.json")
    assert export_comparison(results, CompareConfig(figures_dir=None)) == {}
    paths = export_comparison(results, CompareConfig(figures_dir=str(tmp_path / "fig"), figure_stem="cmp"))
    assert paths["html"] == tmp_path / "fig" / "cmp.html" and paths["html"].stat().st_size > 0


@pytest.mark.slow
def test_05_results_notebook_runs_headless(sources, tmp_path, monkeypatch):
    from bissl_kit.notebooks import QUICK, execute
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pre_ckpt, bissl_ckpt = sources
    params = {**QUICK["05_results"], "pretrain_checkpoint": str(pre_ckpt), "bissl_runs": [str(bissl_ckpt.parent)],
              "out_dir": str(tmp_path / "cmp"), "figures_dir": str(tmp_path / "fig"),
              "committed_results": str(Path(__file__).parents[1] / "results" / "comparison.json")}
    out = execute("05_results", params, output_dir=tmp_path / "nb")
    nb = json.loads(out.read_text())
    text = json.dumps(nb)
    assert out.stat().st_size < 2_000_000
    assert "mean diff" in text and "BiSSL" in text
    # the committed comparison is shown with its command: the repository's own results file
    shown = json.dumps([o for c in nb["cells"] for o in c.get("outputs", [])])
    assert "fashion_mnist:50" in shown and "that invocation:" in shown and "no committed results" not in shown
    # with its figure, which stays in figures/ wherever the demo's own figures go
    committed_png = base64.b64encode((Path(__file__).parents[1] / "figures" / "05_comparison.png").read_bytes())
    assert any(o.get("data", {}).get("image/png", "").replace("\n", "") == committed_png.decode()
               for c in nb["cells"] for o in c.get("outputs", []))
    assert (tmp_path / "fig" / "05_demo_comparison.html").exists()
    assert (tmp_path / "cmp" / "comparison.json").exists()


def test_compare_refuses_to_run_under_torchrun_before_any_work(monkeypatch, tmp_path):
    """Every rank would run every search and write the same files: a clear error, nothing written."""
    from bissl_kit.compare import run_comparison
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process it starts
    cfg = CompareConfig(out_dir=str(tmp_path / "compare"), results_dir=str(tmp_path / "results"), progress=False)
    with pytest.raises(ConfigError, match="runs as one process, not under torchrun"):
        run_comparison(cfg)
    assert not (tmp_path / "compare").exists() and not (tmp_path / "results").exists()
