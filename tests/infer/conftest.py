import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on 2 shared cores: OpenMP's spinning worker threads make them ~100x slower
    when the cores are busy; one thread is fast and deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def exact_matmuls():
    """float32 matmuls without TF32, so eager and compiled/fused generations compare to 1e-4."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
