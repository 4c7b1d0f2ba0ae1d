"""Under LoRA the teacher is the student's own base model with the adapter off, not a copy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stafinetune.build import build_teacher
from stafinetune.training.distill import CastingStore, model_inputs
from stafinetune.training.lora import BaseModelTeacher
from stafinetune.training.trainer import Trainer


def _outputs(teacher, batch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    x = batch["latents"] + batch["noise"]
    inputs = model_inputs(batch, x, batch["sigma"], torch.device("cpu"))
    store = CastingStore(None, None)
    with torch.no_grad(), teacher.capture(store=store):
        out = teacher(**inputs)
    return out, dict(store.layers)


@pytest.mark.parametrize("method", ["sta", "dmd2"])
def test_the_lora_teacher_is_the_base_model(tiny_job, tmp_path, method):
    overrides = ["train.trainable=lora", "train.steps=1", "train.lr=1e-2", "train.warmup_steps=0"]
    if method == "dmd2":
        overrides += ["distill=dmd2", "attention.dense_first_steps=0",
                      "distill.fewstep.critic_ratio=1"]  # fmt: skip
    job = tiny_job(*overrides)
    trainer = Trainer(job, tmp_path)
    assert isinstance(trainer.teacher, BaseModelTeacher)
    teacher_params = sum(p.numel() for p in trainer.teacher.parameters())
    assert teacher_params == sum(p.numel() for p in trainer.student.parameters())  # no copy
    separate = build_teacher(dataclasses.replace(job, train=dataclasses.replace(
        job.train, trainable="all")), torch.device("cpu"))  # fmt: skip
    batch = trainer.data.val_batches[0]
    trainer.fit()  # one step: the adapter is no longer zero
    adapter = [p for n, p in trainer.student.named_parameters() if "lora_B" in n]
    assert adapter and any(bool(p.detach().abs().sum() > 0) for p in adapter)
    shared, shared_attn = _outputs(trainer.teacher, batch)
    copy, copy_attn = _outputs(separate, batch)
    torch.testing.assert_close(shared, copy, rtol=1e-5, atol=1e-6)
    assert shared_attn.keys() == copy_attn.keys() and shared_attn
    for layer in shared_attn:
        torch.testing.assert_close(shared_attn[layer], copy_attn[layer], rtol=1e-5, atol=1e-6)
    # the student itself still runs its adapter and its sparse windows
    x = batch["latents"] + batch["noise"]
    with torch.no_grad():
        student = trainer.student(**model_inputs(batch, x, batch["sigma"], torch.device("cpu")))
    assert not torch.allclose(student, shared, atol=1e-4)
