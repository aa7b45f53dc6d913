"""Sweeps: one replicated comparison per point, where a point sets one or several BiSSL or fine-tuning fields.

A point is ``field=value`` of one swept field (``field`` and ``values``), or a named bundle of fields
(``points``: ``"name:field=v,field=v"``, e.g. ``"MINRES-5:solver=minres,solver_iters=5"``), for the
categorical arms that are several fields at once. Every point is a full comparison
(:func:`bissl_kit.compare.run_comparison`) in ``<out_dir>/points/<name>``; BiSSL replicates, matched
continuations and the searches of backbones that points share live once in ``shared_dir`` (default
``<out_dir>/shared``), keyed by their config: the matched baseline of a λ, γ, δ or solver sweep is run and
fine-tuned once. ``sweep.json/.csv/.md`` (with the command that reruns the sweep) go to ``results_dir``;
the sensitivity figure is drawn by :mod:`bissl_kit.viz.sweep`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, param
from ..compare import CompareConfig, run_comparison
from ..files import check_folder, write_text_atomic
from ..hpo import write_json
from ..reports import ARM_LABELS, num_text, points_sd_text, points_text
from ..rundir import RunLock
from .jobs import SEARCH_FIELDS
from .replicates import RUNNING_FIELDS

# fine-tuning fields a point may set (every arm's search uses them); the rest of a point's fields are BiSSL's
FINETUNE_FIELDS = SEARCH_FIELDS + ("search_seed", "trials", "seeds")
FIXED_BISSL_FIELDS = RUNNING_FIELDS + ("downstream", "labels_per_class", "sync_bn")


def bissl_fields() -> list[str]:
    from ..bissl import BisslConfig
    return [f for f in BisslConfig.field_names() if f not in FIXED_BISSL_FIELDS]


def _field_hint(field: str | None):
    import typing
    from ..bissl import BisslConfig
    for cls in (BisslConfig, CompareConfig):
        if field in cls.field_names():
            return typing.get_type_hints(cls)[field]
    return None


def parse_value(text: str, field: str | None = None):
    """A point's value as written: 'none' → None (a string where the field is a plain string: solver='none'),
    JSON numbers and booleans as such, anything else a string (the config it lands in checks its type and
    range)."""
    hint = _field_hint(field)
    if hint is str:
        return text
    if text.lower() == "none":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def parse_point(text: str) -> tuple[str, dict]:
    """``"name:field=v,field=v"`` → (name, {field: value})."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not rest:
        raise ConfigError(f"points: {text!r} must be 'name:field=value[,field=value...]', e.g. "
                          "'MINRES-5:solver=minres,solver_iters=5'")
    fields = {}
    for part in rest.split(","):
        field, eq, value = part.partition("=")
        if not eq or not field:
            raise ConfigError(f"points: {text!r}: {part!r} must be field=value")
        fields[field.strip()] = parse_value(value.strip(), field.strip())
    return name, fields


