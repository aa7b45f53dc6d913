"""The digits comparison over three BiSSL-stage seeds: the committed run (seed 0, ``comparison.json``) and
``run_bissl_seeds.sh``'s seeds 1 and 2 (``bissl_seeds/seed_S/``), all under one results folder. The unit
of replication is the BiSSL run (with its own compute-matched continuation, which copies the BiSSL seed),
so the test is over the three per-run mean differences, not over the fifteen fine-tuning pairs.

    .venv/bin/python results/summarise_bissl_seeds.py [results_folder]   # writes <folder>/bissl_seeds/summary.md
"""
import json
import sys
from pathlib import Path

from bissl_kit.stats import paired_ttest

TASK = "digits"


def main(folder: Path):
    runs = {0: folder / "comparison.json", **{s: folder / f"bissl_seeds/seed_{s}/comparison.json" for s in (1, 2)}}
    rows, diffs, searches = [], [], set()
    for seed, path in runs.items():
        results = json.loads(path.read_text())
        c = results["config"]
        searches.add((c["trials"], c["seeds"], c["epochs"], results["pretrain"]["steps"]))
        task = next(t for t in results["tasks"] if t["task"] == TASK)
        if task["bissl_run"]["seed"] != seed:
            raise SystemExit(f"{path}: the BiSSL run has seed {task['bissl_run']['seed']}, expected {seed}")
        top1 = {arm: a["test_top1"] for arm, a in task["arms"].items()}
        pair = next(p for p in task["paired"] if p["metric"] == "test_top1" and p["a"] == "bissl"
                    and p["b"] == "baseline_matched")
        diffs.append(pair["mean_diff"])
        rows.append(f"| {seed} | {100 * top1['baseline_matched']['mean']:.1f} | {100 * top1['bissl']['mean']:.1f} | "
                    f"{100 * pair['mean_diff']:+.2f} [{100 * pair['lo']:+.2f}, {100 * pair['hi']:+.2f}] | "
                    f"{pair['p']:.3g} | {task['arms']['baseline_matched']['frozen']['knn'] * 100:.1f} / "
                    f"{task['arms']['bissl']['frozen']['knn'] * 100:.1f} |")
    if len(searches) != 1:
        raise SystemExit(f"the three comparisons differ in (trials, seeds, epochs, pretext steps): {sorted(searches)}")
    trials, seeds, epochs, _ = searches.pop()
    over = paired_ttest(diffs, [0.0] * len(diffs))  # a one-sample t-test of the per-run differences
    text = "\n".join([
        f"# {TASK}: BiSSL − compute-matched baseline over BiSSL-stage seeds",
        "",
        f"One pretext checkpoint; per BiSSL seed: a BiSSL run at notebook 02's demo "
        "settings and the matched continuation with the same seed, each fine-tuned with the same "
        f"{trials}-trial search "
        f"and {seeds} fine-tuning seeds ({epochs} epochs). Test top-1 %, mean over the fine-tuning seeds; the difference "
        "is paired by fine-tuning seed (95 % t-interval, two-sided p); k-NN on the frozen backbone, BN "
        "statistics as held.",
        "",
        "| BiSSL seed | matched baseline | BiSSL | BiSSL − baseline, points [95% CI] | p | k-NN baseline / BiSSL |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Over the {over['n']} BiSSL seeds (one mean difference per seed): **{100 * over['mean_diff']:+.2f} points "
        f"[{100 * over['lo']:+.2f}, {100 * over['hi']:+.2f}]**, t = {over['t']:.2f}, df = {over['df']}, "
        f"p = {over['p']:.3g}.",
        "",
    ])
    out = folder / "bissl_seeds/summary.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
