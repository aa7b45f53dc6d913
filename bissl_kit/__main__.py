"""Command line: ``python -m bissl_kit STAGE [--field value ...]`` with the notebooks' config fields.

For batch jobs and clusters. Every field of the stage's config is an option (``--lr 0.5``,
``--crop-scale 0.2 1.0``, ``--clip-grad-norm none``); ``--config FILE.json`` reads a config saved by
an earlier run; options given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from .config import Config, ConfigError
from .pretrain import PretrainConfig, Pretrainer

STAGES: dict[str, type[Config]] = {"pretrain": PretrainConfig}


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
        hint = hints[f.name]
        is_tuple = typing.get_origin(hint) is tuple
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            nargs="+" if is_tuple else None, metavar=f.name.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {f.default!r})")


def config_from_args(cls: type[Config], args: argparse.Namespace) -> Config:
    hints = typing.get_type_hints(cls)
    values = {}
    if getattr(args, "config", None):
        with open(args.config) as fh:
            values.update(json.load(fh))
    for f in dataclasses.fields(cls):
        if f.name in vars(args):
            raw = vars(args)[f.name]
            hint = hints[f.name]
            if typing.get_origin(hint) is tuple:
                elem = typing.get_args(hint)[0]
                values[f.name] = tuple(_parse_value(v, elem) for v in raw)
            else:
                values[f.name] = _parse_value(raw, hint)
    return cls.from_dict(values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_kit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, cls in STAGES.items():
        p = sub.add_parser(name, help=f"run the {name} stage", argument_default=argparse.SUPPRESS)
        p.add_argument("--config", help="JSON file with config fields (e.g. a run's config.json)")
        add_config_options(p, cls)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(STAGES[args.stage], args)
    except (ConfigError, argparse.ArgumentTypeError) as e:
        parser.error(str(e))
    if args.stage == "pretrain":
        last = None
        for rec in Pretrainer(cfg).run():
            if "knn" in rec:
                print(f"step {rec['step']}: k-NN {rec['knn']:.2%} ({rec['protocol']})", flush=True)
            last = rec
        print(f"done: {cfg.out_dir}/checkpoint.pt (step {last['step'] if last else cfg.steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
