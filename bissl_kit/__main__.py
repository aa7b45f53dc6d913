"""Command line: ``python -m bissl_kit STAGE [--field value ...]`` with the notebooks' config fields.

For batch jobs and clusters. Every field of the stage's config is an option (``--lr 0.5``,
``--crop-scale 0.2 1.0``, ``--clip-grad-norm none``); ``--config FILE.json`` reads a config saved by
an earlier run; options given on the command line override it. The same command runs under
``torchrun`` on several processes, GPUs and nodes (README, "Scaling out with torchrun").

Stages: ``pretrain`` (PretrainConfig), ``bissl`` (BisslConfig; ``--paper-mode`` as notebook 02's
``paper_mode``, ``--preset`` for the official V1/V3 settings), ``finetune`` (FinetuneConfig) and
``compare`` (CompareConfig) and ``sweep`` (SweepConfig: a replicated comparison per point of a field
or of named bundles, ``--points 'MINRES-5:solver=minres,solver_iters=5'``). Paths are relative to the working directory
(the notebooks' parameters are relative to ``notebooks/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import sys
import types
import typing
from pathlib import Path

import torch

from . import distributed
from .bissl import BisslConfig
from .checkpoint import CheckpointError
from .hpo import SearchFailedError
from .rundir import RunLockedError
from .compare import CompareConfig
from .config import Config, ConfigError
from .data import DataNotFoundError, register_from
from .experiments.sweep import SweepConfig
from .downstream import metrics_text
from .finetune import FinetuneConfig
from .pretrain import PretrainConfig, Pretrainer

# errors a user causes (bad input, files, a folder in use, a full disk): a message, exit status 2
USER_ERRORS = (ConfigError, CheckpointError, DataNotFoundError, RunLockedError, SearchFailedError, OSError)

STAGES: dict[str, type[Config]] = {"pretrain": PretrainConfig, "bissl": BisslConfig, "finetune": FinetuneConfig,
                                   "compare": CompareConfig, "sweep": SweepConfig}


def _parse_value(text: str, hint):
    """A command-line string as the field's type (the config validates ranges afterwards)."""
    if text.lower() == "none":
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if base is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")
    for cast in (int, float):
        if base is cast:
            try:
                return cast(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not a {cast.__name__}") from None
    return text


def add_config_options(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        is_tuple = _tuple_hint(hints[f.name]) is not None
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            nargs="+" if is_tuple else None, metavar=f.name.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {f.default!r})")


def _tuple_hint(hint):
    """The tuple annotation of a field (``tuple[...]`` or ``tuple[...] | None``), else None."""
    if typing.get_origin(hint) is tuple:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if typing.get_origin(a) is tuple), None)
    return None


