"""Fixtures of the sampling and evaluation tests (helpers live in ``eval_testing``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models run fastest so, and a CPU shared with other jobs
    makes two spinning OpenMP threads many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
