"""The Ray executor: every :class:`~bissl_kit.engine.Job` a Ray task, the graph's edges Ray futures.

``run_jobs(jobs, executor="ray", address=None, num_cpus=None, num_gpus=None, retries=2, max_running=None)``

* **Resources.** A job becomes a task with ``num_cpus=resources.cpus`` and ``num_gpus=resources.gpus``
  (a fraction packs several runs on one GPU; Ray sets ``CUDA_VISIBLE_DEVICES`` for each). Inside the
  worker it runs with exactly ``resources.cpus`` torch threads (:func:`~bissl_kit.engine.jobs.call_with_threads`),
  as in the sequential executor, so the numbers do not depend on the executor.
* **Dependencies.** Ray resolves only the top-level ``ObjectRef`` arguments of a task, so the results a job
  depends on are passed as top-level arguments and the kit's :class:`~bissl_kit.engine.Ref` s inside its
  kwargs (at any depth) are substituted in the worker.
* **Where.** ``address=None`` starts a local instance for this call and shuts it down afterwards: no setup,
  every server on the loopback interface (Ray's own local-only mode, the one it uses on macOS and
  Windows: the node's address is 127.0.0.1, so its gRPC servers bind there), no dashboard; the check
  after start refuses to run if the node came up on another address. ``address="host:port"`` (the CLI's
  ``--ray-address``) joins a running cluster, and only disconnects from it at the end. If this process
  has already called ``ray.init`` that instance is used as it is and left running. See docs/ray.md.
* **Failures.** A task whose worker process dies (killed, out of memory, a lost node) is retried up to
  ``retries`` times; the job resumes from its run folder, because jobs are idempotent (the stages resume
  from their checkpoints). A Python exception raised by a job is *not* retried: the jobs are deterministic,
  so a diverging loss or a bad value would fail the same way again. It fails the whole graph at once with
  :class:`JobFailedError`, which names the job's key and carries the original type, message and the
  worker's traceback; the jobs still pending are cancelled.
* **Progress.** One tqdm bar over the whole graph, advanced as tasks finish (``ray.wait``).
* ``max_running``: at most this many jobs submitted and unfinished at a time (None: as many as the
  resources allow). Jobs are submitted in dependency order, so a window never waits on a job outside it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
import traceback
from typing import Any

from ..config import ConfigError
from ..rundir import progress_bar
from .jobs import EXECUTORS, Job, JobFailedError, call_with_threads, resolve, topological_order


def _execute(key: str, fn, kwargs: dict, threads: int, dep_keys: tuple[str, ...], *dep_values):
    """The body of every task: the dependencies' results (resolved by Ray as top-level arguments) put in
    place of the :class:`Ref` s, then ``fn`` with exactly ``threads`` torch threads."""
    try:
        return call_with_threads(fn, resolve(kwargs, dict(zip(dep_keys, dep_values))), threads)
    except Exception as e:  # noqa: BLE001 - every app error fails the graph, named by its job (see module docstring)
        raise JobFailedError(key, type(e).__name__, str(e), traceback.format_exc()) from None


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how a dual-stack socket shows IPv4 loopback
    return (mapped or ip).is_loopback


def _worker_pythonpath() -> str:
    """The driver's import path for the local workers, so that they import what the driver imports (a
    notebook's or a test's folder, a checkout run with PYTHONPATH); the interpreter's own folders they have."""
    own = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    keep = []
    for p in sys.path:
        real = os.path.realpath(p or os.getcwd())
        if os.path.isdir(real) and not any(real == o or real.startswith(o + os.sep) for o in own) and real not in keep:
            keep.append(real)
    return os.pathsep.join(keep)