def read_config_file(path: str) -> dict:
    """The fields of a ``--config`` JSON file (a run's config.json): a clear error for a file that is
    missing, unreadable, not JSON, or not one object."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"--config {path!r} cannot be read ({reason})") from None
    try:
        values = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"--config {path!r} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path!r} must hold one JSON object of config fields (e.g. a run's config.json), "
                          f"not a {type(values).__name__}")
    return values


# the BiSSL presets on the command line: each takes the options given as its overrides
BISSL_PRESETS = {
    "paper_iclr": BisslConfig.paper_iclr,
    "paper_neurips": BisslConfig.paper_neurips,
    "paper_neurips_byol": lambda **kw: BisslConfig.paper_neurips(method="byol", **kw),
}


def config_values(cls: type[Config], args: argparse.Namespace) -> dict:
    """The config fields given: the ``--config`` file's, then the options'."""
    hints = typing.get_type_hints(cls)
    values = {}
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    for f in dataclasses.fields(cls):
        if f.name in vars(args):
            raw = vars(args)[f.name]
            tup = _tuple_hint(hints[f.name])
            if tup is not None:
                if len(raw) == 1 and raw[0].lower() == "none":  # an Optional tuple set to None
                    values[f.name] = None
                else:
                    values[f.name] = tuple(_parse_value(v, typing.get_args(tup)[0]) for v in raw)
            else:
                values[f.name] = _parse_value(raw, hints[f.name])
    return values


def config_from_args(cls: type[Config], args: argparse.Namespace) -> Config:
    values = config_values(cls, args)
    if cls is BisslConfig:
        if getattr(args, "preset", None):
            if args.paper_mode:
                raise ConfigError("--preset and --paper-mode are alternatives: a paper preset is paper mode already")
            return BISSL_PRESETS[args.preset](**values)
        return BisslConfig.embedded(paper_mode=args.paper_mode, **values)
    return cls.from_dict(values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_kit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    stage_parsers = {}
    for name, cls in STAGES.items():
        p = stage_parsers[name] = sub.add_parser(name, help=f"run the {name} stage", argument_default=argparse.SUPPRESS)
        p.add_argument("--config", help="JSON file with config fields (e.g. a run's config.json)")
        p.add_argument("--register", action="append", default=[], metavar="MODULE:FUNCTION",
                       help="import MODULE and call FUNCTION, which registers datasets with "
                            "bissl_kit.data.register_dataset, before the config is checked (repeatable; "
                            "$BISSL_DATASETS does the same; docs/data.md)")
        if name == "bissl":
            p.add_argument("--paper-mode", dest="paper_mode", action="store_true", default=False,
                           help="start from the official algorithm's values (PAPER_MODE) instead of ours (FAST_MODE); "
                                "options given override them")
            p.add_argument("--preset", choices=tuple(BISSL_PRESETS), default=None,
                           help="the official settings of one version: paper_iclr (V1), paper_neurips (V3, SimCLR's "
                                "per-dataset upper lr/wd), paper_neurips_byol (V3, BYOL's); options given override "
                                "them, and what the preset derives (the lower warm-up, the upper lr) follows them")
        add_config_options(p, cls)
    stage_parsers["reproduce"] = _reproduce_parser(sub)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a misspelt option: the stage's usage, and the closest option it has
        p = stage_parsers[args.stage]
        known = [o for a in p._actions for o in a.option_strings]
        close = [m for u in unknown if u.startswith("--") for m in difflib.get_close_matches(u, known, n=1)]
        p.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; `python -m bissl_kit {args.stage} --help` lists the options")
    stage_parser = stage_parsers[args.stage]
    if args.stage == "reproduce":
        return _reproduce(args, parser, stage_parser)
    try:
        for spec in args.register:
            register_from(spec)
        cfg = config_from_args(STAGES[args.stage], args)
    except (ConfigError, argparse.ArgumentTypeError) as e:
        stage_parser.error(str(e))  # the stage's usage, not the top level's
    # under torchrun (torchrun --nproc-per-node M python -m bissl_kit STAGE ...) every rank runs this;
    # join the process group now, and let rank 0 alone print (errors still reach stderr on every rank)
    if distributed.init(device=getattr(cfg, "device", None)) and not distributed.is_main():
        sys.stdout = open(os.devnull, "w")
    try:
        return _run(args, cfg, argv)
    except USER_ERRORS as e:
        # bad input found once files are opened (a checkpoint of another kind, a run folder of another
        # config or in use, a dataset that is not there, a full disk, a search that had nothing to choose
        # from): the message says what and where, a traceback adds nothing
        stage_parser.exit(2, f"{parser.prog} {args.stage}: error: {e}\n")
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        sizes = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("batch_size", "lower_batch_size", "upper_batch_size",
                                                           "width", "image_size") if hasattr(cfg, k))
        stage_parser.exit(2, f"{parser.prog} {args.stage}: error: the run does not fit in memory ({sizes}); "
                             f"lower the batch size, the width or the image size ({str(e).splitlines()[0][:200]})\n")


def _reproduce_parser(sub) -> argparse.ArgumentParser:
    from .reproduce import PRESETS
    p = sub.add_parser("reproduce", help="the paper's chain: pretrain → BiSSL → compare per set (bissl_kit.reproduce)")
    p.add_argument("--preset", required=True, choices=tuple(PRESETS), help="the paper version whose settings run")
    p.add_argument("--method", default="simclr", choices=("simclr", "byol"), help="pretext method (BYOL: paper_neurips)")
    p.add_argument("--datasets", nargs="+", default=None, help="downstream sets (default: the preset's)")
    p.add_argument("--budget", type=float, default=1.0, help="scale every count by F: max(1, round(count·F))")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a field of a stage's config (stages: pretrain, bissl, compare), after the budget")
    p.add_argument("--out", default="runs/reproduce", help="the chain's folder: one run folder per step")
    p.add_argument("--device", default="auto", help="where every stage runs")
    p.add_argument("--data-root", dest="data_root", default=None, help="dataset root of every stage")
    p.add_argument("--measure-steps", dest="measure_steps", type=int, default=2,
                   help="steps timed per stage for the projection")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the projection only")
    return p


def _reproduce(args, parser, stage_parser) -> int:
    from . import reproduce
    try:
        steps = reproduce.plan(args.preset, out=args.out, datasets=args.datasets, budget=args.budget,
                               method=args.method, sets=args.sets, device=args.device, data_root=args.data_root)
    except ConfigError as e:
        stage_parser.error(str(e))
    try:
        rows = reproduce.project(steps, k=args.measure_steps)
        print(f"projected time on this machine ({args.measure_steps} timed steps per stage):")
        print(reproduce.projection_table(rows), flush=True)
        if not args.dry_run:
            reproduce.run(steps, args.out, log=lambda s: print(s, flush=True))
            print(f"done: {args.out}/done.json")
    except USER_ERRORS as e:
        stage_parser.exit(2, f"{parser.prog} reproduce: error: {e}\n")
    return 0


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "not enough memory" in text


def invocation(argv) -> str:
    """The command as the user typed it, written into results so that it reruns as written."""
    return shlex.join(["python", "-m", "bissl_kit"] + list(sys.argv[1:] if argv is None else argv))


def _run(args: argparse.Namespace, cfg: Config, argv) -> int:
    if args.stage == "pretrain":
        last = None
        for rec in Pretrainer(cfg).run():
            if "knn" in rec:
                print(f"step {rec['step']}: k-NN {rec['knn']:.2%} ({rec['protocol']})", flush=True)
            last = rec
        print(f"done: {cfg.out_dir}/checkpoint.pt (step {last['step'] if last else cfg.steps})")
    elif args.stage == "bissl":
        from .bissl import build_trainer
        trainer = build_trainer(cfg)
        for rec in trainer.run():
            if rec.get("kind") == "stage":
                print(f"stage {rec['stage']}: {metrics_text(rec, 'val')}, ‖θ_P − θ_D‖ {rec['distance']:.3g}", flush=True)
        print(f"done: {cfg.out_dir}/checkpoint.pt (stage {trainer.stage})")
    elif args.stage == "finetune":
        from .finetune import Finetuner
        tuner = Finetuner(cfg)
        for rec in tuner.run():
            if rec.get("kind") == "epoch" and "val_loss" in rec:
                print(f"epoch {rec['epoch']}: train loss {rec['train_loss']:.3f}, {metrics_text(rec, 'val')}", flush=True)
        res = tuner.result
        print(f"{metrics_text(res, 'val')} ({res['protocol']})")
        if "test_protocol" in res:
            print(f"{metrics_text(res, 'test')} ({res['test_protocol']})")
        print(f"done: {cfg.out_dir}/checkpoint.pt")
    elif args.stage == "compare":
        from .compare import run_comparison
        from .reports import comparison_table
        results = run_comparison(cfg, command=invocation(argv))
        print(comparison_table(results))
        print(f"done in {results['seconds']:.0f} s: {cfg.results_dir or cfg.out_dir}/comparison.{{json,csv,md}}")
        if cfg.figures_dir is not None:  # the comparison writes text; its figure needs plotly, imported here only
            from .viz.compare import export_comparison
            figure = export_comparison(results, cfg)
            print(f"figure: {', '.join(str(p) for p in figure.values())}")
    elif args.stage == "sweep":
        from .experiments.sweep import run_sweep, sweep_table
        sweep = run_sweep(cfg, command=invocation(argv))
        print(sweep_table(sweep))
        print(f"done in {sweep['seconds']:.0f} s: {cfg.results_dir or cfg.out_dir}/sweep.{{json,csv,md}}")
        if cfg.figures_dir is not None:
            from .viz.sweep import export_sweep
            figure = export_sweep(sweep, cfg.figures_dir, cfg.sweep_stem)
            print(f"figure: {', '.join(str(p) for p in figure.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
