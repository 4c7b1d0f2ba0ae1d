"""benchmarks/memory_plan.py's FP8 lever: the bytes per teacher weight it plans for are those
an FP8 teacher (``train.frozen_weights=fp8``) holds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.dit import cast_like_diffusers
from stafinetune.models.fp8 import apply_fp8_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import memory_plan  # noqa: E402


@pytest.mark.parametrize("flavor", ["wan_tiny", "hunyuan_tiny"])
def test_planned_fp8_teacher_bytes_are_what_the_teacher_holds(flavor):
    teacher = build_model(ModelConfig(flavor=flavor), AttentionConfig(mode="full"), device="cpu")
    cast_like_diffusers(teacher.transformer, torch.bfloat16)
    teacher.to(torch.bfloat16).requires_grad_(False)  # bf16 throughout, as the plan counts
    weights = sum(p.numel() for p in teacher.parameters())
    apply_fp8_weights(teacher)
    held = sum(p.numel() * p.element_size() for p in teacher.parameters())
    planned = memory_plan.fp8_teacher_bytes_per_param(flavor)
    assert planned == pytest.approx(held / weights, rel=1e-12) and 1 < planned < 2
    shape = memory_plan.model_shape(flavor, flavor, (5, 8, 8), 16)
    bf16 = memory_plan.estimate(shape, strategy="ddp", sp=1, gpus=1)
    fp8 = memory_plan.estimate(shape, strategy="ddp", sp=1, gpus=1, teacher_bytes_per_param=planned)
    assert fp8["teacher"] == pytest.approx(bf16["teacher"] * planned / 2)
