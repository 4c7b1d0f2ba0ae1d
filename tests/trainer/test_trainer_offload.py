"""The ``offload`` levers in a real run: each leaves a distillation step's losses and
gradients exactly as they are without it, while tensors and weights really go through host
memory; a run with them resumes exactly; bad combinations fail at start-up naming the fields."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stafinetune.config import JobConfig, compose_job_config
from stafinetune.training.trainer import Trainer

CHECKPOINTED = ["model.gradient_checkpointing=true", "train.batch_size=1"]
LEVERS = ["offload.activations=true", "offload.teacher_attention=true", "offload.block_swap=1"]


def _step(trainer: Trainer) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The losses and gradients of one distillation step on a fixed batch."""
    batch = trainer.data.val_batches[0]
    generator = torch.Generator().manual_seed(3)
    sums, _, _ = trainer.distill.forward_backward(trainer.engine, lambda: batch, generator, 1)
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    return sums, grads


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_levers_leave_the_step_unchanged(tiny_job: Callable[..., JobConfig], tmp_path: Path,
                                         trainable: str):  # fmt: skip
    """``all``: a separate dense teacher, block-swapped; ``lora``: the teacher is the student's
    own base, whose frozen weights are swapped under the trained adapter (the checkpointed
    recomputation swaps them in again in backward)."""
    common = [*CHECKPOINTED, f"train.trainable={trainable}"]
    off = Trainer(tiny_job(*common), tmp_path / "off")
    on = Trainer(tiny_job(*common, *LEVERS), tmp_path / "on")
    (sums_off, grads_off), (sums_on, grads_on) = _step(off), _step(on)
    assert sums_on == sums_off and sums_on["attn"] > 0
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name, grad in grads_off.items():
        assert torch.equal(grads_on[name], grad), name
    assert "offload activations, teacher attention, block swap (resident blocks: 1)" in (
        on.describe()
    )
    stats = on.offloader.stats
    layers, blocks = on.student.num_layers, 4  # wan_tiny_teacher: 4 blocks
    # each block's input, and each of the teacher's attention outputs, went out and came back
    assert stats.offloaded >= blocks + layers and stats.prefetched > 0
    assert stats.fetched >= stats.offloaded + layers  # the targets: in the loss and its backward
    swapped = on.student if trainable == "lora" else on.teacher
    swap = swapped.block_swap
    assert swap.stats.loads >= blocks - 1 and swap.stats.prefetched > 0
    if trainable == "lora":  # swapped in for the teacher's forward, the student's and its backward
        assert swap.stats.loads == 3 * (blocks - 1)
    on_host = [p for p in swap.blocks[-1].parameters() if not p.requires_grad]
    assert on_host and all(p.device.type == "cpu" for p in on_host)


def test_a_run_with_the_levers_resumes_exactly(tiny_job: Callable[..., JobConfig],
                                               tmp_path: Path):  # fmt: skip
    def job() -> JobConfig:
        return tiny_job(*CHECKPOINTED, *LEVERS, "train.trainable=lora", "train.steps=2",
                        "train.ckpt_every=1", "train.warmup_steps=0")  # fmt: skip

    straight = Trainer(job(), tmp_path / "straight")
    losses = straight.fit().losses
    Trainer(job(), tmp_path / "resumed").fit(until_step=1)
    second = Trainer(job(), tmp_path / "resumed")
    assert second.step == 1
    assert second.fit().losses == losses[1:]
    expected = {n: p for n, p in straight.student.named_parameters() if p.requires_grad}
    final = {n: p for n, p in second.student.named_parameters() if p.requires_grad}
    assert final.keys() == expected.keys() and final
    for name, param in expected.items():
        assert torch.equal(final[name], param), name


@pytest.fixture(scope="module")
def composed() -> JobConfig:
    """The default job, composed once; cases replace its groups (validation runs again)."""
    return compose_job_config()


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"offload": {"activations": True}}, "needs model.gradient_checkpointing=true"),
        ({"model": {"gradient_checkpointing": True, "compile": True},
          "offload": {"activations": True}}, "set model.compile=false"),
        ({"offload": {"teacher_attention": True}, "distill": {"w_attn": 0.0}}, "distill.w_attn=0"),
        ({"offload": {"block_swap": -1}}, "offload.block_swap must be null"),
        ({"offload": {"block_swap": 2}, "distill": {"w_attn": 0.0, "w_out": 0.0, "w_data": 1.0}},
         "no teacher"),
        ({"offload": {"block_swap": 2},
          "parallel": {"strategy": "fsdp2", "teacher": "shard"}}, "parallel.teacher=shard"),
        ({"offload": {"block_swap": 2}, "distill": {"teacher_device": "cpu"}},
         "distill.teacher_device=cpu"),
        ({"offload": {"block_swap": 2}, "train": {"trainable": "lora"},
          "model": {"gradient_checkpointing": True}, "parallel": {"strategy": "zero2"}},
         "parallel.strategy=zero2"),
        ({"offload": {"block_swap": 2}, "train": {"trainable": "lora"}},
         "needs model.gradient_checkpointing=true"),
    ],
)  # fmt: skip
def test_bad_combinations_fail_at_start_up(composed: JobConfig, groups: dict, message: str):
    changed = {
        name: dataclasses.replace(getattr(composed, name), **fields)
        for name, fields in groups.items()
        if name != "offload"
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        offload = dataclasses.replace(composed.offload, **groups.get("offload", {}))
        dataclasses.replace(composed, offload=offload, **changed)


def test_the_single_gpu_option_composes():
    job = compose_job_config(["offload=single_gpu", "train.trainable=lora", *CHECKPOINTED])
    assert job.offload.activations and job.offload.teacher_attention
    assert job.offload.block_swap == 4


def test_block_swap_beyond_the_model_is_a_user_error(tiny_job: Callable[..., JobConfig],
                                                     tmp_path: Path):  # fmt: skip
    from stafinetune.errors import UserError

    with pytest.raises(UserError, match="offload.block_swap=4 must lie in"):
        Trainer(tiny_job("offload.block_swap=4"), tmp_path)
