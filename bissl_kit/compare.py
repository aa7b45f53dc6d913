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

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as data_mod
from . import distributed
from .backbones import load_backbone
from .checkpoint import CheckpointError, content_signature, load_checkpoint
from .config import Config, ConfigError, device_param, param
from .downstream import frozen_metrics, load_data, task_name
from .finetune import FinetuneConfig, describe_source
from .hpo import LR_RANGE, WD_RANGE, run_search, sample_candidates
from .reports import write_results
from .rng import resolve_device
from .stats import mean_ci, paired_ttest
from .files import check_folder
from .rundir import RunLock, config_conflicts, progress_bar

ARMS = ("baseline", "baseline_matched", "bissl")
MATCHED_CHECKPOINT_EVERY = 50  # pretext steps between checkpoints of the matched continuation


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
    bissl_runs: tuple[str, ...] = param(("runs/bissl",), "one finished BiSSL run directory per task (same order), "
                                                         "started from pretrain_checkpoint")
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
    progress: bool = param(True, "show a tqdm progress bar over the runs", resumable=True)

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

    def finetune_config(self, task: str, backbone: str, out_dir: str) -> FinetuneConfig:
        """The fine-tuning config every run of ``task`` shares (lr, wd and seed are set by the search)."""
        name, labels = parse_task(task)
        return FinetuneConfig(backbone_checkpoint=backbone, downstream=name, labels_per_class=labels,
                              labels_seed=self.labels_seed, data_root=self.data_root, epochs=self.epochs,
                              batch_size=self.batch_size, momentum=self.momentum, eval_every=self.eval_every,
                              select=self.select, seed=0, device=self.device, out_dir=out_dir, progress=False)


# ---- the compute-matched baseline: extra pretext steps ---------------------------------------------------

def matched_config(cfg: CompareConfig, bissl_config: dict):
    """The compute-matched baseline's run: the pretext run of ``cfg.pretrain_checkpoint`` continued for as
    many steps as the BiSSL run's lower level took (stages × N_L), with its LARS settings, batch, schedule,
    clipping, pretext forward and seed, and without the proximal term or an upper level. A BYOL target
    restarts from the online weights, as in BiSSL. Runs in ``<out_dir>/pretext_matched_<steps>_<key>``,
    one per distinct setting (tasks whose BiSSL runs agree share it)."""
    from .bissl import BisslConfig
    from .pretrain import PretrainConfig, as_run

    b = BisslConfig.from_saved({k: v for k, v in bissl_config.items() if k in BisslConfig.field_names()})
    parent = load_checkpoint(cfg.pretrain_checkpoint, kind="pretrain")
    steps = b.stages * b.lower_steps
    warmup = b.lower_warmup
    if warmup is None:  # V1's warm-up in passes over the pretext batches, as the BiSSL stage derives it
        pre = PretrainConfig.from_saved(parent["config"])
        n = len(data_mod.load_pretext(pre.pretext_dataset, root=cfg.data_root, image_size=pre.image_size))
        per_pass = n // b.lower_batch_size + (1 if b.partial_batch == "keep" and n % b.lower_batch_size else 0)
        warmup = b.lower_warmup_passes * per_pass
    values = {**as_run(parent["config"]), "init_checkpoint": str(cfg.pretrain_checkpoint), "steps": steps,
              "batch_size": b.lower_batch_size, "lr": b.lower_lr, "weight_decay": b.lower_weight_decay,
              "momentum": b.lower_momentum, "warmup_steps": warmup, "clip_grad_norm": b.lower_clip,
              "official_first_step": b.official_first_step, "seed": b.seed, "pretext_forward": b.pretext_forward,
              "partial_batch": b.partial_batch, "bf16": False, "knn_every": 0,
              "checkpoint_every": MATCHED_CHECKPOINT_EVERY, "data_root": cfg.data_root, "device": cfg.device,
              "progress": cfg.progress}
    identity = PretrainConfig.from_dict({**values, "out_dir": "."}).identity()
    key = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=4).hexdigest()
    return PretrainConfig.from_dict({**values, "out_dir": str(Path(cfg.out_dir) / f"pretext_matched_{steps}_{key}")})


def run_matched(pre_cfg) -> Path:
    """Run (or resume, or just re-read) the matched continuation; its checkpoint."""
    from .pretrain import Pretrainer
    trainer = Pretrainer(pre_cfg)
    for _ in trainer.run():
        pass
    return trainer.checkpoint_path


# ---- the BiSSL runs ---------------------------------------------------------------------------------------