@dataclass(frozen=True)
class SweepConfig(CompareConfig):
    field: str | None = param(None, "the BiSSL or fine-tuning field swept over 'values' (or use 'points')")
    values: tuple[str, ...] = param((), "values of 'field', one point each")
    points: tuple[str, ...] = param((), "named points of several fields: 'name:field=v,field=v' (after field's)")
    sweep_stem: str = param("sweep", "file name (without extension) of the sensitivity figure", resumable=True)

    def check(self):
        super().check()
        if bool(self.field) != bool(self.values):
            raise ConfigError(f"field={self.field!r} and values={self.values!r}: give both, or neither and 'points'")
        points = self.point_list()
        if not points:
            raise ConfigError("a sweep needs points: field and values, or points ('name:field=v,field=v')")
        names = [n for n, _ in points]
        if len(set(names)) != len(names):
            raise ConfigError(f"points: the names {names} repeat; every point needs its own name")
        allowed = set(bissl_fields()) | set(FINETUNE_FIELDS)
        for name, fields in points:
            bad = sorted(set(fields) - allowed)
            if bad:
                raise ConfigError(f"points: {name!r} sets {', '.join(bad)}, which a sweep cannot vary; a point sets "
                                  f"BiSSL fields ({', '.join(bissl_fields())}) or fine-tuning fields "
                                  f"({', '.join(FINETUNE_FIELDS)})")
            if any(ch in name for ch in "/\\") or name in (".", ".."):
                raise ConfigError(f"points: the name {name!r} must be usable as a folder name")

    def point_list(self) -> list[tuple[str, dict]]:
        pts = [(f"{self.field}={v}", {self.field: parse_value(v, self.field)}) for v in self.values] if self.field else []
        return pts + [parse_point(p) for p in self.points]

    def point_config(self, name: str, fields: dict) -> tuple[CompareConfig, dict]:
        """The comparison of one point and the BiSSL fields it overrides (checked here, before any run)."""
        from ..bissl import BisslConfig
        compare = {k: v for k, v in self.to_dict().items() if k in CompareConfig.field_names()}
        folder = Path(self.out_dir) / "points" / name
        compare.update(out_dir=str(folder), results_dir=str(folder), figures_dir=None,
                       shared_dir=self.shared_dir or str(Path(self.out_dir) / "shared"))
        compare.update({k: v for k, v in fields.items() if k in FINETUNE_FIELDS})
        overrides = {k: v for k, v in fields.items() if k not in FINETUNE_FIELDS}
        BisslConfig.embedded(**overrides)  # a bad value fails with the field's own message
        return CompareConfig.from_dict(compare), overrides


def point_rows(name: str, fields: dict, results: dict) -> list[dict]:
    """One row per task, pair and metric: the test over replicates (R >= 2) or, with one BiSSL run, over
    fine-tuning seeds (labelled as such: it cannot see the run-to-run variance)."""
    rows = []
    if results.get("replication"):
        for r in results["replication"]:
            v, c = r["variance"], r.get("crossed")
            # the headline: runs and fine-tuning seeds both random (crossed); else the t over the run means
            keys = ("mean_diff", "lo", "hi", "t", "df", "p")
            head = ({"unit": "BiSSL run × fine-tuning seed", "seeds": c["seeds"], **{k: c[k] for k in keys}} if c
                    else {"unit": "BiSSL run", **{k: r.get(k) for k in keys}})
            rows.append({"point": name, "fields": fields, "task": r["task"], "a": r["a"], "b": r["b"],
                         "metric": r["metric"], "n": r["n"], **head,
                         "runs_only": {k: r.get(k) for k in ("lo", "hi", "t", "df", "p")},
                         "var_between": c["var_run"] if c else v["var_between"],
                         "var_within": c["var_seed"] if c else v["var_within"],
                         "var_residual": c["var_residual"] if c else math.nan,
                         "runs": [x["bissl_run"] for x in r["replicates"]],
                         "bissl_seeds": [x["bissl_seed"] for x in r["replicates"]]})
    else:
        for t in results["tasks"]:
            for p in t["paired"]:
                rows.append({"point": name, "fields": fields, "task": t["task"], "a": p["a"], "b": p["b"],
                             "metric": p["metric"], "unit": "fine-tuning seed", "n": p["n"],
                             "mean_diff": p.get("mean_diff"), "lo": p.get("lo"), "hi": p.get("hi"), "t": p.get("t"),
                             "df": p.get("df"), "p": p.get("p"), "var_between": math.nan, "var_within": math.nan,
                             "runs": [t["bissl_run"]["dir"]], "bissl_seeds": [t["bissl_run"]["seed"]]})
    return rows


def run_sweep(cfg: SweepConfig, *, command: str | None = None) -> dict:
    """Every point's comparison (each resumes), then ``sweep.json/.csv/.md`` and the TensorBoard hparams."""
    t0 = time.perf_counter()
    for field, folder in {"out_dir": cfg.out_dir, "results_dir": cfg.results_dir, "figures_dir": cfg.figures_dir}.items():
        if folder is not None:
            check_folder(field, folder)
    planned = [(name, fields, *cfg.point_config(name, fields)) for name, fields in cfg.point_list()]
    lock = RunLock(cfg.out_dir).acquire()  # one sweep per folder at a time (its points and runs lock theirs)
    try:
        return _run_sweep(cfg, command, planned, t0)
    finally:
        lock.release()


