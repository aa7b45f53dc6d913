"""The run folder: one owner at a time, one log, one checkpoint, one config; resume, conflicts, forks.

Every stage writes into a folder of its own (its config's ``out_dir``):

* ``checkpoint.pt`` (:mod:`bissl_kit.checkpoint`): the run's record. A run resumes from it, and the
  log is repaired from it;
* ``metrics.jsonl``: one JSON record per line, appended as the run goes. A run killed between its last
  checkpoint and the kill, or a full disk, leaves records past the checkpoint or a cut-short last line;
  resuming drops both (with a warning for a damaged line), so each record is there once;
* ``config.json``: the config, for humans (written atomically; the checkpoint's copy is the one compared);
* ``.lock`` while a process runs in the folder (:class:`RunLock`).

A folder resumes only the run it holds: the saved config must equal the new one in every field that is
not ``resumable`` (:meth:`bissl_kit.config.Config.identity`), and the inputs recorded as the run's
``identity`` (e.g. the content signature of the checkpoint it started from) must match; anything else
is a :class:`~bissl_kit.checkpoint.RunConflictError` that names the fields. Inputs are compared by
content (a checkpoint's content signature, a fingerprint of the data), so a moved file resumes and
another one does not. :meth:`RunDir.fork` starts a
new folder from a run's current state under a changed config, recording the parent and the step it
branched at, so that every stage's numbers keep the config that produced them.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable

from . import distributed
from .checkpoint import STEP_UNITS, RunConflictError, load_checkpoint, save_checkpoint
from .config import Config
from .files import check_folder, write_text_atomic

KIND_NAMES = {"pretrain": "pre-training", "bissl": "BiSSL", "finetune": "fine-tuning", "compare": "comparison"}


class RunLockedError(RuntimeError):
    """Another live process owns the run folder."""


# ---- the lock ---------------------------------------------------------------------------------------------

def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """``folder/.lock``: who owns a run folder. :meth:`acquire` creates it with ``O_CREAT | O_EXCL`` (atomic
    on local file systems and on NFS v3 or later) holding the owner's pid, host and start time; a second
    process is refused at once with :class:`RunLockedError` naming the holder. The same process may acquire
    it again (a notebook re-running its cells). A holder that is gone is taken over with a warning: on the
    same host when its pid no longer runs, on another host (a shared file system across nodes, where a
    pid cannot be checked) when the lock's heartbeat, its modification time, which the holder refreshes
    every ``heartbeat_s``, is older than ``stale_after_s``. This relies on the clocks of the nodes
    agreeing to well within ``stale_after_s``."""

    def __init__(self, folder: str | os.PathLike, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.path = Path(folder) / ".lock"
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop: threading.Event | None = None
        self._at_exit = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: judged by its age alone

    def _mine(self, h: dict) -> bool:
        return h.get("host") == self.info["host"] and h.get("pid") == self.info["pid"]

    def _stale(self, h: dict) -> str | None:
        if h.get("host") == self.info["host"] and isinstance(h.get("pid"), int):
            return None if _alive(h["pid"], h.get("start")) else f"process {h['pid']} no longer runs"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        return f"its heartbeat is {age:.0f} s old" if age > self.stale_after_s else None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info))
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            h = self.holder()
            if h is None:
                continue  # released between our two calls
            if self._mine(h):
                break
            why = self._stale(h)
            if why is None:
                raise RunLockedError(
                    f"{str(self.path.parent)!r} is in use by process {h.get('pid', '?')} on {h.get('host', '?')} "
                    f"(since {h.get('since', '?')}); a run folder has one owner at a time: wait for it, or "
                    f"choose another out_dir")
            warnings.warn(f"{str(self.path.parent)!r}: taking over the lock of process {h.get('pid', '?')} on "
                          f"{h.get('host', '?')} (since {h.get('since', '?')}): {why}", RuntimeWarning, stacklevel=3)
            if self.holder() == h:  # the same stale holder still: remove it and try to create ours
                self.path.unlink(missing_ok=True)
        else:
            raise RunLockedError(f"{str(self.path.parent)!r}: could not take the run folder's lock")
        self._start_heartbeat()
        if not self._at_exit:
            atexit.register(self.release)
            self._at_exit = True
        return self

    def _start_heartbeat(self) -> None:
        if self._stop is not None:
            return
        self._stop = threading.Event()

        def beat(stop=self._stop, path=self.path):
            while not stop.wait(self.heartbeat_s):
                try:
                    os.utime(path)
                except OSError:
                    return

        threading.Thread(target=beat, daemon=True, name=f"runlock {self.path.parent}").start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        h = self.holder()
        if h is not None and self._mine(h):
            self.path.unlink(missing_ok=True)


# ---- the log ----------------------------------------------------------------------------------------------

class MetricsLog:
    """``folder/metrics.jsonl``: one JSON record per line, appended as the run goes. Given the ``stage``
    that writes it (a run's log, not a reader), it also keeps the TensorBoard view of the records beside it
    (:mod:`bissl_kit.tensorboard`; off with ``BISSL_TENSORBOARD=0`` or without the package)."""

    def __init__(self, folder: str | os.PathLike, stage: str | None = None):
        self.path = Path(folder) / "metrics.jsonl"
        self.scalars = None
        if stage is not None:
            from . import tensorboard
            if tensorboard.enabled():
                self.scalars = tensorboard.ScalarLog(folder, stage)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.scalars is not None:
            self.scalars.append(record)

    def _read(self) -> tuple[list[dict], int]:
        """The records, and how many lines could not be read (a cut-short last line, a damaged one)."""
        if not self.path.exists():
            return [], 0
        records, bad = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
        return records, bad

    def records(self) -> list[dict]:
        return self._read()[0]

    def repair(self, keep: Callable[[dict], bool]) -> None:
        """Keep the readable records for which ``keep`` holds, each once (rewritten atomically); warn
        about lines that could not be read."""
        if not self.path.exists():
            return
        records, bad = self._read()
        if bad:
            warnings.warn(f"{str(self.path)!r}: dropped {bad} damaged line(s) (a cut-short write?); the run "
                          "resumes from its checkpoint and logs what it redoes", RuntimeWarning, stacklevel=3)
        seen, kept = set(), []
        for r in records:
            if not keep(r):
                continue
            key = json.dumps(r, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(r)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # the curves hold what the log holds, each step once; an intact log leaves its event file untouched
        # (a finished run re-read changes no file)
        if self.scalars is not None and (bad or kept != records or not self.scalars.path.exists()):
            self.scalars.rewrite(kept)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.scalars is not None:
            self.scalars.clear()


def config_conflicts(saved: dict, now: dict, ignore: frozenset[str]) -> list[str]:
    """Fields whose saved value differs from the current one, except those in ``ignore``; compared as
    JSON, so tuples and lists are alike."""
    def norm(v):
        return json.loads(json.dumps(v))
    keys = [k for k in {**saved, **now} if k not in ignore]
    return [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if norm(saved.get(k)) != norm(now.get(k))]


# ---- the folder -------------------------------------------------------------------------------------------

class RunDir:
    """A stage's run folder (see the module docstring). Under torchrun rank 0 alone locks, logs and writes;
    every rank reads the checkpoint to resume."""

    def __init__(self, folder: str | os.PathLike, kind: str, cfg: Config, *, identity: dict | None = None,
                 lineage: dict | None = None, field: str = "out_dir"):
        self.path = check_folder(field, folder)
        self.kind, self.cfg = kind, cfg
        self.identity = identity or {}   # the inputs the numbers depend on besides the config
        self.lineage = dict(lineage or {})
        self.main = distributed.is_main()
        self.log = MetricsLog(self.path, stage=kind) if self.main else distributed.NullLog()
        self.lock = RunLock(self.path) if self.main else None
        if self.lock is not None:  # a trainer dropped without finishing frees the folder too
            weakref.finalize(self, self.lock.release)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def open(self) -> "RunDir":
        """Take the folder's lock (rank 0); other processes are refused until this one ends."""
        if self.lock is not None:
            self.lock.acquire()
        return self

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def resume(self, keep: Callable[[dict], Callable[[dict], bool]], *, recipe: dict | None = None) -> dict | None:
        """The checkpoint, if the folder holds one of this run (else None, and a fresh log). ``keep(ckpt)``
        says which log records the checkpoint vouches for; the log is repaired to those. ``recipe``: the
        model's backbone recipe, which the checkpoint's must match (checked first: it names the
        architecture field that differs)."""
        if not self.checkpoint_path.exists():
            self.log.clear()  # records of a run killed before its first checkpoint
            return None
        ckpt = load_checkpoint(self.checkpoint_path, kind=self.kind)
        if recipe is not None:
            from .backbones import check_recipe
            check_recipe(ckpt["backbone"], recipe, where=str(self.checkpoint_path))
        saved = type(self.cfg).from_saved(ckpt["config"])
        conflicts = config_conflicts(saved.identity(), self.cfg.identity(), frozenset())
        saved_identity = ckpt["lineage"].get("identity", {})
        # the inputs named by a config field (a checkpoint path): compared by content, so a moved file resumes
        # (an input a run saved before it was recorded cannot be checked, and is taken as it is)
        conflicts += [self._identity_conflict(k, saved) for k, v in self.identity.items()
                      if k in saved_identity and saved_identity[k] != v]
        if conflicts:
            raise RunConflictError(
                f"{str(self.path)!r} holds a {KIND_NAMES[self.kind]} run with another config "
                f"({'; '.join(conflicts)}). Choose another out_dir, or delete {str(self.checkpoint_path)!r} "
                "to start afresh.")
        self.lineage = {**ckpt["lineage"], **self.lineage}
        self.log.repair(keep(ckpt))
        return ckpt

    def _identity_conflict(self, key: str, saved) -> str:
        if key in self.cfg.field_names():  # a checkpoint named by a field
            return (f"{key}: {getattr(self.cfg, key)!r} is not the file this run started from "
                    f"({getattr(saved, key, None)!r}): their contents differ")
        return f"{key}: the data differ from the data this run was trained on (another file, root or version)"

    def save(self, *, step: int, backbone: dict, backbones: dict, state: dict) -> Path | None:
        """Write config.json and the checkpoint (rank 0; None elsewhere)."""
        if not self.main:
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.json", self.cfg.to_json() + "\n")
        lineage = {**self.lineage, "identity": self.identity}
        return save_checkpoint(self.checkpoint_path, {"kind": self.kind, "config": self.cfg.to_dict(), "step": step,
                                                      "backbone": backbone, "backbones": backbones,
                                                      "lineage": lineage, "state": state})

    def fork(self, cfg: Config, *, step: int, folder: str | os.PathLike | None = None) -> "RunDir":
        """A new folder for this run continued under ``cfg`` from ``step`` (default: ``<folder>-fork<N>``,
        the first free N), whose lineage names this folder, the step and the changed fields."""
        changed = config_conflicts(self.cfg.identity(), cfg.identity(), frozenset())
        if folder is None:
            n = 1
            while Path(f"{self.path}-fork{n}").exists():
                n += 1
            folder = f"{self.path}-fork{n}"
        cfg = cfg.replace(out_dir=str(folder)) if "out_dir" in cfg.field_names() else cfg
        parent = {"dir": str(self.path), STEP_UNITS[self.kind]: step, "changed": changed}
        return RunDir(folder, self.kind, cfg, identity=self.identity, lineage={**self.lineage, "parent": parent})


def progress_bar(enabled: bool, *, total: int, initial: int, desc: str, unit: str):
    """A tqdm bar (the notebook flavour in Jupyter), or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit)
