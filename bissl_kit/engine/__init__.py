"""How the kit executes many independent runs: a graph of :class:`Job` s and an executor that runs it.

A comparison, a replicated comparison or a sweep is a set of runs (BiSSL replicates, compute-matched
continuations, search trials, seeds) with dependencies between them (a BiSSL run before its fine-tunes,
a search before the seeds at its chosen values). The experiment code states that graph as jobs; an
executor runs it:

* ``"sequential"`` (:mod:`bissl_kit.engine.jobs`): one job after another in this process, for debugging;
* ``"ray"`` (:mod:`bissl_kit.engine.ray_executor`, docs/ray.md): every job a Ray task with its resources, the
  dependencies as Ray futures; a local instance by default, a cluster with ``address=``.

Every job's result depends only on its arguments: a job runs with exactly ``resources.cpus`` torch threads
in every executor (CPU kernels reduce in an order that depends on the thread count), its randomness comes
from its own seeds, and a job killed half-way resumes from its run folder when it is run again. So the
numbers are identical whichever executor runs the graph and however many workers it has.
"""

from __future__ import annotations

from .jobs import EXECUTORS, Job, JobFailedError, Ref, Resources, run_jobs, topological_order

__all__ = ["Job", "JobFailedError", "Ref", "Resources", "run_jobs", "topological_order", "EXECUTORS"]
