"""The test over whole-run replicates: what a comparison can say about the method rather than one run of it.

Per task, per pair of arms and metric: per BiSSL replicate the mean over fine-tuning seeds of the paired
difference (that replicate's ``paired`` entry), then their mean, t over R (df R − 1), p and 95 % CI
(:func:`bissl_kit.stats.replicate_test`), and the variance of the paired differences split into a
between-run and a between-fine-tuning-seed part (:func:`bissl_kit.stats.variance_split`). Because every
replicate is fine-tuned with the same seeds, the seeds are crossed with the runs: ``crossed`` is the test
that treats both as random (:func:`bissl_kit.stats.crossed_test`), the headline of a replicated comparison.
"""

from __future__ import annotations

from ..stats import crossed_test, replicate_test, variance_split


def differences_by_seed(entry: dict, a: str, b: str, metric: str) -> dict[int, float]:
    """{fine-tuning seed: a − b} of one replicate's entry, over the seeds both arms finished, in seed order."""
    sa = {s["seed"]: s for s in entry["arms"][a]["seeds"] if s["status"] == "ok"}
    sb = {s["seed"]: s for s in entry["arms"][b]["seeds"] if s["status"] == "ok"}
    return {s: sa[s][metric] - sb[s][metric] for s in sorted(set(sa) & set(sb))}


def paired_differences(entry: dict, a: str, b: str, metric: str) -> list[float]:
    """The per-fine-tuning-seed differences a − b of one replicate's entry (seeds both arms finished)."""
    return list(differences_by_seed(entry, a, b, metric).values())


def crossed(reps: list[dict], a: str, b: str, metric: str) -> dict | None:
    """The run × fine-tuning-seed test (:func:`bissl_kit.stats.crossed_test`) on the seeds every replicate
    finished; None when fewer than two seeds are common to all."""
    per = [differences_by_seed(e, a, b, metric) for e in reps]
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    if len(per) < 2 or len(common) < 2:
        return None
    return {**crossed_test([[p[s] for s in common] for p in per]), "seeds_used": common}


def over_replicates(entries: list[dict]) -> list[dict]:
    """One record per task, pair and metric, over the task's replicate entries (in replicate order)."""
    out = []
    for task in dict.fromkeys(e["task"] for e in entries):
        reps = sorted((e for e in entries if e["task"] == task), key=lambda e: e["replicate"])
        for p in reps[0]["paired"]:
            a, b, metric = p["a"], p["b"], p["metric"]
            rows = []
            for e in reps:
                q = next(q for q in e["paired"] if (q["a"], q["b"], q["metric"]) == (a, b, metric))
                if q["n"]:
                    rows.append({"replicate": e["replicate"], "bissl_seed": e["bissl_seed"],
                                 "bissl_run": e["bissl_run"]["dir"], "n": q["n"], "mean_diff": q["mean_diff"],
                                 "differences": paired_differences(e, a, b, metric)})
            test = replicate_test([r["mean_diff"] for r in rows]) if rows else {"n": 0}
            out.append({"task": task, "a": a, "b": b, "metric": metric, "replicates": rows, **test,
                        "variance": variance_split([r["differences"] for r in rows]),
                        "crossed": crossed(reps, a, b, metric)})
    return out
