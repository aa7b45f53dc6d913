"""What every stage's run directory shares: the metrics log, the resume check, the progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .config import Config


class MetricsLog:
    """``out_dir/metrics.jsonl``: one JSON record per line, appended as the run goes.

    A run killed between its last checkpoint and the kill has logged records it will redo after
    resuming; :meth:`keep` drops them (rewritten atomically, like checkpoints)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / "metrics.jsonl"

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        if not self.path.exists():
            return
        kept = [r for r in self.records() if predicate(r)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def config_conflicts(saved: dict, cfg: Config | dict, ignore: frozenset[str]) -> list[str]:
    """Fields whose saved value differs from ``cfg`` (a config or its dict), except those in ``ignore``
    (fields that do not change the numbers a run produces); compared as JSON, so tuples and lists are alike."""
    now = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
            if k not in ignore and json.loads(json.dumps(saved.get(k))) != json.loads(json.dumps(v))]


def progress_bar(enabled: bool, *, total: int, initial: int, desc: str, unit: str):
    """A tqdm bar (the notebook flavour in Jupyter), or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit)
