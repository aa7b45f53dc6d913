"""The job graph and the sequential executor (bissl_kit.engine)."""

import sys

import pytest
import torch

from bissl_kit.config import ConfigError
from bissl_kit.engine import Job, Ref, Resources, run_jobs, topological_order


def add(a, b):
    return a + b


def threads():
    return torch.get_num_threads()


def collect(items):
    return sorted(items)


def test_refs_are_replaced_by_results_and_order_follows_dependencies():
    jobs = [Job("c", add, {"a": Ref("a"), "b": Ref("b")}), Job("a", add, {"a": 1, "b": 2}),
            Job("b", add, {"a": Ref("a"), "b": 10}),
            Job("d", collect, {"items": [Ref("c"), Ref("a")]})]
    assert [j.key for j in topological_order(jobs)] == ["a", "b", "c", "d"]
    out = run_jobs(jobs, progress=False)
    assert out == {"a": 3, "b": 13, "c": 16, "d": [3, 16]}


def test_graph_errors_name_the_problem():
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        topological_order([Job("a", add, {"a": Ref("b"), "b": 0}), Job("b", add, {"a": Ref("a"), "b": 0})])
    with pytest.raises(ValueError, match="'zz', which is not in the graph"):
        topological_order([Job("a", add, {"a": Ref("zz"), "b": 0})])
    with pytest.raises(ValueError, match="two jobs have the key 'a'"):
        topological_order([Job("a", add), Job("a", add)])
    with pytest.raises(ConfigError, match="executor='nope'"):
        run_jobs([], executor="nope")
    with pytest.raises(ConfigError, match="cpus"):
        Resources(cpus=0)


def test_every_job_runs_with_exactly_its_threads():
    before = torch.get_num_threads()
    out = run_jobs([Job("one", threads, resources=Resources(cpus=1)), Job("two", threads, resources=Resources(cpus=2))],
                   progress=False)
    assert out == {"one": 1, "two": 2}
    assert torch.get_num_threads() == before


def test_the_ray_executor_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when the package is not installed
    with pytest.raises(ImportError, match=r"pip install 'bissl_kit\[ray\]'"):
        run_jobs([Job("a", add, {"a": 1, "b": 2})], executor="ray", progress=False)
