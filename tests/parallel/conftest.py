"""Fixtures of the parallel tests: a small data root and a cache for DeepSpeed's JIT op."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parallel-data")


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSpeed JIT-builds one CPU op on first use: build it once per test session."""
    return tmp_path_factory.mktemp("torch-extensions")
