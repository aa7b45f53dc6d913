import os

import pytest
import torch

# Two cores are shared by the test process and the notebook kernels it starts.
# OMP_NUM_THREADS wins (a busy shared machine runs faster on one thread); else at most 2
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_pretrain(tmp_path):
    """The smallest pre-training config that still exercises every part of the loop."""
    from bissl_kit.pretrain import PretrainConfig
    return PretrainConfig(steps=6, batch_size=16, warmup_steps=2, width=4, proj_hidden=32, proj_dim=16,
                          knn_every=3, checkpoint_every=3, progress=False, device="cpu",
                          out_dir=str(tmp_path / "pretrain"))


@pytest.fixture(autouse=True)
def _global_default_dtype_untouched():
    """A module that changes torch's default dtype at import time leaks it into every other test."""
    assert torch.get_default_dtype() == torch.float32, "a test module changed torch's default dtype globally"
    yield


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test, restored afterwards so other modules keep float32.
    Modules of exact float64 checks use it with ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny runs: on 2 shared cores a second thread only waits for a busy
    core (a 6-step run took 35 s instead of 1.3 s).  Modules use
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
