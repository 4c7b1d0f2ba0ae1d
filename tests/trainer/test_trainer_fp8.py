"""``train.frozen_weights=fp8`` / ``bf16``: the separate teacher and a LoRA base stored in
FP8 or bf16, a distillation run with it, exact resume and the merged export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stafinetune.build import build_teacher
from stafinetune.config import compose_job_config
from stafinetune.models.bf16 import Bf16Linear
from stafinetune.models.fp8 import Fp8Linear
from stafinetune.training.distill import model_inputs
from stafinetune.training.lora import BaseModelTeacher
from stafinetune.training.trainer import Trainer


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.frozen_weights=fp4"], "train.frozen_weights must be one of none, bf16, fp8"),
        (["distill=none"], "train.frozen_weights=fp8 stores the frozen teacher and a LoRA base"),
        (["parallel=zero2"], "train.frozen_weights=fp8 needs parallel.strategy=ddp or fsdp2"),
        (["train.frozen_weights=bf16", "distill=none"], "train.frozen_weights=bf16 stores the"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_job_config(["train.frozen_weights=fp8", *overrides])


STORED = {"fp8": Fp8Linear, "bf16": Bf16Linear}


def _stored_layers(model: torch.nn.Module, kind: str = "fp8") -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, STORED[kind])]


def test_distillation_with_an_fp8_teacher(tiny_job, tmp_path):
    trainer = Trainer(tiny_job("train.frozen_weights=fp8", "train.steps=1"), tmp_path)
    assert _stored_layers(trainer.teacher) and not _stored_layers(trainer.student)  # full finetune
    full = build_teacher(tiny_job("train.steps=1"), trainer.device)
    batch = trainer.data.val_batches[0]
    inputs = model_inputs(batch, batch["latents"] + batch["noise"], batch["sigma"], trainer.device)
    with torch.no_grad():
        fp8, want = trainer.teacher(**inputs), full(**inputs)
    gap = float((fp8 - want).norm() / want.norm())
    assert 0 < gap < 0.05  # quantised, and close to the full-precision teacher
    result = trainer.fit()
    assert result.step == 1 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_lora_with_a_stored_base_resumes_exactly_and_exports_the_merge_it_trained(
    kind, tiny_job, tmp_path
):
    overrides = ("train.trainable=lora", "train.lora_rank=4", f"train.frozen_weights={kind}",
                 "train.steps=2", "train.ckpt_every=0", "train.lr=1e-2", "train.lora_dropout=0.1")  # fmt: skip
    straight = Trainer(tiny_job(*overrides, "train.export=true", "train.lora_merge_export=true"),
                       tmp_path / "straight")  # fmt: skip
    assert isinstance(straight.teacher, BaseModelTeacher)  # the stored base is also the teacher
    stored = _stored_layers(straight.student, kind)
    assert stored and all(n.endswith("base_layer") or ".attn1." not in n for n in stored)
    done = straight.fit()
    first = Trainer(tiny_job(*overrides), tmp_path / "resumed").fit(until_step=1)
    second = Trainer(tiny_job(*overrides), tmp_path / "resumed").fit()
    assert first.step == 1 and second.step == 2 and second.losses == done.losses[1:]
    a, b = (load_file(str(r.last_checkpoint / "adapter.safetensors")) for r in (done, second))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert not any("weight_fp8" in k or "base_layer" in k for k in a)  # the base is not saved
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the merged export: the base as trained plus the adapter, as a plain diffusers model
    from diffusers import WanTransformer3DModel

    merged = WanTransformer3DModel.from_pretrained(done.export_dir / "transformer").eval()
    batch = straight.data.val_batches[0]
    inputs = model_inputs(batch, batch["latents"] + batch["noise"], batch["sigma"], straight.device)
    text = inputs["text"] * inputs["text_mask"][..., None]  # as the Wan pipeline pads
    with torch.no_grad(), straight.student.binding.dense():  # diffusers' own dense attention
        want = straight.student.eval()(**inputs)
        got = merged(inputs["latents"], inputs["timestep"], text, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 rounding of the merge
