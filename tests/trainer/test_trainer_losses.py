"""Loss terms against hand computation on tiny tensors."""

import pytest
import torch

from stafinetune.diffusion.losses import attention_loss, distillation_losses


def test_terms_match_hand_computation():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # squared errors 0, 4, 0, 16 -> mean 5
    teacher = torch.tensor([[0.0, 2.0], [3.0, 2.0]])  # squared errors 1, 0, 0, 4 -> mean 1.25
    s_attn = {0: torch.tensor([1.0, 1.0]), 3: torch.tensor([0.0, 2.0])}
    t_attn = {0: torch.tensor([0.0, 1.0]), 3: torch.tensor([0.0, 0.0])}  # layer means 0.5, 2.0
    terms = distillation_losses(
        student_out=student,
        target=target,
        teacher_out=teacher,
        student_attn=s_attn,
        teacher_attn=t_attn,
        w_data=0.5,
        w_out=2.0,
        w_attn=3.0,
    )
    assert terms["data"].item() == pytest.approx(5.0)
    assert terms["out"].item() == pytest.approx(1.25)
    assert terms["attn"].item() == pytest.approx(1.25)  # (0.5 + 2.0) / 2
    assert terms["total"].item() == pytest.approx(0.5 * 5.0 + 2.0 * 1.25 + 3.0 * 1.25)


def test_layer_selection_and_zero_weights():
    s_attn = {0: torch.ones(3), 1: torch.zeros(3)}
    t_attn = {0: torch.zeros(3), 1: torch.zeros(3)}
    assert attention_loss(s_attn, t_attn, layers=[1]).item() == 0.0
    assert attention_loss(s_attn, t_attn, layers=[0]).item() == 1.0
    terms = distillation_losses(
        student_out=torch.ones(2),
        target=torch.zeros(2),
        w_data=1.0,
        w_out=0.0,
        w_attn=0.0,
        teacher_out=torch.zeros(2),
    )
    assert terms["out"].item() == 1.0  # reported for logging
    assert terms["total"].item() == 1.0  # but weighted out


def test_missing_inputs_fail_clearly():
    with pytest.raises(ValueError, match="w_out"):
        distillation_losses(
            student_out=torch.ones(2), target=torch.zeros(2), w_data=1.0, w_out=1.0, w_attn=0.0
        )
    with pytest.raises(KeyError, match="missing \\[2\\]"):
        attention_loss({0: torch.ones(1)}, {0: torch.ones(1)}, layers=[0, 2])


def test_gradient_flows_only_to_student():
    student = torch.randn(4, requires_grad=True)
    teacher = torch.randn(4, requires_grad=True)
    terms = distillation_losses(
        student_out=student,
        target=torch.zeros(4),
        teacher_out=teacher,
        w_data=0.0,
        w_out=1.0,
        w_attn=0.0,
    )
    terms["total"].backward()
    assert student.grad is not None and teacher.grad is None
