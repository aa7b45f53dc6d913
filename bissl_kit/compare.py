"""Stage 4: the baseline-vs-BiSSL comparison (spec §2.1 stages 4–5, §3), with honest statistics.

For every downstream task, the same fine-tuning protocol (:mod:`bissl_kit.finetune`) and the same
search (:mod:`bissl_kit.hpo`: identical candidate (lr, wd) pairs, budget and seeds) is applied to each
*arm*, a backbone that all arms derive from **one pretext checkpoint**:

* ``baseline``: the pre-trained backbone itself (the V2/V3 protocol: both pipelines start from the same
  checkpoint and BiSSL's extra lower steps are not matched, spec §3);
* ``baseline_matched``: the pre-trained backbone after **as many extra pretext steps as BiSSL's lower
  level took** (stages × N_L), with the lower level's optimiser, batch size and schedule and without the
  proximal term — the compute matching of the ICLR version (spec §3). The ICLR code instead ran a
  separate, longer pre-training (600 vs 500 epochs); continuing the shared checkpoint keeps everything
  but the bilevel coupling identical. Like BiSSL (and unlike V1's accounting), the upper-level and head
  warm-up compute is not matched;
* ``bissl``: BiSSL's lower backbone θ_P from a finished BiSSL run on that task.

Reported per arm and task: the test top-1/top-5 of each seed's final run, their mean with a 95 %
t-interval (n = number of seeds), the chosen (lr, wd), and the weighted k-NN and linear-probe accuracy of
the frozen backbone (train → test). Between arms: a two-sided **paired** t-test over seeds (seed s of
both arms shares the head initialisation, batch order and augmentations) with the 95 % t-interval of the
mean difference. Results go to ``results_dir`` as ``comparison.json`` (everything, with the command),
``comparison.csv`` (one row per run) and ``comparison.md`` (the README's table), written by
:mod:`bissl_kit.reports`; the figure is drawn by :mod:`bissl_kit.viz.compare`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as data_mod
from . import distributed
from .backbones import load_backbone
from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError, device_param, param
from .downstream import load_data
from .engine import run_jobs
from .experiments.jobs import SEARCH_FIELDS as _SEARCH_FIELDS, comparison_jobs, record_search
from .experiments.replicates import (  # noqa: F401  (re-exported: the comparison's public names)
    MATCHED_CHECKPOINT_EVERY, check_bissl_run, json_norm, matched_config, plan_replicates, run_matched,
)
from .experiments.replication import over_replicates
from .finetune import FinetuneConfig
from .hpo import LR_RANGE, WD_RANGE, sample_candidates
from .reports import write_results
from .stats import mean_ci, paired_ttest
from .files import check_folder
from .rundir import RunLock, config_conflicts

ARMS = ("baseline", "baseline_matched", "bissl")
EXECUTORS = ("sequential", "ray")


def parse_task(task: str) -> tuple[str, int | None]:
    """'digits' → ('digits', None); 'fashion_mnist:50' → ('fashion_mnist', 50 labelled images per class);
    'data/mine' or 'data/mine:5' → a task folder. ':' only ever starts the labels suffix, so a dataset name
    or a task folder's path cannot hold one (docs/data.md)."""
    name, colon, n = task.partition(":")
    try:
        data_mod.check_dataset_name("tasks", name)
    except ConfigError:
        raise ConfigError(f"tasks: {task!r} names an unknown dataset {name!r}; each task must be one of "
                          f"{', '.join(data_mod.DATASETS)}, a registered dataset or a task folder path (with a '/'), "
                          "optionally with ':N' labels per class") from None
    if not colon:
        return name, None
    if ":" in n:
        raise ConfigError(f"tasks: {task!r} has more than one ':'; ':' only starts the labels per class suffix, so a "
                          "task folder's path cannot contain one")
    if not n.isdigit() or int(n) < 1:
        raise ConfigError(f"tasks: {task!r}: the part after ':' must be the labelled images per class, an int >= 1 "
                          f"(e.g. '{name}:50')")
    return name, int(n)


def dataset_registrations(tasks) -> dict[str, str | None]:
    """How each registered dataset among ``tasks`` was registered (its 'module:function', or None for one
    registered by hand, whose command cannot be rerun as written)."""
    names = dict.fromkeys(parse_task(t)[0] for t in tasks)
    return {n: data_mod.registration_of(n) for n in names if data_mod.DATASETS.get(n, None) is not None
            and data_mod.DATASETS[n].kind == "registered"}


