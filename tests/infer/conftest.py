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
