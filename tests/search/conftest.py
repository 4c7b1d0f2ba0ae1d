"""Fixtures of the window-search tests (this folder's helpers live in ``search_testing``)."""

from __future__ import annotations

import pytest
import torch
from search_testing import build_tiny, calibration

from stafinetune.search import CandidateErrors, SearchConfig, evaluate_candidates


@pytest.fixture(scope="session")
def wan_errors() -> CandidateErrors:
    """Errors of a short search (3 steps, 3 samples in 2 batches) on a random tiny Wan."""
    dit = build_tiny("wan_tiny")
    return evaluate_candidates(
        dit, calibration("wan_tiny", sizes=(2, 1)), SearchConfig(steps=3), progress=False
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