def check_bissl_run(run_dir: str | Path, task: str, pretrain_checkpoint: str | Path) -> dict:
    """The config of a finished BiSSL run on ``task`` started from ``pretrain_checkpoint``'s pretext run."""
    from .bissl import CHECKPOINT_KIND as BISSL_KIND, BisslConfig
    from .pretrain import PretrainConfig, as_run

    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise ConfigError(f"no BiSSL run in {str(run_dir)!r} for task {task!r}; run it first, e.g. "
                          f"python -m bissl_kit bissl --downstream {parse_task(task)[0]} --out-dir {run_dir} "
                          f"--pretrain-checkpoint {pretrain_checkpoint}")
    ckpt = load_checkpoint(path, kind=BISSL_KIND)
    saved = BisslConfig.from_saved(ckpt["config"])
    cfg = {**saved.to_dict(), "solver_iters": saved.resolved_solver_iters}  # the config as run, with its K
    if ckpt["step"] < cfg["stages"]:
        raise ConfigError(f"the BiSSL run {str(run_dir)!r} has finished {ckpt['step']} of {cfg['stages']} stages; "
                          "finish it first (running it again resumes it)")
    if task_name(cfg["downstream"], cfg["labels_per_class"]) != task:
        raise ConfigError(f"the BiSSL run {str(run_dir)!r} is for task "
                          f"{task_name(cfg['downstream'], cfg['labels_per_class'])!r}, not {task!r}")
    started = ckpt["lineage"].get("init", {}).get("signature")
    if started is not None:  # the run recorded what it started from: the content must be this checkpoint's
        if started != content_signature(pretrain_checkpoint):
            raise ConfigError(f"the BiSSL run {str(run_dir)!r} started from another pre-training checkpoint than "
                              f"{str(pretrain_checkpoint)!r} (their contents differ)")
    else:  # a format-1 run: compare the pre-training settings
        skip = PretrainConfig.resumable_fields()
        pre = load_checkpoint(pretrain_checkpoint, kind="pretrain")
        same = {k: v for k, v in as_run(pre["config"]).items() if k not in skip}
        used = {k: v for k, v in as_run(ckpt["lineage"]["pretrain_config"]).items() if k not in skip}
        if json_norm(same) != json_norm(used):
            diff = [k for k in same if json_norm(same[k]) != json_norm(used.get(k))]
            raise ConfigError(f"the BiSSL run {str(run_dir)!r} started from another pretext run than "
                              f"{str(pretrain_checkpoint)!r} (differs in {', '.join(diff)})")
    return {**cfg, "finished_stages": ckpt["step"]}


# the fields of CompareConfig that every fine-tuning run of the search copies
_SEARCH_FIELDS = ("epochs", "batch_size", "momentum", "eval_every", "select", "labels_seed")


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


def json_norm(v):
    return json.loads(json.dumps(v))


# ---- the comparison ----------------------------------------------------------------------------------------

def arm_backbones(cfg: CompareConfig, task: str, bissl_run: str, bissl_cfg: dict, *, progress=False) -> dict:
    """Checkpoint path of each arm's backbone for ``task`` (runs the matched continuation when needed)."""
    paths = {}
    for arm in cfg.arms:
        if arm == "baseline":
            paths[arm] = str(cfg.pretrain_checkpoint)
        elif arm == "bissl":
            paths[arm] = str(Path(bissl_run) / "checkpoint.pt")
        else:  # one continuation per distinct lower-level setting, shared by the tasks whose BiSSL runs agree
            paths[arm] = str(run_matched(matched_config(cfg, bissl_cfg)))
    return paths


def _slug(task: str) -> str:
    return task.replace(":", "_")


def run_comparison(cfg: CompareConfig, *, command: str | None = None, on_run=None) -> dict:
    """Run (or resume) every arm's search and final seeds on every task; write and return the results.

    ``on_run(task, arm, what, record)`` is called after each fine-tuning run (a live plot)."""
    if distributed.launched():
        # every rank would run every search and write the same results files; a failed trial on one
        # rank alone would leave the others waiting in a collective
        raise ConfigError("compare (the search and the seeds) runs as one process, not under torchrun: launch "
                          "'python -m bissl_kit compare ...' without torchrun; its fine-tuning runs are small, "
                          "and pre-training, BiSSL and finetune are the stages that scale out")
    t_start = time.perf_counter()
    # every folder the comparison writes must be usable before the first run, not after the last
    folders = {"out_dir": cfg.out_dir, "results_dir": cfg.results_dir, "figures_dir": cfg.figures_dir}
    for field, folder in folders.items():
        if folder is not None:
            check_folder(field, folder)
    # one comparison per folder at a time (its runs lock their own folders too)
    locks = [RunLock(f).acquire() for f in dict.fromkeys(str(Path(f)) for f in (cfg.out_dir, cfg.results_dir) if f)]
    try:
        return _run_comparison(cfg, command, on_run, t_start)
    finally:
        for lock in locks:
            lock.release()


