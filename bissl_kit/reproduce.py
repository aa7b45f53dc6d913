"""``bissl-kit reproduce --preset paper_iclr|paper_neurips``: the paper's whole chain, resumable, at any budget.

The chain (:func:`plan`) is one pre-training, then per downstream set a BiSSL run and a comparison of it
with the compute-matched baseline (:mod:`bissl_kit.compare`), each with the preset's settings
(:mod:`bissl_kit.presets`, :class:`~bissl_kit.bissl.BisslConfig` presets). Every step is a run folder under
``--out`` (``pretrain/``, ``bissl_<set>/``, ``compare_<set>/``), and every stage resumes its own folder, so
rerunning the same command skips what is finished (``done.json`` records each finished step with its
config) and resumes the unfinished step where it stopped.

``--budget F`` scales every count of the chain: pre-training steps and warm-up, BiSSL stages, N_L, N_U,
head warm-up epochs and lower warm-up, the search's trials, seeds, fine-tuning and probe epochs. Each
count c becomes max(1, round(c·F)) (a pre-training warm-up stays below its steps); batch sizes, learning
rates and every other setting are the preset's. ``--set STAGE.FIELD=VALUE`` overrides any field
(after the budget), e.g. ``--set pretrain.batch_size=256`` on a small machine.

Before it starts, the chain prints a projection of each stage's time on this machine (:func:`project`):
k steps of each stage's real step function are timed (pre-training steps, one BiSSL stage, fine-tuning
steps) on a throw-away copy of the first run, and multiplied by the counts. ``--dry-run`` prints it only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError
from .presets import PAPER_DOWNSTREAM

PRESETS = {"paper_iclr": "iclr", "paper_neurips": "neurips"}
COUNTS = {"pretrain": ("steps", "warmup_steps"),
          "bissl": ("stages", "lower_steps", "upper_steps", "head_warmup_epochs", "lower_warmup", "lower_warmup_passes"),
          "compare": ("trials", "seeds", "epochs", "probe_epochs")}


def scale(count: int | None, budget: float) -> int | None:
    """The budget rule: max(1, round(count·budget)); None stays None."""
    return None if count is None else max(1, round(count * budget))


@dataclass
class Step:
    name: str          # 'pretrain', 'bissl_<set>', 'compare_<set>'
    stage: str         # 'pretrain', 'bissl', 'compare'
    config: Config


def _parse_sets(sets: list[str]) -> dict[str, dict]:
    """``['pretrain.batch_size=16', ...]`` → {'pretrain': {'batch_size': 16}}; values are JSON (else strings)."""
    out: dict[str, dict] = {s: {} for s in COUNTS}
    for item in sets:
        key, eq, raw = item.partition("=")
        stage, dot, field = key.partition(".")
        if not eq or not dot or stage not in out:
            raise ConfigError(f"--set {item!r} must be STAGE.FIELD=VALUE with STAGE one of {', '.join(out)}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[stage][field] = tuple(value) if isinstance(value, list) else value
    return out


def _scaled(values: dict, stage: str, budget: float) -> dict:
    return {k: (scale(v, budget) if k in COUNTS[stage] else v) for k, v in values.items()}


def plan(preset: str, *, out: str | Path, datasets: list[str] | None = None, budget: float = 1.0,
         method: str = "simclr", sets: list[str] = (), device: str = "auto", data_root: str | None = None) -> list[Step]:
    """The chain's steps with their configs (module docstring); raises ConfigError before anything is written."""
    from .bissl import BisslConfig
    from .compare import CompareConfig
    from .pretrain import PretrainConfig

    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} must be one of {', '.join(PRESETS)}")
    if not 0 < budget <= 1:
        raise ConfigError(f"--budget {budget!r} must be in (0, 1] (1 = the paper's counts)")
    version, out, extra = PRESETS[preset], Path(out), _parse_sets(sets)
    datasets = list(datasets or PAPER_DOWNSTREAM[version])
    from .presets import pretrain_values
    pre = _scaled(pretrain_values(version, method=method), "pretrain", budget)
    pre.update(extra["pretrain"], out_dir=str(out / "pretrain"), device=device, data_root=data_root, progress=False)
    pre["warmup_steps"] = min(pre["warmup_steps"], pre["steps"] - 1) if "warmup_steps" not in extra["pretrain"] \
        else pre["warmup_steps"]
    steps = [Step("pretrain", "pretrain", PretrainConfig.from_dict(pre))]
    checkpoint = str(out / "pretrain" / "checkpoint.pt")
    for d in datasets:
        base = BisslConfig.paper_iclr(downstream=d) if version == "iclr" else None
        if version == "neurips":
            lr = {k: extra["bissl"][k] for k in ("upper_lr", "upper_weight_decay") if k in extra["bissl"]}
            base = BisslConfig.paper_neurips(method=method, downstream=d, **lr)
        b = _scaled({k: v for k, v in base.to_dict().items()}, "bissl", budget)
        b.update(extra["bissl"], pretrain_checkpoint=checkpoint, out_dir=str(out / f"bissl_{d}"), device=device,
                 data_root=data_root, progress=False)
        steps.append(Step(f"bissl_{d}", "bissl", BisslConfig.from_dict(b)))
        task = d if b.get("labels_per_class") is None else f"{d}:{b['labels_per_class']}"  # the BiSSL run's task
        c = _scaled(CompareConfig.paper(version).to_dict(), "compare", budget)
        c.update(extra["compare"], pretrain_checkpoint=checkpoint, tasks=(task,), bissl_runs=(str(out / f"bissl_{d}"),),
                 arms=("baseline_matched", "bissl"), out_dir=str(out / f"compare_{d}"), device=device,
                 data_root=data_root, progress=False)
        steps.append(Step(f"compare_{d}", "compare", CompareConfig.from_dict(c)))
    return steps


