"""Parallel set-up without processes: degrees, config checks, DeepSpeed config, sp layout."""

from __future__ import annotations

import json

import pytest
import torch

from stafinetune.config import compose_job_config
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.parallel import ParallelDims, World
from stafinetune.parallel.engine import deepspeed_config
from stafinetune.parallel.sequence import SequenceParallel, apply_sequence_parallel


def _world(rank: int, size: int) -> World:
    return World(rank=rank, world_size=size, local_rank=rank, device=torch.device("cpu"))


def test_dp_and_sp_coordinates_put_sp_innermost():
    dims = [ParallelDims(_world(r, 8), sp=2) for r in range(8)]
    assert [d.dp_rank for d in dims] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [d.sp_rank for d in dims] == [0, 1] * 4
    assert {d.dp_size for d in dims} == {4}
    with pytest.raises(
        ValueError, match="parallel.sp=3 must divide the number of launched processes \\(8\\)"
    ):
        ParallelDims(_world(0, 8), sp=3)
    with pytest.raises(ValueError, match="parallel.dp_replicate=3 must divide"):
        ParallelDims(_world(0, 8), strategy="fsdp2", sp=2, dp_replicate=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel=ddp", "parallel.teacher=shard"],
            "parallel.teacher=shard needs parallel.strategy=fsdp2 or zero3",
        ),
        (["parallel.strategy=megatron"], "parallel.strategy must be one of"),
        (["parallel.sp=0"], "parallel.sp must be >= 1"),
        (["parallel=zero2", "parallel.dp_replicate=2"], "needs parallel.strategy=fsdp2"),
        (["parallel.deepspeed_config=/x.json"], "only read by parallel.strategy=zero2 or zero3"),
        (["parallel.sp=2", "distill.teacher_device=cpu"], "distill.teacher_device must be same"),
    ],
)
def test_bad_parallel_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_job_config(overrides)


def test_heads_must_divide_over_the_sp_group():
    dit = build_model(ModelConfig(flavor="wan_tiny"), AttentionConfig())  # 4 heads
    with pytest.raises(ValueError, match="parallel.sp=3 must divide the model's 4 attention heads"):
        apply_sequence_parallel(dit, SequenceParallel(group=None, size=3, rank=0))


def test_shards_cover_the_sequence_with_padding_at_the_end():
    x = torch.arange(2 * 7 * 3).reshape(2, 7, 3)
    shards = [SequenceParallel(None, 3, r).split(x, 1) for r in range(3)]
    assert all(s.shape == (2, 3, 3) for s in shards)
    whole = torch.cat(shards, dim=1)
    assert torch.equal(whole[:, :7], x) and not whole[:, 7:].any()


def test_deepspeed_config_comes_from_the_train_fields(tmp_path):
    cfg = deepspeed_config(stage=3, batch_size=2, grad_accum=4, grad_clip=1.0, bf16=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"] == {"enabled": True}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))
    cfg = deepspeed_config(stage=3, batch_size=2, grad_accum=1, grad_clip=0.5, bf16=False,
                           user_file=str(user))  # fmt: skip
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(
        ValueError, match="gradient_accumulation_steps=8 but the train config gives 1"
    ):
        deepspeed_config(stage=2, batch_size=2, grad_accum=1, grad_clip=0.5, bf16=False,
                         user_file=str(user))  # fmt: skip
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(
        ValueError, match="zero_optimization.stage=2 but parallel.strategy asks for stage 3"
    ):
        deepspeed_config(stage=3, batch_size=2, grad_accum=1, grad_clip=0.5, bf16=False,
                         user_file=str(user))  # fmt: skip