@contextlib.contextmanager
def _loopback_node():
    """Ray's local-only mode while ``ray.init`` runs: with clusters "disabled" (what Ray does on macOS and
    Windows) this process's node address is the loopback one, so a node it starts binds its gRPC servers
    there (on Linux a plain ray.init advertises and binds the machine's network address), and a driver
    joining a cluster on 127.0.0.1 looks for its raylet there."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start_local(*, num_cpus: int | None = None, num_gpus: float | None = None, quiet: bool = True) -> None:
    """Start the local Ray instance the kit uses: every server on 127.0.0.1, no dashboard, the driver's
    import path for the workers. Raises RuntimeError (after shutting it down) if the node came up on a
    non-loopback address."""
    import logging

    import ray

    before = os.environ.get("PYTHONPATH")
    # the workers inherit the raylet's environment, which it takes from this process as it starts (a
    # runtime_env would do the same through Ray's runtime-env agent, and cost the first tasks seconds)
    os.environ["PYTHONPATH"] = _worker_pythonpath()
    try:
        with _loopback_node():
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     dashboard_host="127.0.0.1", logging_level=logging.WARNING if quiet else logging.INFO)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    node_ip = ray.util.get_node_ip_address()
    if not _is_loopback(node_ip):
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance came up on {node_ip}, not on the loopback interface; the kit "
                           "does not run a local instance reachable from the network (see docs/ray.md)")


def _connect(address: str | None, num_cpus, num_gpus) -> bool:
    """Make sure Ray is initialised; True when this call did it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        start_local(num_cpus=num_cpus, num_gpus=num_gpus)
        return True
    if num_cpus is not None or num_gpus is not None:
        raise ConfigError("num_cpus/num_gpus size a local Ray instance; a cluster at address= has its own "
                          "(set them with `ray start --num-cpus/--num-gpus` on each node)")
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    with _loopback_node() if _is_loopback(host) else contextlib.nullcontext():
        ray.init(address=address, logging_level="WARNING")
    return True


def run_ray(jobs: list[Job], *, progress: bool = True, desc: str = "runs", address: str | None = None,
            num_cpus: int | None = None, num_gpus: float | None = None, retries: int = 2,
            max_running: int | None = None) -> dict[str, Any]:
    """Run the graph ``jobs`` on Ray (module docstring); returns {key: result}."""
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"retries={retries!r} must be an int >= 0")
    if max_running is not None and (not isinstance(max_running, int) or max_running < 1):
        raise ConfigError(f"max_running={max_running!r} must be None or an int >= 1")
    order = topological_order(jobs)
    if not order:
        return {}
    try:
        import ray
    except ImportError as e:
        raise ImportError("executor='ray' needs the ray package: pip install 'bissl_kit[ray]'") from e

    started = _connect(address, num_cpus, num_gpus)
    task = ray.remote(max_retries=retries, retry_exceptions=False)(_execute)
    refs: dict[str, Any] = {}      # key -> ObjectRef of its result
    pending: dict[Any, Job] = {}   # submitted and unfinished
    results: dict[str, Any] = {}
    bar = progress_bar(progress, total=len(order), initial=0, desc=desc, unit="run")
    try:
        queue = list(order)
        while queue or pending:
            while queue and (max_running is None or len(pending) < max_running):
                job = queue.pop(0)
                dep_keys = job.all_deps()
                ref = task.options(num_cpus=job.resources.cpus, num_gpus=job.resources.gpus,
                                   name=job.label or job.key).remote(
                    job.key, job.fn, job.kwargs, job.resources.cpus, dep_keys, *(refs[d] for d in dep_keys))
                refs[job.key] = ref
                pending[ref] = job
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    results[job.key] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), JobFailedError) else None
                    if cause is None:
                        raise JobFailedError(job.key, type(e).__name__, str(e)) from None
                    raise JobFailedError(cause.key, cause.error_type, cause.message, cause.worker_traceback) from None
                except ray.exceptions.RayError as e:  # the worker died more often than ``retries`` allows, ...
                    raise JobFailedError(job.key, type(e).__name__, f"{e} (after {retries} retries)") from None
                if bar is not None:
                    bar.set_postfix_str(job.label or job.key, refresh=False)
                    bar.update(1)
    except BaseException:
        for ref in pending:  # a failed or interrupted graph stops: its other jobs resume when it is run again
            ray.cancel(ref)
        raise
    finally:
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()
    return results


EXECUTORS["ray"] = run_ray