def rerunnable(command: str | None, registrations: dict) -> str | None:
    """``command`` with a ``--register`` for each registration it lacks (one made through $BISSL_DATASETS
    or in a notebook), so that the command in the results reruns in a fresh shell."""
    if command is None:
        return None
    import shlex
    words = shlex.split(command)
    have = {words[i + 1] for i, w in enumerate(words[:-1]) if w == "--register"}
    missing = [s for s in dict.fromkeys(registrations.values()) if s is not None and s not in have]
    if not missing or "compare" not in words:
        return command
    at = words.index("compare") + 1
    return shlex.join(words[:at] + [w for s in missing for w in ("--register", s)] + words[at:])


@dataclass(frozen=True)
class CompareConfig(Config):
    # Inputs: one pretext checkpoint, one finished BiSSL run per task started from it
    pretrain_checkpoint: str = param("runs/pretrain/checkpoint.pt", "the pretext checkpoint every arm starts from")
    tasks: tuple[str, ...] = param(("digits",), "downstream tasks: 'digits', or 'fashion_mnist:50' for 50 labelled "
                                               "train images per class")
    bissl_runs: tuple[str, ...] = param(("runs/bissl",), "one BiSSL template per task (same order): a finished BiSSL "
                                        "run directory started from pretrain_checkpoint, or a JSON file of BiSSL "
                                        "config fields")
    bissl_replicates: int = param(1, "R: BiSSL runs per task, the template's with stage seeds seed, seed+1, ..., each "
                                  "with its own compute-matched continuation; R >= 2 adds the test over runs", low=1)
    arms: tuple[str, ...] = param(("baseline_matched", "bissl"), f"pipelines to compare, from {', '.join(ARMS)}")
    # Search (the same for every arm)
    trials: int = param(4, "random-search trials per arm and task (the paper: 100–200)", low=1, resumable=True)
    seeds: int = param(3, "final runs per arm and task at the chosen values, seeds 0..N-1 (the paper: 10)", low=1, resumable=True)
    search_seed: int = param(0, "seed of the candidate (lr, wd) pairs, shared by all arms", low=0)
    lr_range: tuple[float, float] = param(LR_RANGE, "log-uniform range of the SGD learning rate (official)",
                                          low=0, low_inclusive=False)
    wd_range: tuple[float, float] = param(WD_RANGE, "log-uniform range of the weight decay (official)",
                                          low=0, low_inclusive=False)
    # Fine-tuning protocol (the same for every arm and run)
    epochs: int = param(10, "fine-tuning epochs of every trial and final run (the paper: 400)", low=1)
    batch_size: int = param(256, "images per SGD step", low=2)
    momentum: float = param(0.9, "SGD momentum", low=0, high=1, high_inclusive=False)
    select: str = param("last", "the reported model of a run: 'last' epoch or 'best_val' epoch",
                        choices=("last", "best_val"))
    eval_every: int = param(0, "val evaluation every this many epochs; 0 = only at the end (enough for 'last')", low=0)
    labels_seed: int = param(0, "which images a few-label train split keeps (BiSSL runs use 0)", low=0)
    # Frozen-backbone evaluation
    knn_k: int = param(20, "neighbours of the weighted k-NN", low=1)
    knn_temperature: float = param(0.07, "temperature of the weighted k-NN vote", low=0, low_inclusive=False)
    probe: bool = param(True, "also a linear probe on the frozen features")
    probe_epochs: int = param(100, "epochs of the linear probe", low=1)
    # Running
    data_root: str | None = param(None, "dataset root; None searches $BISSL_DATA, data/, the Debian package", resumable=True)
    device: str = device_param()
    out_dir: str = param("runs/compare", "run directory: matched continuations, search trials and seed runs", resumable=True)
    results_dir: str | None = param(None, "where comparison.json/.csv/.md go; None = out_dir", resumable=True)
    figures_dir: str | None = param(None, "where the command line and notebook 05 export the comparison figure; "
                                    "None = no export", resumable=True)
    figure_stem: str = param("05_comparison", "file name (without extension) of the exported figure", resumable=True)
    shared_dir: str | None = param(None, "where BiSSL replicates, matched continuations and the searches of shared "
                                   "backbones go, keyed by their config (a sweep's points share it); None = out_dir",
                                   resumable=True)
    progress: bool = param(True, "show a tqdm progress bar over the runs", resumable=True)
    executor: str = param("sequential", "how the runs execute: 'sequential' (one after another, here) or 'ray' "
                          "(every run a Ray task; the numbers are the same)", choices=EXECUTORS, resumable=True)
    ray_address: str | None = param(None, "Ray cluster address; None = a local instance the kit starts", resumable=True)
    job_threads: int = param(1, "torch threads (Ray CPUs) of every run; the numbers depend on it", low=1)

    def check(self):
        if not self.tasks:
            raise ConfigError("tasks must name at least one task")
        for t in self.tasks:
            parse_task(t)
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks={self.tasks!r} names a task twice")
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms={self.arms!r} must be distinct values from {', '.join(map(repr, ARMS))}")
        if len(self.bissl_runs) != len(self.tasks):
            raise ConfigError(f"bissl_runs has {len(self.bissl_runs)} entries but tasks has {len(self.tasks)}: "
                              "one BiSSL run per task (it also defines the compute-matched baseline)")
        for name in ("lr_range", "wd_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be (low, high) with low <= high")

    @classmethod
    def paper(cls, version: str = "iclr", **overrides) -> "CompareConfig":
        """The paper's search and seed runs (bissl_kit.presets, spec §2.2, §3): 400 epochs, 200 (ICLR) or
        100 (NeurIPS) trials over the official ranges, 10 seeds."""
        from .presets import compare_values
        return cls.from_dict({**compare_values(version), **overrides})

    def finetune_config(self, task: str, backbone: str, out_dir: str) -> FinetuneConfig:
        """The fine-tuning config every run of ``task`` shares (lr, wd and seed are set by the search)."""
        name, labels = parse_task(task)
        return FinetuneConfig(backbone_checkpoint=backbone, downstream=name, labels_per_class=labels,
                              labels_seed=self.labels_seed, data_root=self.data_root, epochs=self.epochs,
                              batch_size=self.batch_size, momentum=self.momentum, eval_every=self.eval_every,
                              select=self.select, seed=0, device=self.device, out_dir=out_dir, progress=False)




