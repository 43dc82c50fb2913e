from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one thread avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
