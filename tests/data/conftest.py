"""Shared fixtures of the data-pipeline tests: a small synthetic set prepared once per session."""

from __future__ import annotations

import pytest

from stafinetune.data import DataConfig, prepare_data


def small_config(root, **overrides) -> DataConfig:
    """The embedded default at a test size (12 clips, 3 shards) under ``root``."""
    values = dict(root=str(root), num_clips=12, shard_size=5, num_workers=0, encode_batch_size=4)
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data_root")


@pytest.fixture(scope="session")
def prepared(synthetic_root):
    """(cfg, cache_dir) of a finished small synthetic cache."""
    cfg = small_config(synthetic_root)
    return cfg, prepare_data(cfg, verbose=False)
