"""Hyper-parameter search for fine-tuning (spec §2.1 stage 5, §2.2): random search, selection on val,
then N seeds at the chosen values.

* **Candidates.** Trial i draws lr and weight decay log-uniformly from their ranges with a generator
  seeded by (search seed, i), so trial i is the same whatever the budget: raising ``trials`` extends a
  search, and two arms searched with the same seed try the *same* (lr, wd) pairs (neither is tuned
  harder). The official ranges are lr ∈ [1e-4, 1], wd ∈ [1e-5, 1e-2] (V1; the official draws are also
  quantised to 1e-4 / 1e-5 steps, ours are not).
* **Trials** are fine-tuning runs with ``test=False``: the test split is never loaded while searching.
  The score is the val top-1 (val mAP: a multi-label task) of the reported model (``select``), i.e. the
  number the final runs would report on test. The best trial wins; ties go to the earlier trial.
* **Seeds.** The final runs use the chosen (lr, wd) and seeds ``seed, seed + 1, …``; the run with the
  trial seed *is* the chosen trial, continued to its test evaluation (the search's seed is one of the
  N seeds). Test numbers are computed once per final run.
* **Robustness.** Each run resumes from its own checkpoint; ``search.json`` is rewritten atomically after
  every run; a trial that fails (non-finite loss, a bad value) is recorded with its error and the
  others carry on. Running the search again re-reads the finished runs and retries failed ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .files import write_text_atomic
from .downstream import DownstreamData
from .finetune import FinetuneConfig, finetune
from .rng import generator

class SearchFailedError(RuntimeError):
    """No trial of a search finished, or a finished one cannot be read back: the search cannot choose."""


# the official search ranges (spec §2.2, V1)
LR_RANGE = (1e-4, 1.0)
WD_RANGE = (1e-5, 1e-2)


def sample_candidates(n: int, *, seed: int = 0, lr_range=LR_RANGE, wd_range=WD_RANGE) -> list[tuple[float, float]]:
    """``n`` (lr, weight decay) pairs, each log-uniform in its range; pair i depends on (seed, i) only."""
    out = []
    for i in range(n):
        u = torch.rand(2, generator=generator(seed, "hpo-trial", i), dtype=torch.float64).tolist()
        lr = math.exp(math.log(lr_range[0]) + u[0] * (math.log(lr_range[1]) - math.log(lr_range[0])))
        wd = math.exp(math.log(wd_range[0]) + u[1] * (math.log(wd_range[1]) - math.log(wd_range[0])))
        out.append((float(f"{lr:.4g}"), float(f"{wd:.4g}")))  # 4 significant digits: readable in tables
    return out


def select_best(trials: list[dict], *, key: str | None = None) -> dict:
    """The successful trial with the highest ``key`` (a val number; None: val_map where the trials have it, a
    multi-label task, else val_top1); ties go to the earlier trial."""
    key = key or selection_key(trials)
    if not key.startswith("val_"):
        raise ValueError(f"trials are selected on a val number, not {key!r}")
    ok = [t for t in trials if t.get("status") == "ok"]
    if not ok:
        first = f"trial {trials[0].get('trial')}: {trials[0].get('error')}" if trials else "no trials"
        raise SearchFailedError(
            f"every one of the {len(trials)} search trials failed, so there is nothing to choose ({first}); "
            "a lower lr_range, fewer epochs of a diverging schedule or clipping may help; each trial's error is "
            "in its run folder and in search.json")
    return max(ok, key=lambda t: (t[key], -t["trial"]))


def selection_key(trials: list[dict]) -> str:
    """'val_map' for trials of a multi-label task (their records hold it), else 'val_top1'."""
    return "val_map" if any("val_map" in t for t in trials) else "val_top1"


def search_edges(trials: list[dict], chosen: dict) -> list[str]:
    """Where the chosen trial sits at the edge of what the search tried: e.g. ``["lr: the largest of 4
    finished trials"]``. A choice at an edge says the best value may lie outside the tried ones (widen
    the range or add trials), so the comparison flags it instead of leaving it to the reader."""
    ok = [t for t in trials if t.get("status") == "ok"]
    out = []
    for key in ("lr", "weight_decay"):
        values = sorted({t[key] for t in ok})
        if len(values) < 2:
            continue
        if chosen[key] == values[-1]:
            out.append(f"{key}: the largest of {len(ok)} finished trials")
        elif chosen[key] == values[0]:
            out.append(f"{key}: the smallest of {len(ok)} finished trials")
    return out


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (:func:`bissl_kit.files.write_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _attempt(cfg: FinetuneConfig, data: DownstreamData | None, before: dict | None = None) -> dict:
    """Run one fine-tuning to its end; a failure of the run itself (a diverging loss) becomes a record
    instead of an exception. ``before``: the run's record from an earlier pass of the search; a run that
    had finished must read back as finished, never become a failed trial."""
    try:
        return {"status": "ok", **finetune(cfg, data=data)}
    except (ConfigError, CheckpointError):
        # the user's input or a damaged file, not the trial's luck: every other trial would hit it too, and
        # a finished run must not be re-classified by it (CheckpointError covers RunConflictError)
        raise
    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others (KeyboardInterrupt passes)
        if before is not None and before.get("status") == "ok":
            raise SearchFailedError(f"the run {cfg.out_dir!r} had finished (search.json records it) but cannot be "
                                    f"read back now ({type(e).__name__}: {e}); the search stops rather than count "
                                    "it as failed: restore or delete that folder") from e
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def _earlier(path: Path) -> dict:
    """The trials and seed runs an earlier pass of the search recorded (by trial index and seed)."""
    if not path.exists():
        return {"trials": {}, "seeds": {}}
    try:
        saved = json.loads(path.read_text())
        return {"trials": {t["trial"]: t for t in saved["trials"]}, "seeds": {r["seed"]: r for r in saved["seeds"]}}
    except (ValueError, KeyError, TypeError) as e:
        raise SearchFailedError(f"{str(path)!r} is damaged ({type(e).__name__}: {e}); the runs themselves are intact: "
                                "delete the file and run the search again to rebuild it from them") from None


# One trial, the choice and one seed run: the search's steps, run in order by run_search and as jobs of a
# graph by bissl_kit.experiments.jobs.

def trial_run(base: FinetuneConfig, trial: int, lr: float, wd: float, out: Path, data: DownstreamData | None,
              before: dict | None) -> dict:
    """One search trial in ``out/trial_NN``: val numbers only (the test split is never loaded)."""
    run = out / f"trial_{trial:02d}"
    cfg = base.replace(lr=lr, weight_decay=wd, test=False, progress=False, out_dir=str(run))
    rec = {"trial": trial, "lr": lr, "weight_decay": wd, "run": str(run), **_attempt(cfg, data, before)}
    return {k: v for k, v in rec.items() if not k.startswith("test") and k != "n_test"}


def chosen_record(trials: list[dict]) -> dict:
    """The best trial on val (val_top1, or val_map for a multi-label task; ties to the earlier one)."""
    chosen, key = select_best(trials), selection_key(trials)
    return {"trial": chosen["trial"], "lr": chosen["lr"], "weight_decay": chosen["weight_decay"], key: chosen[key],
            "run": chosen["run"], "edges": search_edges(trials, chosen)}


def seed_run(base: FinetuneConfig, chosen: dict, seed: int, out: Path, data: DownstreamData | None,
             before: dict | None) -> dict:
    """A final run at the chosen values; the search's own seed's run *is* the chosen trial, continued to test."""
    run = Path(chosen["run"]) if seed == base.seed else out / f"seed_{seed}"
    cfg = base.replace(lr=chosen["lr"], weight_decay=chosen["weight_decay"], seed=seed, test=True, progress=False,
                       out_dir=str(run))
    return {"seed": seed, "run": str(run), **_attempt(cfg, data, before)}


def run_search(base: FinetuneConfig, candidates: list[tuple[float, float]], *, seeds: int, out_dir: str | Path,
               data: DownstreamData | None = None, on_run=None) -> dict:
    """Trials at ``candidates`` (selection on val), then ``seeds`` final runs at the chosen values.

    Runs go to ``out_dir/trial_NN`` and ``out_dir/seed_S``; the record of the whole search is
    ``out_dir/search.json``. ``on_run(what, record)`` is called after every run (progress display)."""
    out = Path(out_dir)
    state = {"base": base.to_dict(), "candidates": [list(c) for c in candidates], "trials": [], "chosen": None,
             "seeds": []}
    earlier = _earlier(out / "search.json")

    for i, (lr, wd) in enumerate(candidates):
        rec = trial_run(base, i, lr, wd, out, data, earlier["trials"].get(i))
        state["trials"].append(rec)
        write_json(out / "search.json", state)
        if on_run is not None:
            on_run("trial", rec)

    chosen = state["chosen"] = chosen_record(state["trials"])
    for s in range(seeds):
        seed = base.seed + s
        rec = seed_run(base, chosen, seed, out, data, earlier["seeds"].get(seed))
        state["seeds"].append(rec)
        write_json(out / "search.json", state)
        if on_run is not None:
            on_run("seed", rec)
    return state