# ---- the projection ----------------------------------------------------------------------------------------

def _timed(fn, k: int) -> float:
    """Seconds per call of ``fn(i)`` over k calls, after one untimed call (allocations, kernel choice)."""
    fn(0)
    t0 = time.perf_counter()
    for i in range(1, k + 1):
        fn(i)
    return (time.perf_counter() - t0) / k


def project(steps: list[Step], *, k: int = 2) -> list[dict]:
    """Measured seconds per unit of each stage and the projected total per step (module docstring)."""
    from .bissl import build_trainer
    from .compare import parse_task
    from .finetune import FinetuneConfig, Finetuner
    from .pretrain import Pretrainer

    tmp = Path(tempfile.mkdtemp(prefix="bissl-reproduce-"))
    try:
        pre_cfg = steps[0].config
        trainer = Pretrainer(pre_cfg.replace(out_dir=str(tmp / "pretrain"), steps=max(pre_cfg.steps, k + 2),
                                             warmup_steps=0, init_checkpoint=None))
        per_step = _timed(trainer.train_step, k)
        trainer.step = k + 1
        trainer.save()
        trainer.run_dir.close()
        ckpt = str(trainer.checkpoint_path)
        rows = [{"step": "pretrain", "unit": "step", "seconds_per_unit": per_step, "units": pre_cfg.steps}]
        for s in steps[1:]:
            cfg = s.config
            if s.stage == "bissl":
                one = cfg.replace(pretrain_checkpoint=ckpt, stages=1, head_warmup_epochs=0, out_dir=str(tmp / s.name))
                bt = build_trainer(one, resume=False)
                t0 = time.perf_counter()
                for _ in bt.run():
                    pass
                stage_s = time.perf_counter() - t0
                rows.append({"step": s.name, "unit": "stage", "seconds_per_unit": stage_s, "units": cfg.stages})
                bissl_cfg = cfg
            else:
                name, labels = parse_task(cfg.tasks[0])
                ft = FinetuneConfig(backbone_checkpoint=ckpt, downstream=name, labels_per_class=labels, epochs=1,
                                    batch_size=cfg.batch_size, test=False, data_root=cfg.data_root, device=cfg.device,
                                    progress=False, out_dir=str(tmp / s.name))
                tuner = Finetuner(ft)
                batches = iter(tuner.train_epoch(0))
                ft_step = _timed(lambda i: next(batches, None), min(k, max(tuner.steps_per_epoch - 1, 1)))
                tuner.run_dir.close()
                runs = (cfg.trials + cfg.seeds) * len(cfg.arms)
                # the matched continuation: stages·N_L pretext steps at B_P (time ∝ batch)
                matched = bissl_cfg.stages * bissl_cfg.lower_steps * per_step * bissl_cfg.lower_batch_size / pre_cfg.batch_size
                rows.append({"step": s.name, "unit": "fine-tuning step", "seconds_per_unit": ft_step,
                             "units": runs * cfg.epochs * tuner.steps_per_epoch, "extra_seconds": matched})
        for r in rows:
            r["seconds"] = r["seconds_per_unit"] * r["units"] + r.get("extra_seconds", 0.0)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def projection_table(rows: list[dict]) -> str:
    lines = [f"{'step':<24}{'unit':<18}{'s/unit':>10}{'units':>12}{'hours':>10}"]
    for r in rows:
        lines.append(f"{r['step']:<24}{r['unit']:<18}{r['seconds_per_unit']:>10.3g}{r['units']:>12,}"
                     f"{r['seconds'] / 3600:>10.3g}")
    lines.append(f"{'total':<64}{sum(r['seconds'] for r in rows) / 3600:>10.3g}")
    return "\n".join(lines)


# ---- running -----------------------------------------------------------------------------------------------

def run(steps: list[Step], out: str | Path, *, log=print) -> dict:
    """Run the chain: finished steps (in ``done.json`` with the same config) are skipped, the rest run or
    resume in their folders. Returns {step name: its result summary}."""
    from .bissl import build_trainer
    from .compare import run_comparison
    from .hpo import write_json
    from .pretrain import Pretrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "done.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    results = {}
    for s in steps:
        identity = json.loads(json.dumps(s.config.identity()))
        if done.get(s.name, {}).get("identity") == identity:
            log(f"{s.name}: done, skipped")
            results[s.name] = done[s.name]["result"]
            continue
        log(f"{s.name}: running in {s.config.out_dir}")
        if s.stage == "pretrain":
            trainer = Pretrainer(s.config)
            for _ in trainer.run():
                pass
            result = {"checkpoint": str(trainer.checkpoint_path), "steps": trainer.step}
        elif s.stage == "bissl":
            trainer = build_trainer(s.config)
            for _ in trainer.run():
                pass
            result = {"checkpoint": str(trainer.checkpoint_path), "stages": trainer.stage}
        else:
            run_comparison(s.config)
            result = {"results": str(Path(s.config.results_dir or s.config.out_dir) / "comparison.json")}
        done[s.name] = {"identity": identity, "result": result}
        write_json(done_path, done)
        results[s.name] = result
    return results
