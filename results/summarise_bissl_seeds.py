"""The digits comparison over three BiSSL-stage seeds: the committed run (seed 0, ``results/comparison.json``)
and ``run_bissl_seeds.sh``'s seeds 1 and 2. The unit of replication is the BiSSL run (with its own
compute-matched continuation, which copies the BiSSL seed), so the test is over the three per-run
mean differences, not over the fifteen fine-tuning pairs.

    .venv/bin/python results/summarise_bissl_seeds.py     # writes results/bissl_seeds/summary.md
"""
import json
from pathlib import Path

from bissl_kit.compare import mean_ci

HERE = Path(__file__).parent
RUNS = {0: HERE / "comparison.json", 1: HERE / "bissl_seeds/seed_1/comparison.json",
        2: HERE / "bissl_seeds/seed_2/comparison.json"}
TASK = "digits"


def main():
    rows, diffs = [], []
    for seed, path in RUNS.items():
        task = next(t for t in json.loads(path.read_text())["tasks"] if t["task"] == TASK)
        if task["bissl_run"]["seed"] != seed:
            raise SystemExit(f"{path}: the BiSSL run has seed {task['bissl_run']['seed']}, expected {seed}")
        top1 = {arm: mean_ci([s["test_top1"] for s in a["seeds"] if s["status"] == "ok"])
                for arm, a in task["arms"].items()}
        pair = next(p for p in task["paired"] if p["metric"] == "test_top1" and p["a"] == "bissl"
                    and p["b"] == "baseline_matched")
        diffs.append(pair["mean_diff"])
        rows.append(f"| {seed} | {100 * top1['baseline_matched']['mean']:.1f} | {100 * top1['bissl']['mean']:.1f} | "
                    f"{100 * pair['mean_diff']:+.2f} [{100 * pair['lo']:+.2f}, {100 * pair['hi']:+.2f}] | "
                    f"{pair['p']:.3g} | {task['arms']['baseline_matched']['frozen']['knn'] * 100:.1f} / "
                    f"{task['arms']['bissl']['frozen']['knn'] * 100:.1f} |")
    over = mean_ci(diffs)
    from scipy import stats
    t = over["mean"] / (over["sd"] / over["n"] ** 0.5)
    p = float(2 * stats.t.sf(abs(t), over["n"] - 1))
    text = "\n".join([
        f"# {TASK}: BiSSL − compute-matched baseline over BiSSL-stage seeds",
        "",
        "One pretext checkpoint (`runs/comparison/pretrain`); per BiSSL seed: a BiSSL run at notebook 02's demo "
        "settings and the matched continuation with the same seed, each fine-tuned with the same 4-trial search "
        "and 5 fine-tuning seeds (10 epochs). Test top-1 %, mean over the 5 fine-tuning seeds; the difference "
        "is paired by fine-tuning seed (95 % t-interval, two-sided p); k-NN on the frozen backbone, BN "
        "statistics as held.",
        "",
        "| BiSSL seed | matched baseline | BiSSL | BiSSL − baseline, points [95% CI] | p | k-NN baseline / BiSSL |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Over the {over['n']} BiSSL seeds (one mean difference per seed): **{100 * over['mean']:+.2f} points "
        f"[{100 * over['lo']:+.2f}, {100 * over['hi']:+.2f}]**, t = {t:.2f}, df = {over['n'] - 1}, p = {p:.3g}.",
        "",
    ])
    out = HERE / "bissl_seeds/summary.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
