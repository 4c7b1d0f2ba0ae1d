"""distill.teacher_attn_dtype: the teacher's captured attention outputs kept in bf16; the
attention timer off for compiled models."""

from __future__ import annotations

import math

import pytest
import torch

from stafinetune.config import DistillConfig
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.profiling import AttentionTimer
from stafinetune.training.distill import DistillStep

CPU = torch.device("cpu")


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(1, 16, 5, 16, 16, generator=g),
        "text": torch.randn(1, 16, 32, generator=g),
        "text_mask": torch.arange(16)[None, :] < 9,
        "pooled_text": torch.randn(1, 32, generator=g),
    }


@pytest.mark.parametrize("name,dtype", [("auto", torch.float32), ("bf16", torch.bfloat16)])
def test_teacher_attention_outputs_in_the_chosen_dtype(name, dtype):
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(flavor="hunyuan_tiny"), AttentionConfig(mode="full"))
    student = build_model(
        ModelConfig(flavor="hunyuan_tiny"), AttentionConfig(window=[3, 1, 3], backend="reference")
    )
    cfg = DistillConfig(w_data=0.0, w_out=1.0, w_attn=1.0, teacher_attn_dtype=name)
    step = DistillStep(cfg, teacher, CPU, bf16=False, teacher_bf16=False)
    batch = _batch()
    sigma = torch.tensor([0.5])
    x_t = batch["latents"]
    _, attn = step.teacher_forward(batch, x_t, sigma, capture=True)
    assert sorted(attn) == list(range(student.num_layers))
    assert all(a.dtype == dtype and not a.requires_grad for a in attn.values())
    terms = step.losses(student, student, batch, torch.randn_like(x_t), sigma)
    terms["total"].backward()
    assert math.isfinite(float(terms["attn"])) and float(terms["attn"]) > 0


def test_teacher_attn_dtype_is_validated():
    with pytest.raises(ValueError, match="distill.teacher_attn_dtype must be auto or bf16"):
        DistillConfig(teacher_attn_dtype="fp16")


def test_disabled_attention_timer_attaches_nothing():
    module = torch.nn.Identity()
    timer = AttentionTimer([module], CPU, enabled=False)
    timer.start()
    assert not module._forward_hooks and not module._forward_pre_hooks
    assert math.isnan(timer.stop())