def _run_comparison(cfg: CompareConfig, command, on_run, t_start: float) -> dict:
    candidates = sample_candidates(cfg.trials, seed=cfg.search_seed, lr_range=cfg.lr_range, wd_range=cfg.wd_range)
    try:
        pre_ckpt = load_checkpoint(cfg.pretrain_checkpoint, kind="pretrain")
    except CheckpointError as e:
        raise CheckpointError(f"pretrain_checkpoint={cfg.pretrain_checkpoint!r} cannot be used: {e}; it must be "
                              "a pre-training run's checkpoint.pt") from e
    check_earlier_results(cfg, candidates)
    registrations = dataset_registrations(cfg.tasks)
    results = {"kind": "bissl_kit comparison", "command": rerunnable(command, registrations), "config": cfg.to_dict(),
               "registrations": registrations,
               "pretrain": {"checkpoint": str(cfg.pretrain_checkpoint), "steps": pre_ckpt["step"],
                            "config": pre_ckpt["config"]},
               "candidates": [list(c) for c in candidates], "tasks": []}
    runs_per_arm = cfg.trials + cfg.seeds - 1
    bar = progress_bar(cfg.progress, total=len(cfg.tasks) * len(cfg.arms) * runs_per_arm, initial=0,
                       desc="comparison runs", unit="run")
    for task, bissl_run in zip(cfg.tasks, cfg.bissl_runs):
        bissl_cfg = check_bissl_run(bissl_run, task, cfg.pretrain_checkpoint)
        backbones = arm_backbones(cfg, task, bissl_run, bissl_cfg, progress=cfg.progress)
        pretrained = load_backbone(cfg.pretrain_checkpoint)
        pre_cfg, pre_backbone = pretrained.pretrain_config, pretrained.backbone
        name, labels = parse_task(task)
        data = load_data(name, pre_cfg, labels_per_class=labels, labels_seed=cfg.labels_seed, data_root=cfg.data_root)
        entry = {"task": task, "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test()),
                 "bissl_run": {"dir": str(bissl_run), **{k: bissl_cfg[k] for k in (
                     "stages", "lower_steps", "upper_steps", "lower_batch_size", "upper_batch_size", "gamma", "lam",
                     "damping", "solver", "solver_iters", "upper_lr", "upper_weight_decay", "seed")}},
                 "matched_extra_steps": bissl_cfg["stages"] * bissl_cfg["lower_steps"], "arms": {}, "paired": []}
        loaded = {arm: load_backbone(backbones[arm]) for arm in cfg.arms}
        entry["distance_from_pretext"] = {arm: relative_distance(loaded[arm].backbone, pre_backbone)
                                          for arm in cfg.arms}
        if {"bissl", "baseline_matched"} <= set(cfg.arms):
            entry["distance_bissl_to_matched"] = relative_distance(loaded["bissl"].backbone,
                                                                   loaded["baseline_matched"].backbone,
                                                                   reference=pre_backbone)
        for arm in cfg.arms:
            backbone, source = loaded[arm].backbone, describe_source(loaded[arm])
            frozen = frozen_metrics(backbone, data, split="test", knn_k=cfg.knn_k,
                                    knn_temperature=cfg.knn_temperature, probe=cfg.probe,
                                    probe_epochs=cfg.probe_epochs, device=resolve_device(cfg.device))
            base = cfg.finetune_config(task, backbones[arm], str(Path(cfg.out_dir) / _slug(task) / arm))

            def report(what, rec, task=task, arm=arm):
                if bar is not None:
                    bar.update(1 if what == "trial" or rec["seed"] != base.seed else 0)
                if on_run is not None:
                    on_run(task, arm, what, rec)

            search = run_search(base, candidates, seeds=cfg.seeds, out_dir=base.out_dir, data=data, on_run=report)
            seeds = search["seeds"]
            ok = [s for s in seeds if s["status"] == "ok"]
            arm_entry = {"backbone": backbones[arm], "source": source, "frozen": frozen,
                         "chosen": search["chosen"], "trials": search["trials"], "seeds": seeds,
                         "failed_seeds": len(seeds) - len(ok)}
            for metric in test_metrics(data.multilabel):
                arm_entry[metric] = mean_ci([s[metric] for s in ok]) if ok else None
            if ok:
                arm_entry["test_protocol"] = ok[0]["test_protocol"].replace(f"seed {ok[0]['seed']}",
                                                                            f"seeds {', '.join(str(s['seed']) for s in ok)}")
            entry["arms"][arm] = arm_entry
        entry["paired"] = paired_comparisons(entry["arms"])
        results["tasks"].append(entry)
    if bar is not None:
        bar.close()
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