def check_earlier_results(cfg: CompareConfig, candidates) -> None:
    """Refuse, before any work, a results file or a search directory written by a comparison with another
    config: running on would overwrite ``comparison.json`` and ``search.json`` (and every run would fail
    its own resume check, each failure swallowed as a failed trial)."""
    results = Path(cfg.results_dir or cfg.out_dir) / "comparison.json"
    if results.exists():
        try:
            saved = json.loads(results.read_text())["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"results_dir: {str(results)!r} is not a comparison.json written by bissl_kit "
                              f"({type(e).__name__}: {e}); choose another results_dir or delete it") from None
        conflicts = config_conflicts(saved, cfg.to_dict(), cfg.resumable_fields())
        if conflicts:
            raise ConfigError(f"results_dir: {str(results)!r} holds the results of a comparison with another config "
                              f"({'; '.join(conflicts)}). Choose another results_dir (and out_dir), or delete it.")
    for task in cfg.tasks:
        for arm in cfg.arms:
            path = Path(cfg.out_dir) / _slug(task) / arm / "search.json"
            if not path.exists():
                continue
            try:
                saved = json.loads(path.read_text())
                saved["base"], saved["candidates"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"out_dir: {str(path)!r} is damaged ({type(e).__name__}: {e}); the runs beside it are "
                                  "intact: delete the file and run the comparison again to rebuild it") from None
            name, labels = parse_task(task)
            now = {**{k: getattr(cfg, k) for k in _SEARCH_FIELDS}, "downstream": name, "labels_per_class": labels}
            diffs = [f"{k}: saved {saved['base'].get(k)!r}, now {v!r}" for k, v in now.items()
                     if json_norm(saved["base"].get(k)) != json_norm(v)]
            n = min(len(saved["candidates"]), len(candidates))
            if json_norm(saved["candidates"][:n]) != json_norm([list(c) for c in candidates[:n]]):
                diffs.append("the (lr, wd) candidates: search_seed, lr_range or wd_range differ")
            if diffs:
                raise ConfigError(f"out_dir: {str(path)!r} holds a search of a comparison with another config "
                                  f"({'; '.join(diffs)}). Choose another out_dir, or delete it.")


