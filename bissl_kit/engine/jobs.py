"""Jobs, their dependency graph, and the sequential executor (see :mod:`bissl_kit.engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import ConfigError
from ..rundir import progress_bar


@dataclass(frozen=True)
class Resources:
    """What one job needs: ``cpus`` torch threads (and Ray CPUs), ``gpus`` of a GPU (a fraction packs
    several runs on one card)."""

    cpus: int = 1
    gpus: float = 0.0

    def __post_init__(self):
        if not isinstance(self.cpus, int) or self.cpus < 1:
            raise ConfigError(f"Resources.cpus={self.cpus!r} must be an int >= 1")
        if not 0 <= self.gpus:
            raise ConfigError(f"Resources.gpus={self.gpus!r} must be >= 0")


@dataclass(frozen=True)
class Ref:
    """A placeholder in a job's kwargs for the result of the job ``key``; it makes that job a dependency."""

    key: str


@dataclass
class Job:
    """One independent run. ``fn`` must be a module-level function (workers import it by name) and
    ``kwargs`` picklable; any :class:`Ref` inside them (at any depth of dicts, lists and tuples) is
    replaced by that job's result before ``fn`` is called."""

    key: str
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()  # dependencies beyond the Refs in kwargs
    resources: Resources = field(default_factory=Resources)
    label: str = ""  # what the progress bar shows while it runs

    def all_deps(self) -> tuple[str, ...]:
        found: list[str] = list(self.deps)
        _collect_refs(self.kwargs, found)
        return tuple(dict.fromkeys(found))


def _collect_refs(obj, out: list[str]) -> None:
    if isinstance(obj, Ref):
        out.append(obj.key)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_refs(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_refs(v, out)


def resolve(obj, results: dict[str, Any]):
    """``obj`` with every :class:`Ref` replaced by its job's result."""
    if isinstance(obj, Ref):
        return results[obj.key]
    if isinstance(obj, dict):
        return {k: resolve(v, results) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, results) for v in obj]
    if isinstance(obj, tuple):
        return tuple(resolve(v, results) for v in obj)
    return obj


def topological_order(jobs: list[Job]) -> list[Job]:
    """The jobs with every dependency before its dependants, otherwise in the order given; an error names a
    duplicate key, an unknown dependency or a cycle."""
    by_key: dict[str, Job] = {}
    for job in jobs:
        if job.key in by_key:
            raise ValueError(f"two jobs have the key {job.key!r}")
        by_key[job.key] = job
    for job in jobs:
        missing = [d for d in job.all_deps() if d not in by_key]
        if missing:
            raise ValueError(f"job {job.key!r} depends on {', '.join(map(repr, missing))}, which is not in the graph")
    order: list[Job] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = placed

    def visit(job: Job, path: list[str]) -> None:
        s = state.get(job.key)
        if s == 2:
            return
        if s == 1:
            cycle = path[path.index(job.key):] + [job.key]
            raise ValueError(f"the jobs form a cycle: {' -> '.join(cycle)}")
        state[job.key] = 1
        for d in job.all_deps():
            visit(by_key[d], path + [job.key])
        state[job.key] = 2
        order.append(job)

    for job in jobs:
        visit(job, [])
    return order


class JobFailedError(RuntimeError):
    """A job of the graph raised an exception in another process (the Ray executor): its key, the original
    exception's type and message, and the traceback where it ran. The sequential executor lets the job's
    own exception through, with its traceback, for debugging."""

    def __init__(self, key: str, error_type: str, message: str, worker_traceback: str = ""):
        self.key, self.error_type, self.message, self.worker_traceback = key, error_type, message, worker_traceback
        super().__init__(f"job {key!r} failed: {error_type}: {message}")

    def __reduce__(self):  # pickled from the worker to the driver with its four fields
        return type(self), (self.key, self.error_type, self.message, self.worker_traceback)


def call_with_threads(fn: Callable[..., Any], kwargs: dict, threads: int):
    """``fn(**kwargs)`` with exactly ``threads`` torch threads (restored after): the same in every executor."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(**kwargs)
    finally:
        torch.set_num_threads(before)


def run_sequential(jobs: list[Job], *, progress: bool = True, desc: str = "runs", **_ignored) -> dict[str, Any]:
    """Every job in dependency order in this process; returns {key: result}."""
    order = topological_order(jobs)
    results: dict[str, Any] = {}
    bar = progress_bar(progress, total=len(order), initial=0, desc=desc, unit="run")
    try:
        for job in order:
            if bar is not None:
                bar.set_postfix_str(job.label or job.key, refresh=False)
            results[job.key] = call_with_threads(job.fn, resolve(job.kwargs, results), job.resources.cpus)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


# name -> executor(jobs, *, progress, desc, **options); the Ray executor registers itself on import
EXECUTORS: dict[str, Callable[..., dict[str, Any]]] = {"sequential": run_sequential}


def run_jobs(jobs: list[Job], *, executor: str = "sequential", progress: bool = True, desc: str = "runs",
             **options) -> dict[str, Any]:
    """Run the graph ``jobs`` with the executor named; returns {key: result}."""
    if executor == "ray" and "ray" not in EXECUTORS:
        from . import ray_executor  # noqa: F401  (registers "ray")
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r} must be one of {', '.join(map(repr, EXECUTORS))}")
    return EXECUTORS[executor](jobs, progress=progress, desc=desc, **options)
