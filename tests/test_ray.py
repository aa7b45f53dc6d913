"""The Ray executor on real Ray: the same numbers as the sequential executor, a killed worker's job retried
and resumed from its run folder, app errors named by their job, and a local instance reachable only on
loopback with no dashboard. One local instance serves the module (a Ray start costs seconds)."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

ray = pytest.importorskip("ray")

from bissl_kit.checkpoint import load_checkpoint  # noqa: E402
from bissl_kit.engine import Job, JobFailedError, Ref, Resources, run_jobs  # noqa: E402
from bissl_kit.engine.ray_executor import _is_loopback, start_local  # noqa: E402
from bissl_kit.finetune import FinetuneConfig, finetune  # noqa: E402
from bissl_kit.pretrain import PretrainConfig, Pretrainer  # noqa: E402
from bissl_kit.rundir import MetricsLog  # noqa: E402

RAY_SERVERS = ("gcs_server", "raylet")


def tiny_pretrain_config(out_dir, **kw) -> PretrainConfig:
    base = dict(steps=4, batch_size=16, warmup_steps=1, width=4, proj_hidden=16, proj_dim=8, image_size=8, knn_every=0,
                checkpoint_every=4, progress=False, device="cpu", out_dir=str(out_dir))
    return PretrainConfig(**{**base, **kw})


# ---- job functions (module level: the workers import them by name) --------------------------------------

def pretrain_job(out_dir: str) -> str:
    tr = Pretrainer(tiny_pretrain_config(out_dir))
    for _ in tr.run():
        pass
    return str(Path(out_dir) / "checkpoint.pt")


def finetune_job(backbone_checkpoint: str, out_dir: str, seed: int, lr: float) -> dict:
    cfg = FinetuneConfig(backbone_checkpoint=backbone_checkpoint, labels_per_class=10, epochs=1, batch_size=64, lr=lr,
                         seed=seed, progress=False, device="cpu", out_dir=out_dir)
    rec = finetune(cfg)
    return {k: rec[k] for k in ("val_top1", "val_loss", "test_top1", "test_loss")}


def summary_job(runs: list) -> list:
    return [r["val_loss"] + r["test_loss"] for r in runs]


def pretrain_killed_once(out_dir: str, marker: str | None) -> int:
    """Checkpoint every step; on the first attempt (no ``marker`` file yet), SIGKILL this worker after step 3's
    record (its checkpoint at step 2 written, step 3's record past it in the log). ``marker=None``: never."""
    tr = Pretrainer(tiny_pretrain_config(out_dir, checkpoint_every=1, steps=5))
    for rec in tr.run():
        if marker and rec.get("kind") == "step" and rec["step"] == 3 and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def failing_job(attempts: str) -> None:
    with open(attempts, "a") as f:
        f.write("attempt\n")
    raise ValueError("lr=3 diverged at step 7")


def pid_and_threads() -> tuple[int, int]:
    return os.getpid(), torch.get_num_threads()


def parent_pid() -> int:
    return os.getppid()


# ---- helpers ---------------------------------------------------------------------------------------------

def ray_processes() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def graph(root: Path) -> list[Job]:
    """A tiny pre-training, three fine-tunes of its checkpoint (a Ref), and a job reading their results."""
    one = Resources(cpus=1)
    jobs = [Job("pretrain", pretrain_job, {"out_dir": str(root / "pretrain")}, resources=one)]
    for seed, lr in ((0, 0.05), (1, 0.05), (0, 0.2)):
        jobs.append(Job(f"ft_{seed}_{lr}", finetune_job, {"backbone_checkpoint": Ref("pretrain"), "seed": seed, "lr": lr,
                                                           "out_dir": str(root / f"ft_{seed}_{lr}")}, resources=one))
    jobs.append(Job("summary", summary_job, {"runs": [Ref(j.key) for j in jobs[1:]]}, resources=one))
    return jobs


def without_paths(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "pretrain"}


# ---- a local instance the kit starts for one call ----------------------------------------------------------

def test_a_killed_worker_is_retried_and_resumes_and_the_kits_own_instance_is_shut_down(tmp_path):
    # the first test, before the shared instance: this call starts a local instance of its own
    assert not ray.is_initialized()
    marker = tmp_path / "killed"
    out = run_jobs([Job("killed", pretrain_killed_once, {"out_dir": str(tmp_path / "ray"), "marker": str(marker)})],
                   executor="ray", num_cpus=1, retries=1, progress=False)
    assert not ray.is_initialized()  # the instance the call started is gone, its servers too
    assert not [p for p in ray_processes() if p.is_running() and p.name() in RAY_SERVERS]
    assert marker.exists() and int(marker.read_text()) != out["killed"]  # killed once, then run by another worker
    run_jobs([Job("ref", pretrain_killed_once, {"out_dir": str(tmp_path / "ref"), "marker": None})], progress=False)
    a, b = load_checkpoint(tmp_path / "ray" / "checkpoint.pt"), load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    for k in b["backbones"]:
        assert all(torch.equal(a["backbones"][k][n], t) for n, t in b["backbones"][k].items())

    def records(folder):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in MetricsLog(folder).records()]
    assert records(tmp_path / "ray") == records(tmp_path / "ref")  # step 3's record once, as in one run


