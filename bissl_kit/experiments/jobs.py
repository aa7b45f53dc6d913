"""A comparison as a graph of :class:`~bissl_kit.engine.Job` s, and the job functions themselves.

Per task and BiSSL replicate: the BiSSL run (read when it is the template's finished run), its matched
continuation, then per arm the frozen-backbone metrics, the search trials, the choice (a job whose kwargs
are :class:`~bissl_kit.engine.Ref` s to the trials) and the seeds at the chosen values (Refs to the
choice). Jobs are keyed by the folder they write, so runs that replicates, tasks or sweep points share are
one job. Every function here is module-level and takes plain values (workers import it by name).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..engine import Job, Ref, Resources
from ..hpo import _earlier, chosen_record, seed_run, trial_run, write_json
from .replicates import Replicate, check_bissl_run, matched_config, run_matched, short_key, slug

# the fields of CompareConfig that every fine-tuning run of the search copies
SEARCH_FIELDS = ("epochs", "batch_size", "momentum", "eval_every", "select", "labels_seed")


# ---- the job functions -------------------------------------------------------------------------------------

def bissl_job(config: dict, task: str, finished: bool) -> dict:
    """Run (or resume) one BiSSL replicate; its config as run (:func:`check_bissl_run`)."""
    from ..bissl import BisslConfig, build_trainer
    if not finished:
        trainer = build_trainer(BisslConfig.from_dict(config))
        for _ in trainer.run():
            pass
    return check_bissl_run(config["out_dir"], task, config["pretrain_checkpoint"])


def matched_job(config: dict) -> str:
    from ..pretrain import PretrainConfig
    return str(run_matched(PretrainConfig.from_dict(config)))


def frozen_job(backbone: str, task: str, options: dict) -> dict:
    """k-NN and linear probe of the frozen backbone, train → test."""
    from ..backbones import load_backbone
    from ..downstream import frozen_metrics
    from ..finetune import describe_source
    from ..rng import resolve_device
    loaded = load_backbone(backbone)
    data = task_data(task, options)
    frozen = frozen_metrics(loaded.backbone, data, split="test", knn_k=options["knn_k"],
                            knn_temperature=options["knn_temperature"], probe=options["probe"],
                            probe_epochs=options["probe_epochs"], device=resolve_device(options["device"]))
    return {"frozen": frozen, "source": describe_source(loaded)}


def task_data(task: str, options: dict):
    from ..backbones import load_backbone
    from ..downstream import load_data
    from .replicates import parse_task
    name, labels = parse_task(task)
    pre_cfg = load_backbone(options["pretrain_checkpoint"]).pretrain_config
    return load_data(name, pre_cfg, labels_per_class=labels, labels_seed=options["labels_seed"],
                     data_root=options["data_root"])


def trial_job(base: dict, trial: int, lr: float, wd: float, search_dir: str) -> dict:
    """One search trial (val numbers only; the test split is never loaded)."""
    from ..finetune import FinetuneConfig
    before = _earlier(Path(search_dir) / "search.json")["trials"].get(trial)
    return trial_run(FinetuneConfig.from_dict(base), trial, lr, wd, Path(search_dir), None, before)


def choose_job(trials: list, base: dict, candidates: list, search_dir: str) -> dict:
    """The best trial on val (ties to the earlier one); records the trials so far in ``search.json``."""
    chosen = chosen_record(trials)
    path = Path(search_dir) / "search.json"
    seeds = list(_earlier(path)["seeds"].values())  # kept until the seeds are read back
    write_json(path, {"base": base, "candidates": candidates, "trials": trials, "chosen": chosen, "seeds": seeds})
    return chosen


def seed_job(base: dict, chosen: dict, seed: int, search_dir: str) -> dict:
    """A final run at the chosen values (:func:`bissl_kit.hpo.seed_run`)."""
    from ..finetune import FinetuneConfig
    before = _earlier(Path(search_dir) / "search.json")["seeds"].get(seed)
    return seed_run(FinetuneConfig.from_dict(base), chosen, seed, Path(search_dir), None, before)


# ---- the graph --------------------------------------------------------------------------------------------

def search_dir(cfg, task: str, arm: str, backbone: str, legacy: bool) -> str:
    """Where an arm's search runs: ``<out_dir>/<task>/<arm>`` for one BiSSL run per task without a shared
    folder (as before replication); else keyed by the backbone and the search, so that a backbone shared by
    replicates or sweep points (the pretext checkpoint, a matched continuation) is fine-tuned once."""
    if legacy:
        return str(Path(cfg.out_dir) / slug(task) / arm)
    search = {**{k: getattr(cfg, k) for k in SEARCH_FIELDS},
              **{k: getattr(cfg, k) for k in ("search_seed", "lr_range", "wd_range", "knn_k", "knn_temperature")},
              "task": task, "backbone": backbone}
    root = Path(getattr(cfg, "shared_dir", None) or cfg.out_dir)
    return str(root / slug(task) / f"{arm}_{short_key(search)}")


def comparison_jobs(cfg, replicates: list[Replicate], candidates: list, legacy: bool) -> tuple[list[Job], list[dict]]:
    """The jobs of every replicate of every task (shared runs once) and, per replicate, where its parts are."""
    res = Resources(cpus=cfg.job_threads)
    jobs: dict[str, Job] = {}
    plans = []
    options = {k: getattr(cfg, k) for k in ("knn_k", "knn_temperature", "probe", "probe_epochs", "device",
                                             "labels_seed", "data_root")} | {"pretrain_checkpoint": str(cfg.pretrain_checkpoint)}

    def add(job: Job) -> str:
        jobs.setdefault(job.key, job)
        return job.key

    for rep in replicates:
        bissl_key = add(Job(f"bissl:{rep.bissl_dir}", bissl_job, dict(config=rep.bissl_config, task=rep.task,
                                                                       finished=rep.finished),
                            resources=res, label=f"BiSSL {rep.task} seed {rep.bissl_seed}"))
        backbones, deps = {}, {}
        for arm in cfg.arms:
            if arm == "baseline":
                backbones[arm], deps[arm] = str(cfg.pretrain_checkpoint), ()
            elif arm == "bissl":
                backbones[arm], deps[arm] = str(Path(rep.bissl_dir) / "checkpoint.pt"), (bissl_key,)
            else:
                m = matched_config(cfg, rep.bissl_config)
                key = add(Job(f"matched:{m.out_dir}", matched_job, dict(config=m.to_dict()), resources=res,
                              label=f"matched continuation seed {m.seed}"))
                backbones[arm], deps[arm] = str(Path(m.out_dir) / "checkpoint.pt"), (key,)
        plan = {"replicate": rep, "backbones": backbones, "bissl_key": bissl_key, "arms": {}}
        for arm in cfg.arms:
            sdir = search_dir(cfg, rep.task, arm, backbones[arm], legacy)
            base = cfg.finetune_config(rep.task, backbones[arm], sdir).to_dict()
            frozen = add(Job(f"frozen:{rep.task}:{backbones[arm]}", frozen_job,
                             dict(backbone=backbones[arm], task=rep.task, options=options), deps=deps[arm],
                             resources=res, label=f"frozen {arm}"))
            trials = [add(Job(f"trial:{sdir}:{i}", trial_job, dict(base=base, trial=i, lr=lr, wd=wd, search_dir=sdir),
                              deps=deps[arm], resources=res, label=f"{rep.task} {arm} trial {i}"))
                      for i, (lr, wd) in enumerate(candidates)]
            choose = add(Job(f"choose:{sdir}", choose_job, dict(trials=[Ref(k) for k in trials], base=base,
                                                                 candidates=[list(c) for c in candidates],
                                                                 search_dir=sdir), resources=res))
            seeds = [add(Job(f"seed:{sdir}:{s}", seed_job, dict(base=base, chosen=Ref(choose), seed=s, search_dir=sdir),
                             resources=res, label=f"{rep.task} {arm} seed {s}"))
                     for s in range(base["seed"], base["seed"] + cfg.seeds)]
            plan["arms"][arm] = {"search_dir": sdir, "base": base, "frozen": frozen, "trials": trials,
                                 "choose": choose, "seeds": seeds}
        plans.append(plan)
    return list(jobs.values()), plans


def record_search(arm_plan: dict, candidates: list, results: dict) -> dict:
    """The search of one arm as :func:`bissl_kit.hpo.run_search` returns it, written to its ``search.json``."""
    state = {"base": arm_plan["base"], "candidates": [list(c) for c in candidates],
             "trials": [results[k] for k in arm_plan["trials"]], "chosen": results[arm_plan["choose"]],
             "seeds": [results[k] for k in arm_plan["seeds"]]}
    write_json(Path(arm_plan["search_dir"]) / "search.json", state)
    return json.loads(json.dumps(state))
