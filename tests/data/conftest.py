"""Shared fixtures of the data-pipeline tests: a small synthetic set prepared once per session."""

from __future__ import annotations

import pytest
from data_media import small_config

from stafinetune.data import prepare_data


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data_root")


@pytest.fixture(scope="session")
def prepared(synthetic_root):
    """(cfg, cache_dir) of a finished small synthetic cache."""
    cfg = small_config(synthetic_root)
    return cfg, prepare_data(cfg, verbose=False)
