"""Shared fixtures of the trainer tests: one tiny synthetic data set per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from stafinetune.config import JobConfig, compose_job_config
from stafinetune.data import prepare_data


def _compose(data_root: Path, *overrides: str) -> JobConfig:
    return compose_job_config(
        [
            f"data.root={data_root}",
            "data.num_clips=16",
            "data.num_workers=0",
            "data.decode_workers=0",  # no forked decoders: the test process may hold threads
            "logging=none",
            "logging.progress=false",
            "train.device=cpu",
            "train.log_every=1",
            "train.val_every=0",
            "train.sample_steps=0",
            "train.export=false",
            "train.warmup_steps=2",
            *overrides,
        ]
    )


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the 16 synthetic clips and their latent cache live, already encoded (so no
    Trainer in a test pays for, or draws random numbers for, the encoding)."""
    root = tmp_path_factory.mktemp("tiny_data")
    prepare_data(_compose(root).data, verbose=False)
    return root


@pytest.fixture(scope="session")
def tiny_job(tiny_data_root: Path) -> Callable[..., JobConfig]:
    """``tiny_job(*overrides)``: a CPU job on the tiny data that logs every step to
    metrics.jsonl and writes no videos, no wandb run and no export."""
    return lambda *overrides: _compose(tiny_data_root, *overrides)


@pytest.fixture()
def base(tmp_path: Path) -> list[str]:
    """Command-line overrides of a 2-step CPU run in ``tmp_path/run`` on 8 synthetic clips
    under ``tmp_path/data``, without validation videos, tracking or progress bars."""
    return [
        f"hydra.run.dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
        "data.num_clips=8", "data.num_workers=0", "data.decode_workers=0", "train.steps=2",
        "train.val_every=0", "train.sample_steps=0", "logging=none", "logging.progress=false",
        "train.device=cpu",
    ]  # fmt: skip
