"""TensorBoard views of the kit's records: every run's scalars, and a sweep's points as an hparams table.

``metrics.jsonl`` stays the record (:class:`bissl_kit.rundir.MetricsLog`); the event file beside it,
``events.out.tfevents.metrics``, is a view of it that :class:`ScalarLog` keeps in step: every record
appended to the log is appended there too (rank 0 only, like the log), and when a resumed run repairs its
log the event file is rewritten from the records that stay, so a resumed run's curves hold each step once.
``tensorboard --logdir runs/`` then shows every run by its folder.

* **Scalars.** Every number of a record (bools as 0/1, nested dicts flattened with ``/``) becomes a scalar
  tagged ``<record kind>/<field>``; strings and lists (a solver's residual history) are left to the log.
* **Steps.** Each stage's records carry their own position (:data:`STEP_FIELDS`): pre-training its
  ``step``; BiSSL the global lower/upper step (``lower_step``, ``upper_step``), its ``stage`` for the stage
  records and ``epoch`` for the head warm-up; fine-tuning the SGD ``step`` for step records and the
  ``epoch`` for epoch and final records.
* **Switches.** ``BISSL_TENSORBOARD=0`` (or ``false``/``off``) turns the event files off. Without the
  ``tensorboard`` package (``pip install 'bissl_kit[tensorboard]'``) runs go on with the log alone, and say
  so once.

The event file is written record by record with the file opened only for that write, so a process running
many runs (a search, a sweep) holds no file or thread per run, and a run killed mid-write leaves at worst a
cut-short last record, which TensorBoard's reader skips.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

EVENT_FILE = "events.out.tfevents.metrics"  # TensorBoard reads files whose name holds "tfevents"
ENV_SWITCH = "BISSL_TENSORBOARD"

# stage -> {record kind: the field that is its step}; a kind not listed uses the first int of
# ("step", "epoch", "stage") it has, and a record without one is left to the log
STEP_FIELDS: dict[str, dict[str, str]] = {
    "pretrain": {"step": "step", "knn": "step"},
    "bissl": {"lower": "lower_step", "upper": "upper_step", "stage": "stage", "head_warmup": "epoch"},
    "finetune": {"step": "step", "epoch": "epoch", "final": "epoch"},
}

_warned_missing = False


def enabled() -> bool:
    """Whether runs write event files: the switch is on and the ``tensorboard`` package imports (else a
    warning, once per process)."""
    global _warned_missing
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if not _warned_missing:
            _warned_missing = True
            warnings.warn("TensorBoard scalars are off: the tensorboard package is not installed (pip install "
                          "'bissl_kit[tensorboard]'); metrics.jsonl holds every record", RuntimeWarning, stacklevel=3)
        return False
    return True


def scalars_of(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record, flattened: ``{"knn_by_bn/pretext": 0.8, ...}`` (bools as 0/1)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "kind" and not prefix:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, (int, float)):
            out[name] = float(v)
        elif isinstance(v, dict):
            out.update(scalars_of(v, prefix=f"{name}/"))
    return out


def step_of(stage: str, record: dict) -> int | None:
    """The step at which ``record`` of ``stage`` is drawn (see :data:`STEP_FIELDS`), or None."""
    field = STEP_FIELDS.get(stage, {}).get(record.get("kind"))
    candidates = (field,) if field is not None else ("step", "epoch", "stage")
    for f in candidates:
        v = record.get(f)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    return None


def _event_bytes(**fields) -> bytes:
    from tensorboard.compat.proto.event_pb2 import Event
    return Event(wall_time=time.time(), **fields).SerializeToString()


def _scalar_event(step: int, values: dict[str, float]) -> bytes:
    from tensorboard.compat.proto.summary_pb2 import Summary
    return _event_bytes(step=step, summary=Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()]))


def _append_events(path: Path, events: list[bytes], *, fresh: bool = False) -> None:
    """Append TFRecord-framed events to ``path``; a new file starts with the file-version event."""
    from tensorboard.summary.writer.record_writer import RecordWriter
    new = fresh or not path.exists()
    with open(path, "wb" if fresh else "ab") as f:
        w = RecordWriter(f)
        if new:
            w.write(_event_bytes(file_version="brain.Event:2"))
        for e in events:
            w.write(e)


class ScalarLog:
    """``folder/events.out.tfevents.metrics``: the TensorBoard scalars of a run's records (module docstring)."""

    def __init__(self, folder: str | os.PathLike, stage: str):
        self.path = Path(folder) / EVENT_FILE
        self.stage = stage

    def _events(self, records: list[dict]) -> list[bytes]:
        out = []
        for r in records:
            step = step_of(self.stage, r)
            if step is None:
                continue
            fields = STEP_FIELDS.get(self.stage, {}).get(r.get("kind"))
            values = {f"{r.get('kind', 'record')}/{k}": v for k, v in scalars_of(r).items() if k != fields}
            if values:
                out.append(_scalar_event(step, values))
        return out

    def append(self, record: dict) -> None:
        events = self._events([record])
        if events:
            _append_events(self.path, events)

    def rewrite(self, records: list[dict]) -> None:
        """The event file anew from ``records`` (a repaired log), written beside and moved into place."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        _append_events(tmp, self._events(records), fresh=True)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# ---- a sweep's points --------------------------------------------------------------------------------------

def _hparam_value(v):
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # None, tuples: shown as text


def write_hparams(log_dir: str | os.PathLike, points: list[dict]) -> Path:
    """A sweep's points as a TensorBoard hparams table: ``points`` is a list of ``{"hparams": {name: value},
    "metrics": {name: float}}``. The experiment (every hparam with the values it took, every metric) goes to
    ``log_dir``, each point to ``log_dir/point_NNN`` (its hparams and its metrics as scalars at step 0).
    Needs the ``tensorboard`` package; returns ``log_dir``."""
    from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: F401  (a clear ImportError first)
    from torch.utils.tensorboard.summary import hparams

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for p in points for k in p["hparams"]))
    metrics = list(dict.fromkeys(k for p in points for k in p["metrics"]))
    domains: dict[str, list] = {}
    for name in names:
        values = [_hparam_value(p["hparams"][name]) for p in points if name in p["hparams"]]
        if all(isinstance(v, str) for v in values) or all(isinstance(v, bool) for v in values):
            domains[name] = list(dict.fromkeys(values))
    first = {name: next(_hparam_value(p["hparams"][name]) for p in points if name in p["hparams"]) for name in names}
    exp, _, _ = hparams(first, {m: 0.0 for m in metrics}, hparam_domain_discrete=domains)
    _append_events(log_dir / EVENT_FILE, [_event_bytes(summary=exp)], fresh=True)
    for i, p in enumerate(points):
        values = {k: float(v) for k, v in p["metrics"].items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:  # kept, so the table shows it; said, so nobody reads it as a number
            warnings.warn(f"point {i} of the sweep has non-finite {', '.join(bad)}", RuntimeWarning, stacklevel=2)
        _, ssi, sei = hparams({k: _hparam_value(v) for k, v in p["hparams"].items()}, values)
        run = log_dir / f"point_{i:03d}"
        run.mkdir(exist_ok=True)
        _append_events(run / EVENT_FILE, [_event_bytes(summary=ssi), _scalar_event(0, values), _event_bytes(summary=sei)],
                       fresh=True)
    return log_dir