# ---- the comparison ----------------------------------------------------------------------------------------

def _slug(task: str) -> str:
    return task.replace(":", "_")


def run_comparison(cfg: CompareConfig, *, command: str | None = None, on_run=None, bissl_overrides: dict | None = None) -> dict:
    """Run (or resume) every BiSSL replicate, its matched continuation and every arm's search and final
    seeds on every task, as one job graph (:func:`bissl_kit.engine.run_jobs`); write and return the results.

    ``on_run(task, arm, what, record)`` is called for each fine-tuning run once the graph has run (a
    plot); ``bissl_overrides``: BiSSL fields that replace the templates' (a sweep point's)."""
    if distributed.launched():
        # every rank would run every job and write the same results files; the executor fans runs out instead
        raise ConfigError("compare runs as one process, not under torchrun: launch 'python -m bissl_kit compare ...' "
                          "without torchrun, and fan its runs out with --executor ray (--ray-address for a cluster)")
    t_start = time.perf_counter()
    # every folder the comparison writes must be usable before the first run, not after the last
    folders = {"out_dir": cfg.out_dir, "results_dir": cfg.results_dir, "figures_dir": cfg.figures_dir,
               "shared_dir": cfg.shared_dir}
    for field, folder in folders.items():
        if folder is not None:
            check_folder(field, folder)
    # one comparison per folder at a time (its runs lock their own folders too)
    locks = [RunLock(f).acquire() for f in dict.fromkeys(str(Path(f)) for f in (cfg.out_dir, cfg.results_dir) if f)]
    try:
        return _run_comparison(cfg, command, on_run, t_start, bissl_overrides or {})
    finally:
        for lock in locks:
            lock.release()


def is_legacy(cfg: CompareConfig, overrides: dict | None = None) -> bool:
    """One BiSSL run per task, no shared folder, no sweep point: the folder layout of before replication."""
    return cfg.bissl_replicates == 1 and cfg.shared_dir is None and not overrides