def _run_sweep(cfg: SweepConfig, command, planned, t0: float) -> dict:
    sweep = {"kind": "bissl_kit sweep", "command": command, "config": cfg.to_dict(), "points": [], "rows": []}
    for name, fields, point_cfg, overrides in planned:
        res = run_comparison(point_cfg, command=command, bissl_overrides=overrides)
        sweep["points"].append({"name": name, "fields": fields, "results": str(Path(point_cfg.results_dir) /
                                                                                "comparison.json"),
                                "seconds": res["seconds"]})
        sweep["rows"] += point_rows(name, fields, res)
    sweep["seconds"] = time.perf_counter() - t0
    out = Path(cfg.results_dir or cfg.out_dir)
    sweep["tensorboard"] = write_tensorboard(sweep, out / "tensorboard")
    write_json(out / "sweep.json", sweep)
    write_text_atomic(out / "sweep.csv", csv_text(sweep))
    write_text_atomic(out / "sweep.md", sweep_table(sweep) + (f"\nCommand: `{command}`\n" if command else ""))
    return sweep


def write_tensorboard(sweep: dict, log_dir: Path) -> str:
    """The points as a TensorBoard hparams table (:func:`bissl_kit.tensorboard.write_hparams`), when the
    kit's TensorBoard writer is installed; what was done, for the record."""
    import importlib.util
    if importlib.util.find_spec("bissl_kit.tensorboard") is None:
        return "not written: bissl_kit.tensorboard is not part of this installation"
    from ..tensorboard import write_hparams
    points = []
    for p in sweep["points"]:
        rows = [r for r in sweep["rows"] if r["point"] == p["name"] and r["mean_diff"] is not None]
        metrics = {f"{r['task']}/{r['a']}-{r['b']}/{r['metric']}/{k}": float(r[k])
                   for r in rows for k in ("mean_diff", "lo", "hi", "p") if r.get(k) is not None}
        points.append({"hparams": {"point": p["name"], **{k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                          for k, v in p["fields"].items()}}, "metrics": metrics})
    write_hparams(str(log_dir), points)
    return str(log_dir)


CSV_FIELDS = ("point", "fields", "task", "a", "b", "metric", "unit", "n", "mean_diff", "lo", "hi", "t", "df", "p",
              "var_between", "var_within", "bissl_seeds", "runs")


def csv_text(sweep: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sweep["rows"]:
        w.writerow({**r, "fields": json.dumps(r["fields"]), "bissl_seeds": " ".join(map(str, r["bissl_seeds"])),
                    "runs": " ".join(r["runs"])})
    return buf.getvalue()


def sweep_table(sweep: dict, metric: str = "test_top1") -> str:
    """The sensitivity table: per point and task, BiSSL − baseline with its CI, t, p and the variance split."""
    lines = ["| point | task | difference | unit (n) | mean diff, points [95% CI] | t (df) | p "
             "| SD between runs / fine-tuning seeds / residual, points |", "|---|---|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        if r["metric"] != metric or not r["n"]:
            continue
        sd = " / ".join(points_sd_text(v) for v in (r["var_between"], r["var_within"], r.get("var_residual", math.nan)))
        t = "n/a" if r["t"] is None or math.isnan(r["t"]) else f"{r['t']:.2f} ({r['df']:.3g})"
        p = num_text(r["p"], ".3g")
        n = f"{r['n']} × {r['seeds']}" if r.get("seeds") else f"{r['n']}"
        diff = f"{points_text(r['mean_diff'])} [{points_text(r['lo'])}, {points_text(r['hi'])}]"
        lines.append(f"| {r['point']} | {r['task']} | {ARM_LABELS[r['a']]} − {ARM_LABELS[r['b']]} | {r['unit']} "
                     f"({n}) | {diff} | {t} | {p} | {sd} |")
    return "\n".join(lines) + "\n"


def load_sweep(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
