"""benchmarks/memory_plan.py's offload levers: each takes off the GPU what its lever moves to
the host (and no more), so the planned single-GPU peak falls lever by lever."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import memory_plan as plan  # noqa: E402


@pytest.fixture
def shape() -> plan.Shape:
    """A Wan-like model of 10 blocks of 1e8 parameters plus 1e8 outside them."""
    return plan.Shape(name="ten blocks", flavor="wan2.1_t2v_14b", params=11 * 10**8,
                      block_params=10**8, layers=10, hidden=1024, ffn=4096, heads=8,
                      tokens=20_000, text=512, joint_text=False)  # fmt: skip


def test_each_lever_moves_its_share_to_the_host(shape: plan.Shape) -> None:
    off = plan.offload_estimate(shape, plan.Offload())
    assert off["host"] == 0
    gib = plan.GIB
    swap = plan.offload_estimate(shape, plan.Offload(block_swap=0))
    blocks_off = 4 * shape.block_params * (shape.layers - 2) / gib  # fp32, all but two in flight
    assert swap["base"] == pytest.approx(off["base"] - blocks_off)
    assert swap["host"] == pytest.approx(blocks_off)
    act = plan.offload_estimate(shape, plan.Offload(activations=True))
    inputs = shape.tokens * shape.hidden * 4 / gib  # one block's fp32 input
    assert act["kept_block_inputs"] == pytest.approx(2 * inputs)
    assert off["kept_block_inputs"] == pytest.approx(shape.layers * inputs)
    both = plan.offload_estimate(shape, plan.Offload(activations=True, teacher_attention=True))
    assert both["captured_attention"] == pytest.approx(
        off["captured_attention"] - (shape.layers - 2) * inputs / 2
    )
    assert off["total"] - both["total"] == pytest.approx(both["host"])


def test_the_single_gpu_plan_falls_lever_by_lever(monkeypatch: pytest.MonkeyPatch,
                                                  shape: plan.Shape) -> None:  # fmt: skip
    monkeypatch.setattr(plan, "model_shape", lambda *args, **kwargs: shape)
    rows = plan.plan_single_gpu()["rows"]
    totals = [r["total"] for r in rows[:5]]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    assert plan.markdown_single_gpu({"budget_gib": 80.0, "rows": rows}).count("\n") == 3 + len(rows)


def test_the_measured_check_puts_each_lever_on() -> None:
    """``--check-offload`` (GPU) measures steps with the levers as the trainer applies them."""
    import torch

    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    student = build_model(ModelConfig(flavor="wan_tiny"), AttentionConfig(backend="reference"))
    student.enable_gradient_checkpointing()
    teacher = build_model(ModelConfig(flavor="wan_tiny"), AttentionConfig(mode="full"))
    teacher.requires_grad_(False)
    levers = plan.Offload(activations=True, teacher_attention=True, block_swap=1)
    targets = plan.apply_offload_levers(student, teacher, levers)
    assert targets is not None and targets.device == torch.device("cpu")
    assert student.binding.offload is not None and teacher.block_swap.resident == 1
    assert plan.apply_offload_levers(student, teacher, plan.Offload(activations=True)) is None


def test_an_fp8_base_scales_what_the_base_keeps_and_swaps(shape: plan.Shape) -> None:
    """``train.frozen_weights=fp8``: the base's bytes on the GPU and on the host follow its
    bytes per parameter; the activation terms do not change."""
    levers = plan.Offload(activations=True, block_swap=0)
    fp32 = plan.offload_estimate(shape, levers)
    fp8 = plan.offload_estimate(shape, levers, base_bytes_per_param=1.0)
    assert fp8["base"] == pytest.approx(fp32["base"] / 4)
    blocks_off = 4 * shape.block_params * (shape.layers - 2) / plan.GIB
    assert fp32["host"] - fp8["host"] == pytest.approx(blocks_off * 3 / 4)
    assert fp8["kept_block_inputs"] == fp32["kept_block_inputs"]


def test_the_multi_gpu_plan_takes_the_offload_levers(shape: plan.Shape) -> None:
    """``--offload``: two blocks' inputs and two layers' teacher targets stay per GPU; the
    student's own attention outputs and the weights do not move."""
    off = plan.estimate(shape, strategy="fsdp2", sp=2, gpus=4)
    on = plan.estimate(shape, strategy="fsdp2", sp=2, gpus=4, offload=True)
    rows = shape.tokens // 2  # Wan: no text rows in the sequence
    inputs, outputs = rows * shape.hidden * 4 / plan.GIB, rows * shape.hidden * 2 / plan.GIB
    assert on["kept_block_inputs"] == pytest.approx(2 * inputs)
    assert off["kept_block_inputs"] == pytest.approx(shape.layers * inputs)
    assert off["captured_attention"] - on["captured_attention"] == pytest.approx(
        (shape.layers - 2) * outputs
    )
    assert on["student"] == off["student"] and on["teacher"] == off["teacher"]
    assert on["total"] < off["total"]