# ---- one shared instance for the rest ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    start_local(num_cpus=2)
    yield
    ray.shutdown()


def test_the_local_instance_listens_on_loopback_only_and_has_no_dashboard(local_ray):
    listening = []
    for p in ray_processes():
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                listening.append((p.name(), c.laddr.ip, c.laddr.port))
    assert any(name in RAY_SERVERS for name, _, _ in listening)  # the servers were seen, so the check checks
    assert [s for s in listening if not _is_loopback(s[1])] == []
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    dashboard_port = 8265
    assert dashboard_port not in {port for _, _, port in listening}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", dashboard_port), timeout=2).close()
    # and on loopback no port takes a job without Ray's token (the job API is how a Ray instance is taken over)
    for _, ip, port in {s for s in listening if s[1] in ("127.0.0.1", "::ffff:127.0.0.1")}:
        for path in ("/api/job_agent/jobs/", "/api/jobs/"):
            assert submit_job_without_token(port, path) not in range(200, 300), (port, path)


def submit_job_without_token(port: int, path: str) -> int | None:
    """The HTTP status of a job submission without a token (None: the port does not speak HTTP/1)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b'{"entrypoint": "touch /tmp/pwned"}',
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError, http.client.HTTPException):
        return None


def test_numbers_equal_the_sequential_executor_with_one_and_two_workers(local_ray, tmp_path, capsys):
    pid, threads = run_jobs([Job("a", pid_and_threads, resources=Resources(cpus=2))], executor="ray", progress=False)["a"]
    assert pid != os.getpid() and threads == 2  # a worker process, with exactly the job's threads
    seq = run_jobs(graph(tmp_path / "seq"), progress=False)
    one = run_jobs(graph(tmp_path / "one"), executor="ray", max_running=1, progress=False)
    two = run_jobs(graph(tmp_path / "two"), executor="ray", desc="graph", progress=True)
    bar = capsys.readouterr().err  # one bar over the graph's five jobs
    assert "graph: 100%" in bar and "5/5" in bar
    assert without_paths(one) == without_paths(seq) and without_paths(two) == without_paths(seq)
    assert seq["ft_0_0.05"] != seq["ft_1_0.05"] != seq["ft_0_0.2"]  # the runs differ, so equality says something
    assert ray.is_initialized()  # an instance this process started itself is left running


def test_an_app_error_fails_the_graph_with_its_key_and_is_not_retried(local_ray, tmp_path):
    attempts = tmp_path / "attempts"
    jobs = [Job("boom", failing_job, {"attempts": str(attempts)}),
            Job("after", summary_job, {"runs": [Ref("boom")]})]
    with pytest.raises(JobFailedError, match=r"job 'boom' failed: ValueError: lr=3 diverged at step 7") as e:
        run_jobs(jobs, executor="ray", retries=2, progress=False)
    assert e.value.key == "boom" and "failing_job" in e.value.worker_traceback
    assert attempts.read_text().count("attempt") == 1


JOIN = """
import sys
sys.path[:0] = {path!r}
import ray
import test_ray
from bissl_kit.engine import Job, Resources, run_jobs
out = run_jobs([Job("a", test_ray.parent_pid, resources=Resources(cpus=1))], executor="ray", address={address!r},
               progress=False)
assert not ray.is_initialized()  # disconnected again
print(out["a"])
"""


def test_a_driver_given_an_address_joins_that_cluster_and_leaves_it_running(local_ray):
    address = ray.get_runtime_context().gcs_address  # the module's instance, as a cluster another process joins
    here = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    proc = subprocess.run([sys.executable, "-c", JOIN.format(path=here, address=address)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raylets = {p.pid for p in ray_processes() if p.name() == "raylet"}
    assert int(proc.stdout.split()[-1]) in raylets  # the job ran in a worker of this cluster's node
    assert run_jobs([Job("b", pid_and_threads)], executor="ray", progress=False)["b"][1] == 1  # still up
