"""The runs a comparison's arms come from: BiSSL replicates from a template, and each one's compute-matched
continuation of the pretext run.

A task's BiSSL *template* is a finished BiSSL run folder (today's ``bissl_runs`` usage) or a JSON file of
:class:`~bissl_kit.bissl.BisslConfig` fields (a run's ``config.json`` works). Replicate r is the template
with the stage seed ``template seed + r``; the one whose seed is the template run's own *is* that run, the
others run in ``<root>/bissl/<task>_seed<S>_<key>``, keyed by every field that changes the run, so a
sweep's points that coincide share one run. The matched continuation depends only on the lower-level
settings, the seed and the pretext checkpoint, and is keyed by its config identity the same way
(``<root>/pretext_matched_<steps>_<key>``): BiSSL points that differ only in λ, γ, δ or the solver share it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .. import data as data_mod
from ..checkpoint import content_signature, load_checkpoint
from ..config import ConfigError
from ..downstream import task_name

MATCHED_CHECKPOINT_EVERY = 50  # pretext steps between checkpoints of the matched continuation
# fields of a BiSSL config that say where and how visibly it runs, not what it computes
RUNNING_FIELDS = ("out_dir", "progress", "device", "data_root", "pretrain_checkpoint")


def json_norm(v):
    return json.loads(json.dumps(v))


def short_key(obj) -> str:
    """8 hex digits of a JSON value: a folder name for a config identity."""
    return hashlib.blake2b(json.dumps(json_norm(obj), sort_keys=True).encode(), digest_size=4).hexdigest()


def parse_task(task: str) -> tuple[str, int | None]:
    from ..compare import parse_task as parse  # the one definition, beside CompareConfig's tasks
    return parse(task)


def slug(task: str) -> str:
    return task.replace(":", "_")


# ---- the compute-matched baseline: extra pretext steps ---------------------------------------------------

def matched_config(cfg, bissl_config: dict, *, root: str | Path | None = None):
    """The compute-matched baseline's run: the pretext run of ``cfg.pretrain_checkpoint`` continued for as
    many steps as the BiSSL run's lower level took (stages × N_L), with its LARS settings, batch, schedule,
    clipping, pretext forward and seed, and without the proximal term or an upper level. A BYOL target
    restarts from the online weights, as in BiSSL. Runs in ``<root>/pretext_matched_<steps>_<key>``
    (root: ``cfg.shared_dir``, else ``cfg.out_dir``), one per distinct setting (tasks, replicates and sweep
    points whose lower levels agree share it)."""
    from ..bissl import BisslConfig
    from ..pretrain import PretrainConfig, as_run

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
              "progress": False}
    identity = PretrainConfig.from_dict({**values, "out_dir": "."}).identity()
    root = Path(root if root is not None else (getattr(cfg, "shared_dir", None) or cfg.out_dir))
    return PretrainConfig.from_dict({**values, "out_dir": str(root / f"pretext_matched_{steps}_{short_key(identity)}")})


def run_matched(pre_cfg) -> Path:
    """Run (or resume, or just re-read) the matched continuation; its checkpoint."""
    from ..pretrain import Pretrainer
    trainer = Pretrainer(pre_cfg)
    for _ in trainer.run():
        pass
    return trainer.checkpoint_path


# ---- the BiSSL runs ---------------------------------------------------------------------------------------

def check_bissl_run(run_dir: str | Path, task: str, pretrain_checkpoint: str | Path) -> dict:
    """The config of a finished BiSSL run on ``task`` started from ``pretrain_checkpoint``'s pretext run."""
    from ..bissl import CHECKPOINT_KIND as BISSL_KIND, BisslConfig
    from ..pretrain import PretrainConfig, as_run

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


@dataclass(frozen=True)
class Replicate:
    """One BiSSL run of a task: its stage seed, its folder, the config it runs with, and whether it is the
    template's own finished run (read, never run)."""

    task: str
    index: int
    bissl_seed: int
    bissl_dir: str
    bissl_config: dict
    finished: bool


def read_template(entry: str, task: str, cfg) -> tuple[dict, str | None]:
    """A task's BiSSL template: (config fields, the run folder or None)."""
    from ..bissl import BisslConfig

    path = Path(entry)
    if path.is_dir() and (path / "checkpoint.pt").exists():
        return check_bissl_run(path, task, cfg.pretrain_checkpoint), str(path)
    if path.is_file() and path.suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"bissl_runs: {entry!r} is not a readable JSON file of BiSSL config fields "
                              f"({type(e).__name__}: {e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"bissl_runs: {entry!r} must hold one JSON object of BiSSL config fields")
        name, labels = parse_task(task)
        values = {"downstream": name, "labels_per_class": labels, **values}
        template = BisslConfig.from_saved(values).to_dict()  # unknown or bad fields fail here, before any run
        if task_name(template["downstream"], template["labels_per_class"]) != task:
            raise ConfigError(f"bissl_runs: the template {entry!r} is for task "
                              f"{task_name(template['downstream'], template['labels_per_class'])!r}, not {task!r}")
        return template, None
    check_bissl_run(path, task, cfg.pretrain_checkpoint)  # raises: no run there (the message says how to make one)
    raise AssertionError("unreachable")


def bissl_run_key(config: dict) -> str:
    """The folder key of a BiSSL run: every field that changes what it computes (K as run)."""
    from ..bissl import BisslConfig
    c = BisslConfig.from_saved({k: v for k, v in config.items() if k in BisslConfig.field_names()})
    return short_key({**{k: v for k, v in c.to_dict().items() if k not in RUNNING_FIELDS},
                      "solver_iters": c.resolved_solver_iters})


def plan_replicates(cfg, task: str, entry: str, overrides: dict | None = None) -> list[Replicate]:
    """The ``cfg.bissl_replicates`` BiSSL runs of ``task`` from the template ``entry`` (with ``overrides``
    of its fields: a sweep point's)."""
    from ..bissl import BisslConfig

    template, template_dir = read_template(entry, task, cfg)
    template = {k: v for k, v in template.items() if k in BisslConfig.field_names()}
    if overrides:
        template_dir = None if any(json_norm(template.get(k)) != json_norm(v) for k, v in overrides.items()) \
            else template_dir
        template = {**template, **overrides}
    root = Path(getattr(cfg, "shared_dir", None) or cfg.out_dir)
    out = []
    for r in range(cfg.bissl_replicates):
        seed = template["seed"] + r
        own = template_dir is not None and r == 0
        values = {**template, "seed": seed, "pretrain_checkpoint": str(cfg.pretrain_checkpoint), "progress": False,
                  "device": cfg.device, "data_root": cfg.data_root}
        run_dir = template_dir if own else str(root / "bissl" / f"{slug(task)}_seed{seed}_{bissl_run_key(values)}")
        values["out_dir"] = run_dir
        config = BisslConfig.from_saved(values).to_dict()  # a bad override fails here, before any run
        out.append(Replicate(task, r, seed, run_dir, config, own))
    return out
