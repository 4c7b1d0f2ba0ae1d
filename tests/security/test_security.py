"""Nothing read from a user path runs code: checkpoints, sharded checkpoints, model folders,
mask strategies; and credentials never reach the saved config, logs or metrics."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stafinetune.config import asset_path, compose_job_config
from stafinetune.models import (
    AttentionConfig,
    MaskStrategy,
    ModelConfig,
    StrategyError,
    build_model,
)
from stafinetune.training import checkpoint as ckpt
from stafinetune.training import resume
from stafinetune.training.trainer import Trainer


class _Payload:
    """Unpickling this creates ``marker``: what a crafted file would do instead of touch()."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("security-data")


def _job(data_root: Path, *overrides: str):
    return compose_job_config([
        f"data.root={data_root}", "data.num_clips=16", "data.num_workers=0", "logging=none",
        "logging.progress=false", "train.device=cpu", "train.steps=2", "train.val_every=0",
        "train.sample_steps=0", "train.export=false", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("name", "message"),
    [
        # a legacy pickle in a checkpoint is refused by name, never loaded
        ("trainer.pt", r"trainer\.pt.*never unpickles"),
        # the JSON + safetensors state files cannot carry code: a pickle in their place is
        # rejected as what it is (not JSON)
        ("rank_00000.json", "rank_00000.json is not valid JSON"),
    ],
    ids=["pickled-trainer-state", "tampered-json-state"],
)
def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_run(
    name, message, data_root, tmp_path
):
    run = tmp_path / "run"
    Trainer(_job(data_root, "train.steps=1"), run).fit()
    path = ckpt.latest_checkpoint(run / "checkpoints")
    marker = tmp_path / "pwned"
    _malicious_pickle(path / name, marker)
    with pytest.raises(ValueError, match=message):
        Trainer(_job(data_root), run)
    assert not marker.exists()


def test_sharded_checkpoint_metadata_and_bytes_are_loaded_without_running_code(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    marker = tmp_path / "pwned"
    _malicious_pickle(folder / ".metadata", marker)
    with pytest.raises(pickle.UnpicklingError, match="pathlib.Path.touch"):
        ckpt._safe_dcp_reader(folder).read_metadata()
    buffer = io.BytesIO(pickle.dumps(_Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        ckpt._safe_dcp_planner().load_bytes(None, buffer)
    assert not marker.exists()


def test_deepspeed_checkpoints_from_elsewhere_need_consent(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "colleague" / "step_00000010"
    elsewhere.mkdir(parents=True)
    with pytest.raises(ValueError, match="train.trust_checkpoint=true"):
        resume.check_trusted(elsewhere, run, pickles=True, trust=False)
    resume.check_trusted(elsewhere, run, pickles=True, trust=True)
    resume.check_trusted(run / "checkpoints" / "step_00000010", run, pickles=True, trust=False)
    resume.check_trusted(elsewhere, run, pickles=False, trust=False)  # our own format: safe


def test_pickle_model_weights_need_consent(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(Path(asset_path("wan_tiny_teacher")) / "config.json", folder / "config.json")
    marker = tmp_path / "pwned"
    torch.save({"weights": _Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="model.allow_pickle_weights=true"):
        build_model(ModelConfig(path=str(folder)), AttentionConfig())
    assert not marker.exists()


def test_a_mask_strategy_is_json_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mask_strategy.json"
    _malicious_pickle(path, marker)
    with pytest.raises(StrategyError, match="not valid JSON"):
        MaskStrategy.load(path)
    assert not marker.exists()


def test_credentials_never_reach_the_run_directory(data_root, tmp_path):
    secret = "wandbkey-0123456789abcdef0123456789abcdef01234567"
    env = {**os.environ, "WANDB_API_KEY": secret, "OMP_NUM_THREADS": "1",
           "HF_TOKEN": "hf_" + secret[:30]}  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "stafinetune.commands.train", f"hydra.run.dir={run}",
         f"data.root={data_root}", "data.num_clips=16", "data.num_workers=0", "train.device=cpu",
         "train.steps=2", "train.val_every=0", "train.sample_steps=0", "logging.mode=offline"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*"))  # wandb ran, with the key in its env
    for text in (proc.stdout, proc.stderr):
        assert secret not in text and secret[:30] not in text
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and secret[:30].encode() not in data, path
