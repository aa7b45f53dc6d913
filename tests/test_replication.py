"""Replication over whole BiSSL runs: the statistics against closed forms and scipy, the committed
BiSSL-seed replication re-derived, and a replicated comparison end to end whose numbers do not depend on
the order or the executor the job graph runs in."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from bissl_kit.compare import CompareConfig, plan_replicates, run_comparison
from bissl_kit.engine import run_jobs
from bissl_kit.experiments.jobs import comparison_jobs
from bissl_kit.experiments.replication import over_replicates
from bissl_kit.hpo import sample_candidates
from bissl_kit.reports import comparison_table
from bissl_kit.stats import crossed_test, replicate_test, variance_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


# ---- statistics -------------------------------------------------------------------------------------------

def test_variance_split_by_hand_and_against_scipy():
    # groups (1, 2, 3) and (4, 5, 6): means 2 and 5, grand mean 3.5; SSB = 3·(1.5² + 1.5²) = 13.5 on 1 df,
    # SSW = 2 + 2 = 4 on 4 df: MSB = 13.5, MSW = 1, σ²_between = (13.5 − 1)/3 = 25/6, σ²_within = 1, F = 13.5
    v = variance_split([[1, 2, 3], [4, 5, 6]])
    assert (v["ms_between"], v["ms_within"], v["f"]) == (pytest.approx(13.5), pytest.approx(1.0), pytest.approx(13.5))
    assert v["var_between"] == pytest.approx(25 / 6) and v["var_within"] == pytest.approx(1.0)
    assert v["share_between"] == pytest.approx((25 / 6) / (25 / 6 + 1))
    assert v["p"] == pytest.approx(stats.f_oneway([1, 2, 3], [4, 5, 6]).pvalue, rel=1e-12)
    # unbalanced: (0, 2) and (3, 5, 7): means 1 and 5, grand 3.4; SSB = 2·2.4² + 3·1.6² = 19.2, SSW = 2 + 8 = 10
    # on 3 df; n₀ = (5 − 13/5)/1 = 2.4, σ²_between = (19.2 − 10/3)/2.4
    v = variance_split([[0, 2], [3, 5, 7]])
    assert v["ms_between"] == pytest.approx(19.2) and v["ms_within"] == pytest.approx(10 / 3)
    assert v["var_between"] == pytest.approx((19.2 - 10 / 3) / 2.4)
    assert v["p"] == pytest.approx(stats.f_oneway([0, 2], [3, 5, 7]).pvalue, rel=1e-12)
    # runs that agree better than seeds do: the between part is clipped at 0, never negative
    assert variance_split([[0, 1], [0.1, 0.9]])["var_between"] == 0.0
    assert math.isnan(variance_split([[1, 2, 3]])["var_between"])  # one run: no between-run part


def test_replicate_test_is_a_t_test_over_runs():
    d = [0.01, -0.02, 0.005]
    res, ref = replicate_test(d), stats.ttest_1samp(d, 0.0)
    assert res["n"] == 3 and res["df"] == 2 and res["mean_diff"] == pytest.approx(np.mean(d))
    assert (res["t"], res["p"]) == (pytest.approx(ref.statistic, rel=1e-12), pytest.approx(ref.pvalue, rel=1e-12))
    ci = ref.confidence_interval(0.95)
    assert (res["lo"], res["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_crossed_test_reduces_to_the_t_over_the_factor_that_varies():
    seeds = np.array([0.02, -0.01, 0.03, 0.00, 0.015])  # runs that agree exactly: the t over the seed means
    res, ref = crossed_test(np.tile(seeds, (3, 1))), stats.ttest_1samp(seeds, 0.0)
    assert res["df"] == pytest.approx(len(seeds) - 1) and res["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert (res["lo"], res["hi"]) == (pytest.approx(ref.confidence_interval().low), pytest.approx(ref.confidence_interval().high))
    assert res["var_run"] == pytest.approx(0, abs=1e-18) and res["var_residual"] == pytest.approx(0, abs=1e-18)
    runs = np.array([0.01, -0.02, 0.005])  # seeds that agree exactly: the t over the run means
    res, ref = crossed_test(np.tile(runs[:, None], (1, 4))), stats.ttest_1samp(runs, 0.0)
    assert res["df"] == pytest.approx(2) and res["p"] == pytest.approx(ref.pvalue, rel=1e-12)


def test_crossed_test_mean_squares_are_the_two_way_anova_by_least_squares():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(3, 5)) + 3 * rng.normal(size=(3, 1)) + 3 * rng.normal(size=(1, 5))
    r, s = d.shape
    # the additive model's residual by least squares, with run and seed indicator columns
    X = np.hstack([np.ones((r * s, 1)), np.kron(np.eye(r), np.ones((s, 1)))[:, 1:], np.kron(np.ones((r, 1)), np.eye(s))[:, 1:]])
    beta = np.linalg.lstsq(X, d.reshape(-1), rcond=None)[0]
    ms_e = float(((d.reshape(-1) - X @ beta) ** 2).sum()) / ((r - 1) * (s - 1))
    ms_r = s * d.mean(axis=1).var(ddof=1)
    ms_s = r * d.mean(axis=0).var(ddof=1)
    assert ms_r > ms_e and ms_s > ms_e  # both effects seen: no component is truncated
    res = crossed_test(d)
    assert res["var_residual"] == pytest.approx(ms_e, rel=1e-12)
    assert res["se"] ** 2 == pytest.approx((ms_r + ms_s - ms_e) / (r * s), rel=1e-12)
    df = (ms_r + ms_s - ms_e) ** 2 / (ms_r ** 2 / (r - 1) + ms_s ** 2 / (s - 1) + ms_e ** 2 / ((r - 1) * (s - 1)))
    assert res["df"] == pytest.approx(df, rel=1e-12)
    assert res["p"] == pytest.approx(2 * stats.t.sf(abs(d.mean() / res["se"]), df), rel=1e-12)
    assert math.isnan(crossed_test(d[:1])["t"])
    # runs that agree better than the residual allows (MS_R < MS_E): σ²_run is set to 0, and the test is
    # the t over the seed means
    d = np.array([[-5.57, 2.23, -2.79, -0.56, 2.23], [-4.18, 1.67, -1.39, 0.56, -1.11], [-1.11, -2.51, -0.28, -0.56, -0.28]])
    res, ref = crossed_test(d), stats.ttest_1samp(d.mean(axis=0), 0.0)
    assert res["var_run"] == 0 and res["df"] == pytest.approx(4)
    assert (res["t"], res["p"]) == (pytest.approx(ref.statistic, rel=1e-12), pytest.approx(ref.pvalue, rel=1e-12))


def test_the_committed_bissl_seed_replication_is_what_over_replicates_gives():
    # results/summarise_bissl_seeds.py tested the three per-run differences of the committed runs; the
    # comparison's own test over replicates, given the same three comparisons, gives the same numbers
    paths = [ROOT / "results/comparison.json"] + [ROOT / f"results/bissl_seeds/seed_{s}/comparison.json" for s in (1, 2)]
    entries = []
    for r, path in enumerate(paths):
        task = next(t for t in json.loads(path.read_text())["tasks"] if t["task"] == "digits")
        entries.append({**task, "replicate": r, "bissl_seed": task["bissl_run"]["seed"]})
    rec = next(x for x in over_replicates(entries) if (x["a"], x["b"], x["metric"]) == ("bissl", "baseline_matched",
                                                                                       "test_top1"))
    summary = (ROOT / "results/bissl_seeds/summary.md").read_text()
    line = f"**{100 * rec['mean_diff']:+.2f} points [{100 * rec['lo']:+.2f}, {100 * rec['hi']:+.2f}]**, " \
           f"t = {rec['t']:.2f}, df = {rec['df']}, p = {rec['p']:.3g}"
    assert line in summary and [x["bissl_seed"] for x in rec["replicates"]] == [0, 1, 2]
    assert rec["variance"]["n"] == 15 and rec["variance"]["replicates"] == 3
    assert rec["crossed"]["n"] == 15 and rec["crossed"]["seeds_used"] == [0, 1, 2, 3, 4]


# ---- a replicated comparison -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from test_finetune import tiny_runs
    return tiny_runs(tmp_path_factory.mktemp("sources"))


def replicated(sources, tmp_path, **kw):
    """R = 2 BiSSL runs from a JSON template (nothing run beforehand), one tiny search."""
    pre_ckpt, _ = sources
    template = tmp_path / "template.json"
    template.write_text(json.dumps(dict(stages=1, lower_steps=2, upper_steps=2, lower_batch_size=16, upper_batch_size=16,
                                        head_warmup_epochs=1, lower_warmup=1, seed=3)))
    return CompareConfig(pretrain_checkpoint=str(pre_ckpt), tasks=("digits:20",), bissl_runs=(str(template),),
                         bissl_replicates=2, arms=("baseline_matched", "bissl"), trials=2, seeds=2, epochs=1,
                         batch_size=64, probe=False, device="cpu", progress=False, out_dir=str(tmp_path / "cmp"), **kw)


def numbers(results: dict) -> list:
    return [(t["bissl_seed"], arm, s["seed"], s["test_top1"], a["frozen"]["knn"])
            for t in results["tasks"] for arm, a in t["arms"].items() for s in a["seeds"]]


def test_a_replicated_comparison_tests_over_its_bissl_runs(sources, tmp_path):
    cfg = replicated(sources, tmp_path)
    res = run_comparison(cfg, command="python -m bissl_kit compare ...")
    assert [(t["replicate"], t["bissl_seed"]) for t in res["tasks"]] == [(0, 3), (1, 4)]
    dirs = [t["bissl_run"]["dir"] for t in res["tasks"]]
    assert len(set(dirs)) == 2 and all((Path(d) / "checkpoint.pt").exists() for d in dirs)
    matched = {t["arms"]["baseline_matched"]["backbone"] for t in res["tasks"]}
    assert len(matched) == 2  # each replicate its own continuation: it copies the stage seed
    rec = next(r for r in res["replication"] if r["metric"] == "test_top1" and r["b"] == "baseline_matched")
    per_run = [next(p for p in t["paired"] if p["metric"] == "test_top1" and p["b"] == "baseline_matched")["mean_diff"]
               for t in res["tasks"]]
    assert [r["mean_diff"] for r in rec["replicates"]] == per_run and rec["n"] == 2 and rec["df"] == 1
    assert rec["mean_diff"] == pytest.approx(sum(per_run) / 2) and [r["bissl_run"] for r in rec["replicates"]] == dirs
    assert rec["variance"]["n"] == 4
    table = (Path(cfg.out_dir) / "comparison.md").read_text()
    assert "digits:20 · BiSSL seed 4" in table and "over BiSSL runs" in table and table.startswith(comparison_table(res))
    rows = (Path(cfg.out_dir) / "comparison.csv").read_text().splitlines()
    assert rows[0].endswith("bissl_seed,bissl_run") and len(rows) == 1 + 2 * 2 * 2
    # run again: every run is re-read, nothing changes
    assert numbers(run_comparison(cfg)) == numbers(res)


def test_the_numbers_do_not_depend_on_the_order_of_the_graph(sources, tmp_path):
    results = []
    for i, order in enumerate((lambda js: js, lambda js: js[::-1])):
        (tmp_path / f"o{i}").mkdir()  # one arm, one trial: the graph's shape (replicates, Refs) is what matters
        cfg = replicated(sources, tmp_path / f"o{i}").replace(arms=("bissl",), trials=1)
        reps = plan_replicates(cfg, cfg.tasks[0], cfg.bissl_runs[0])
        cands = sample_candidates(cfg.trials, seed=cfg.search_seed, lr_range=cfg.lr_range, wd_range=cfg.wd_range)
        jobs, plans = comparison_jobs(cfg, reps, cands, legacy=False)
        done = run_jobs(order(jobs), progress=False)
        results.append([[done[k]["test_top1"] for k in plans[r]["arms"][arm]["seeds"]]
                        + [done[plans[r]["arms"][arm]["frozen"]]["frozen"]["knn"]] for r in range(2) for arm in cfg.arms])
    assert results[0] == results[1]


def test_ray_gives_the_numbers_of_the_sequential_executor(sources, tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "seq").mkdir()
    (tmp_path / "ray").mkdir()
    seq = run_comparison(replicated(sources, tmp_path / "seq"))
    ray = run_comparison(replicated(sources, tmp_path / "ray", executor="ray"))
    assert numbers(ray) == numbers(seq)