def _run_comparison(cfg: CompareConfig, command, on_run, t_start: float, overrides: dict) -> dict:
    candidates = sample_candidates(cfg.trials, seed=cfg.search_seed, lr_range=cfg.lr_range, wd_range=cfg.wd_range)
    try:
        pre_ckpt = load_checkpoint(cfg.pretrain_checkpoint, kind="pretrain")
    except CheckpointError as e:
        raise CheckpointError(f"pretrain_checkpoint={cfg.pretrain_checkpoint!r} cannot be used: {e}; it must be "
                              "a pre-training run's checkpoint.pt") from e
    legacy = is_legacy(cfg, overrides)
    if legacy:
        check_earlier_results(cfg, candidates)
    replicates = [r for task, entry in zip(cfg.tasks, cfg.bissl_runs)
                  for r in plan_replicates(cfg, task, entry, overrides)]
    jobs, plans = comparison_jobs(cfg, replicates, candidates, legacy)
    done = run_jobs(jobs, executor=cfg.executor, progress=cfg.progress, desc="comparison runs",
                    **({"address": cfg.ray_address} if cfg.executor == "ray" else {}))
    registrations = dataset_registrations(cfg.tasks)
    results = {"kind": "bissl_kit comparison", "command": rerunnable(command, registrations), "config": cfg.to_dict(),
               "registrations": registrations,
               "pretrain": {"checkpoint": str(cfg.pretrain_checkpoint), "steps": pre_ckpt["step"],
                            "config": pre_ckpt["config"]},
               "candidates": [list(c) for c in candidates], "tasks": []}
    pretrained = load_backbone(cfg.pretrain_checkpoint)
    pre_cfg, pre_backbone = pretrained.pretrain_config, pretrained.backbone
    for plan in plans:
        rep = plan["replicate"]
        task, bissl_cfg = rep.task, done[plan["bissl_key"]]
        name, labels = parse_task(task)
        data = load_data(name, pre_cfg, labels_per_class=labels, labels_seed=cfg.labels_seed, data_root=cfg.data_root)
        entry = {"task": task, "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test()),
                 "replicate": rep.index, "bissl_seed": rep.bissl_seed,
                 "bissl_run": {"dir": str(rep.bissl_dir), **{k: bissl_cfg[k] for k in (
                     "stages", "lower_steps", "upper_steps", "lower_batch_size", "upper_batch_size", "gamma", "lam",
                     "damping", "solver", "solver_iters", "upper_lr", "upper_weight_decay", "seed")}},
                 "matched_extra_steps": bissl_cfg["stages"] * bissl_cfg["lower_steps"], "arms": {}, "paired": []}
        loaded = {arm: load_backbone(plan["backbones"][arm]) for arm in cfg.arms}
        entry["distance_from_pretext"] = {arm: relative_distance(loaded[arm].backbone, pre_backbone)
                                          for arm in cfg.arms}
        if {"bissl", "baseline_matched"} <= set(cfg.arms):
            entry["distance_bissl_to_matched"] = relative_distance(loaded["bissl"].backbone,
                                                                   loaded["baseline_matched"].backbone,
                                                                   reference=pre_backbone)
        for arm in cfg.arms:
            p = plan["arms"][arm]
            search = record_search(p, candidates, done)
            if on_run is not None:
                for what, recs in (("trial", search["trials"]), ("seed", search["seeds"])):
                    for rec in recs:
                        on_run(task, arm, what, rec)
            seeds = search["seeds"]
            ok = [s for s in seeds if s["status"] == "ok"]
            arm_entry = {"backbone": plan["backbones"][arm], "source": done[p["frozen"]]["source"],
                         "frozen": done[p["frozen"]]["frozen"], "chosen": search["chosen"], "trials": search["trials"],
                         "seeds": seeds, "failed_seeds": len(seeds) - len(ok)}
            for metric in test_metrics(data.multilabel):
                arm_entry[metric] = mean_ci([s[metric] for s in ok]) if ok else None
            if ok:
                arm_entry["test_protocol"] = ok[0]["test_protocol"].replace(f"seed {ok[0]['seed']}",
                                                                            f"seeds {', '.join(str(s['seed']) for s in ok)}")
            entry["arms"][arm] = arm_entry
        entry["paired"] = paired_comparisons(entry["arms"])
        results["tasks"].append(entry)
    if cfg.bissl_replicates > 1:
        results["replication"] = over_replicates(results["tasks"])
    results["seconds"] = time.perf_counter() - t_start
    write_results(results, cfg)
    return results


@torch.no_grad()
def relative_distance(a: torch.nn.Module, b: torch.nn.Module, *, reference: torch.nn.Module | None = None) -> float:
    """‖θ_a − θ_b‖ / ‖θ_ref‖ over the backbone parameters (not the BatchNorm buffers); ref defaults to b."""
    ref = b if reference is None else reference
    num = sum(float((p - q).double().pow(2).sum()) for p, q in zip(a.parameters(), b.parameters()))
    den = sum(float(p.double().pow(2).sum()) for p in ref.parameters())
    return math.sqrt(num / den)


def test_metrics(multilabel: bool) -> tuple[str, ...]:
    """The test numbers an arm reports: top-1/top-5, or mAP for a multi-label task (VOC07)."""
    return ("test_map",) if multilabel else ("test_top1", "test_top5")


def paired_comparisons(arms: dict) -> list[dict]:
    """BiSSL against each baseline present (else matched against plain), paired by seed, on test top-1/top-5."""
    pairs = [("bissl", b) for b in ("baseline_matched", "baseline") if "bissl" in arms and b in arms]
    if not pairs and {"baseline_matched", "baseline"} <= set(arms):
        pairs = [("baseline_matched", "baseline")]
    out = []
    for a, b in pairs:
        sa = {s["seed"]: s for s in arms[a]["seeds"] if s["status"] == "ok"}
        sb = {s["seed"]: s for s in arms[b]["seeds"] if s["status"] == "ok"}
        common = sorted(set(sa) & set(sb))
        multilabel = any("test_map" in s for s in arms[a]["seeds"] + arms[b]["seeds"])
        for metric in test_metrics(multilabel):
            res = paired_ttest([sa[s][metric] for s in common], [sb[s][metric] for s in common]) if common else None
            out.append({"a": a, "b": b, "metric": metric, "seeds": common, **(res or {"n": 0})})
    return out
