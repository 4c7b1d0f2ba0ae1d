"""The few-step method (distill=dmd2) under every parallel mode against one process / DDP.

The student's rollouts, the teacher's guided predictions and the critic's updates all run
through the parallel wrappers; a wrong split or reduction shows in the logged losses, the
student's and the critic's gradient norms and the exported weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from parallel_testing import assert_close, run_training
from safetensors.torch import load_file

# one step with one critic update: every model call of the method runs under the wrapper
DMD2 = ("distill=dmd2", "attention.dense_first_steps=0", "distill.fewstep.critic_ratio=1",
        "train.steps=1", "train.export=true", "train.sample_steps=0", "train.val_every=0")  # fmt: skip


def _series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


def _export(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))


def _assert_same_run(rows: list[dict], ref: list[dict], a: Path, b: Path) -> None:
    for key in ("loss/dmd", "loss/critic", "grad_norm", "critic_grad_norm"):
        assert_close(_series(rows, key), _series(ref, key), 2e-3)
    ea, eb = _export(a), _export(b)
    assert max(float((ea[k] - eb[k]).abs().max()) for k in ea) < 1e-5


def test_dmd2_under_sequence_parallelism_matches_one_process(tmp_path, data_root, extensions_dir):
    one = run_training(tmp_path / "one", data_root, extensions_dir, *DMD2)
    sp2 = run_training(tmp_path / "sp2", data_root, extensions_dir, *DMD2, "parallel.sp=2",
                       nproc=2)  # fmt: skip
    _assert_same_run(sp2, one, tmp_path / "sp2", tmp_path / "one")


@pytest.fixture(scope="module")
def dmd2_ddp_run(tmp_path_factory, data_root, extensions_dir) -> Path:
    run = tmp_path_factory.mktemp("dmd2_ddp")
    run_training(run, data_root, extensions_dir, *DMD2, "parallel=ddp", nproc=2)
    return run


@pytest.mark.parametrize(
    "overrides",
    [("parallel=fsdp2",), ("parallel=zero3", "parallel.teacher=shard")],
    ids=["fsdp2", "zero3-sharded-teacher"],
)
def test_dmd2_sharded_matches_ddp(overrides, dmd2_ddp_run, tmp_path, data_root, extensions_dir):
    rows = run_training(tmp_path / "run", data_root, extensions_dir, *DMD2, *overrides, nproc=2)
    ref = [json.loads(line) for line in (dmd2_ddp_run / "metrics.jsonl").read_text().splitlines()]
    _assert_same_run(rows, ref, tmp_path / "run", dmd2_ddp_run)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    critic = [p.name for p in ckpt.iterdir() if p.name.startswith("critic")]
    assert critic, "the critic is not in the checkpoint"
