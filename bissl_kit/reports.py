"""The comparison's reports: the text files and tables every number of :mod:`bissl_kit.compare` is read in.

``comparison.json`` (everything, with the command), ``comparison.csv`` (one row per run) and
``comparison.md`` (the README's tables, then one protocol paragraph per task). Text only: the figure is
drawn by :mod:`bissl_kit.viz.compare`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .hpo import write_json

if TYPE_CHECKING:
    from .compare import CompareConfig

# how the tables, the protocol and the figure name each arm of bissl_kit.compare.ARMS
ARM_LABELS = {"baseline": "baseline", "baseline_matched": "baseline, compute-matched", "bissl": "BiSSL"}

# the BiSSL run of each row last, so that the columns before replication keep their places
CSV_FIELDS = ("task", "arm", "seed", "status", "lr", "weight_decay", "val_top1", "test_top1", "test_top5", "val_map",
              "test_map", "run", "test_protocol", "bissl_seed", "bissl_run")


def csv_text(results: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for t in results["tasks"]:
        for arm, a in t["arms"].items():
            for s in a["seeds"]:
                w.writerow({"task": t["task"], "bissl_seed": t["bissl_run"]["seed"], "bissl_run": t["bissl_run"]["dir"],
                            "arm": arm, **s})
    return buf.getvalue()


def _times(k) -> str:
    """' × K' for a solver run with K iterations ('' where the record leaves K to the solver)."""
    return f" × {k}" if k else ""


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _run_label(results: dict, t: dict) -> str:
    """The task, and with several BiSSL replicates which run of it a row is."""
    replicated = results["config"].get("bissl_replicates", 1) > 1
    return f"{t['task']} · BiSSL seed {t['bissl_run']['seed']}" if replicated else t["task"]


def comparison_table(results: dict) -> str:
    """The Markdown tables the README quotes: per arm, then the paired differences (per BiSSL run), then,
    with several BiSSL replicates, the test over them."""
    lines = ["| task | pipeline | n | test top-1 % or mAP (mean ± 95% CI) | test top-5 % | lr / wd (chosen on val) "
             "| k-NN test % | linear probe test % |", "|---|---|---|---|---|---|---|---|"]
    edges = []
    for t in results["tasks"]:
        for arm, a in t["arms"].items():
            multilabel = "test_map" in a  # VOC07: its mAP (×100) in the top-1 column, no top-5
            m1, m5 = (a["test_map"], None) if multilabel else (a["test_top1"], a["test_top5"])
            top1 = (f"{_pct(m1['mean'])} ± {_pct(m1['half_width'])}" + (" mAP" if multilabel else "")) if m1 else "failed"
            top5 = "—" if multilabel else f"{_pct(m5['mean'])} ± {_pct(m5['half_width'])}" if m5 else "failed"
            label = ARM_LABELS[arm] + (f" (+{t['matched_extra_steps']} pretext steps)" if arm == "baseline_matched" else "")
            # results written before the search recorded its edges carry none
            edge = a["chosen"].get("edges") or []
            if edge:
                edges.append(f"{t['task']}, {ARM_LABELS[arm]}: {'; '.join(edge)}")
            lines.append(f"| {_run_label(results, t)} | {label} | {m1['n'] if m1 else 0} | {top1} | {top5} | "
                         f"{a['chosen']['lr']:.3g} / {a['chosen']['weight_decay']:.3g}{' †' if edge else ''} | "
                         f"{_pct(a['frozen']['knn'])} | {_pct(a['frozen'].get('probe'))} |")
    if edges:
        lines += ["", "† chosen at the edge of the search, so the best value may lie outside what was tried "
                  "(more trials or a wider range would tell): " + "; ".join(edges) + "."]
    lines += ["", "| task | difference (paired by seed) | metric | n | mean diff, points [95% CI] | t | p |",
              "|---|---|---|---|---|---|---|"]
    for t in results["tasks"]:
        for p in t["paired"]:
            if not p["n"]:
                continue
            lines.append(f"| {_run_label(results, t)} | {ARM_LABELS[p['a']]} − {ARM_LABELS[p['b']]} | {p['metric']} | "
                         f"{p['n']} | {100 * p['mean_diff']:+.2f} [{100 * p['lo']:+.2f}, {100 * p['hi']:+.2f}] | "
                         f"{p['t']:.2f} | {p['p']:.3g} |")
    if results.get("replication"):
        lines += ["", replication_table(results["replication"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def replication_table(records: list[dict]) -> str:
    """The tests over BiSSL replicates and the variance split. Every replicate is fine-tuned with the same
    seeds, so the headline treats the run and the fine-tuning seed as random draws (crossed); the t over the
    R run means beside it conditions on the seeds drawn."""
    lines = ["| task | difference (over BiSSL runs) | metric | R × S | per-run mean diffs, points "
             "| mean diff [95% CI], runs and seeds random | t (df) | p | t over the R run means: [95% CI], p "
             "| SD between runs / seeds / residual, points |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r["n"]:
            continue
        per = ", ".join(f"{100 * x['mean_diff']:+.2f} (seed {x['bissl_seed']})" for x in r["replicates"])
        runs_only = f"[{100 * r['lo']:+.2f}, {100 * r['hi']:+.2f}], {r['p']:.3g}"
        c = r.get("crossed")
        if c:
            sds = " / ".join(points_sd_text(c[k]) for k in ("var_run", "var_seed", "var_residual"))
            ci = f"[{points_text(c['lo'])}, {points_text(c['hi'])}]"
            head = (f"{r['n']} × {c['seeds']} | {per} | {100 * c['mean_diff']:+.2f} {ci} "
                    f"| {num_text(c['t'], '.2f')} ({num_text(c['df'], '.1f')}) | {num_text(c['p'], '.3g')}")
        else:  # the replicates share fewer than two seeds: only the t over the runs
            v = r["variance"]
            sds = f"{points_sd_text(v['var_between'])} / n/a / {points_sd_text(v['var_within'])}"
            head = f"{r['n']} × – | {per} | n/a | n/a | n/a"
        lines.append(f"| {r['task']} | {ARM_LABELS[r['a']]} − {ARM_LABELS[r['b']]} | {r['metric']} | {head} | "
                     f"{runs_only} | {sds} |")
    return "\n".join(lines) + "\n"


# the tables' number formats, shared with the sweep's table (bissl_kit.experiments.sweep); NaN and None are "n/a"

def num_text(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def points_text(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}"


def points_sd_text(var) -> str:
    return "n/a" if var is None or math.isnan(var) else f"{100 * math.sqrt(var):.2f}"


def protocol_text(results: dict) -> str:
    """One paragraph per task stating the protocol of every number in the tables."""
    c = results["config"]
    out = []
    for t in results["tasks"]:
        if t.get("replicate", 0):  # one paragraph per task: its replicates differ only in the stage seed
            continue
        b = t["bissl_run"]
        seeds = [u["bissl_run"]["seed"] for u in results["tasks"] if u["task"] == t["task"]]
        arm0 = next(iter(t["arms"].values()))
        out.append(
            f"- **{t['task']}** ({t['n_train']} train / {t['n_val']} val / {t['n_test']} test images). Every arm: "
            f"random search of {c['trials']} (lr, wd) pairs shared by all arms (log-uniform, lr in "
            f"[{c['lr_range'][0]:g}, {c['lr_range'][1]:g}], wd in [{c['wd_range'][0]:g}, {c['wd_range'][1]:g}]), "
            f"selected on val {'mAP' if 'test_map' in arm0 else 'top-1'} "
            f"of the {c['select']}-epoch model, then {c['seeds']} seeds evaluated once on test; "
            f"fine-tuning {c['epochs']} epochs, batch {c['batch_size']}, SGD momentum {c['momentum']:g}, cosine. "
            + (f"{len(seeds)} BiSSL runs (stage seeds {', '.join(map(str, seeds))}), each: " if len(seeds) > 1 else "")
            + f"BiSSL run: {b['stages']} stages × (N_L {b['lower_steps']}, N_U {b['upper_steps']}), γ {b['gamma']:g}, "
            f"solver {b['solver']}{_times(b.get('solver_iters', b.get('cg_iters')))}; "
            f"matched baseline: +{t['matched_extra_steps']} pretext steps. "
            + ("Backbones moved from the pretext one by (relative L2 of the parameters) "
               + ", ".join(f"{ARM_LABELS[a]} {d:.3g}" for a, d in t["distance_from_pretext"].items())
               + (f"; BiSSL vs matched {t['distance_bissl_to_matched']:.3g}" if "distance_bissl_to_matched" in t else "")
               + ". " if "distance_from_pretext" in t else "") +
            f"Frozen: {arm0['frozen']['knn_protocol']}; {arm0['frozen'].get('probe_protocol', 'no probe')}.")
    return "\n".join(out) + "\n"


def write_results(results: dict, cfg: "CompareConfig") -> dict:
    """comparison.json, comparison.csv and comparison.md in ``cfg.results_dir`` (else ``cfg.out_dir``),
    each written atomically; their paths. The figure is the caller's to export
    (:func:`bissl_kit.viz.compare.export_comparison`), so that running a comparison needs no plotly."""
    out = Path(cfg.results_dir or cfg.out_dir)
    paths = {"json": write_json(out / "comparison.json", results)}
    for suffix, text in (("csv", csv_text(results)),
                         ("md", comparison_table(results) + "\nProtocol:\n\n" + protocol_text(results)
                          + (f"\nCommand: `{results['command']}`\n" if results.get("command") else ""))):
        tmp = out / f".comparison.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"comparison.{suffix}")
        paths[suffix] = out / f"comparison.{suffix}"
    return paths


def load_results(path: str | Path) -> dict:
    """A ``comparison.json`` as :func:`write_results` wrote it."""
    return json.loads(Path(path).read_text())
