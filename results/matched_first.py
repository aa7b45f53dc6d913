# Runs the compute-matched arm of the committed comparison ahead of `python -m bissl_kit compare` (while the
# BiSSL runs are still going), with exactly the configs and run directories that command uses, so that the
# command later re-reads these finished runs instead of training them.
import sys
from pathlib import Path
from bissl_kit.checkpoint import load_checkpoint
from bissl_kit.compare import CompareConfig, arm_backbones, parse_task, _slug
from bissl_kit.finetune import load_backbone, load_data
from bissl_kit.hpo import run_search, sample_candidates

tasks = ("digits", "fashion_mnist:50")
runs = ("runs/compare/bissl_digits", "runs/compare/bissl_fashion_mnist_50")
cfg = CompareConfig(pretrain_checkpoint="runs/pretrain/checkpoint.pt", tasks=tasks, bissl_runs=runs,
                    arms=("baseline_matched",), trials=4, seeds=5, epochs=10, out_dir="runs/compare", progress=False)
cands = sample_candidates(cfg.trials, seed=cfg.search_seed, lr_range=cfg.lr_range, wd_range=cfg.wd_range)
for task, run in zip(tasks, runs):
    bissl_cfg = load_checkpoint(Path(run) / "checkpoint.pt", kind="bissl")["config"]
    paths = arm_backbones(cfg, task, run, bissl_cfg)
    name, labels = parse_task(task)
    data = load_data(name, load_backbone(cfg.pretrain_checkpoint)[1], labels_per_class=labels)
    base = cfg.finetune_config(task, paths["baseline_matched"], str(Path(cfg.out_dir) / _slug(task) / "baseline_matched"))
    res = run_search(base, cands, seeds=cfg.seeds, out_dir=base.out_dir, data=data,
                     on_run=lambda what, r: print(task, what, r.get("lr"), r.get("val_top1"), r.get("test_top1"), flush=True))
