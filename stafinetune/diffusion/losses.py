"""Distillation loss: attention-output, final-output and flow-matching terms."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F


class _SquaredErrorSum(torch.autograd.Function):
    """Sum of (a - b)^2 in fp32, rows ``head`` onwards along dim 1 weighted by ``tail_weight``,
    keeping only its (usually bf16) inputs for backward.

    ``F.mse_loss(a.float(), b.float())`` would keep fp32 copies of both: at 720p that is
    twice the captured attention outputs of every layer again, in fp32.
    """

    @staticmethod
    def forward(
        ctx: Any, a: torch.Tensor, b: torch.Tensor, head: int | None, tail_weight: float
    ) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.head, ctx.tail_weight = head, tail_weight
        sq = (a.float() - b.float()) ** 2
        if head is None:
            return sq.sum()
        return sq[:, :head].sum() + tail_weight * sq[:, head:].sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        diff = (a.float() - b.float()) * (2.0 * grad)
        if ctx.head is not None:
            diff[:, ctx.head :] *= ctx.tail_weight
        return diff.to(a.dtype), None, None, None


def squared_error_sum(
    a: torch.Tensor, b: torch.Tensor, head: int | None = None, tail_weight: float = 1.0
) -> torch.Tensor:
    """``sum((a - b) ** 2)`` in fp32 over (B, S, ...) tensors, rows ``>= head`` of dim 1 weighted
    by ``tail_weight``; differentiable in ``a`` only (``b`` is a target)."""
    return _SquaredErrorSum.apply(a, b.detach(), head, tail_weight)


def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean((a - b) ** 2)`` in fp32 without fp32 copies kept for backward."""
    return squared_error_sum(a, b) / a.numel()


def attention_loss(
    student: Mapping[int, torch.Tensor],
    teacher: Mapping[int, torch.Tensor],
    layers: Iterable[int] | None = None,
    mse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over layers of the MSE between student and teacher attention outputs.

    Args:
        student, teacher: layer index -> attention output (same shape per layer, e.g. (B, S, H, D)).
        layers: the layers to compare; None means every layer both captured.
        mse: the per-layer error (default ``F.mse_loss``); sequence parallelism passes one that
            reduces local shards over the sp group.
    Raises:
        KeyError: if a requested layer was not captured by both models.
    """
    chosen = sorted(set(student) & set(teacher)) if layers is None else list(layers)
    missing = [i for i in chosen if i not in student or i not in teacher]
    if missing or not chosen:
        raise KeyError(
            f"attention loss needs layers {chosen} from both models; missing {missing} "
            f"(student captured {sorted(student)}, teacher {sorted(teacher)})"
        )
    mse = mse or mean_squared_error
    terms = [mse(student[i], teacher[i].detach().to(student[i].device)) for i in chosen]
    return torch.stack(terms).mean()


def distillation_losses(
    *,
    student_out: torch.Tensor,
    target: torch.Tensor,
    w_data: float,
    w_out: float,
    w_attn: float,
    teacher_out: torch.Tensor | None = None,
    student_attn: Mapping[int, torch.Tensor] | None = None,
    teacher_attn: Mapping[int, torch.Tensor] | None = None,
    layers: Iterable[int] | None = None,
    attn_mse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    given_first_frame: bool = False,
) -> dict[str, torch.Tensor]:
    """All loss terms and their weighted sum.

    Args:
        student_out: (B, C, T, H, W) the student's velocity prediction.
        target: (B, C, T, H, W) flow-matching target (noise - x0).
        teacher_out: (B, C, T, H, W) the dense teacher's prediction on the same input.
        student_attn, teacher_attn: captured attention outputs per layer.
        given_first_frame: the first latent frame is the clean condition (Wan 2.2 TI2V
            image-to-video), not predicted: the data and output losses leave it out. The
            attention loss keeps its tokens, which every other token attends.
    Returns:
        ``{"total", "data", "out", "attn"}``; a term whose weight is 0 is still reported
        when its inputs are present (for logging) but does not enter ``total``.
    """
    out: dict[str, torch.Tensor] = {}
    total = student_out.new_zeros((), dtype=torch.float32)
    if given_first_frame:  # (B, C, T - 1, H, W): the predicted frames
        student_out, target = student_out[:, :, 1:], target[:, :, 1:]
        teacher_out = None if teacher_out is None else teacher_out[:, :, 1:]
    out["data"] = F.mse_loss(student_out.float(), target.float())
    if w_data > 0:
        total = total + w_data * out["data"]
    if teacher_out is not None:
        out["out"] = F.mse_loss(
            student_out.float(), teacher_out.detach().to(student_out.device).float()
        )
        if w_out > 0:
            total = total + w_out * out["out"]
    elif w_out > 0:
        raise ValueError("distill.w_out > 0 needs the teacher's output")
    if student_attn is not None and teacher_attn is not None:
        out["attn"] = attention_loss(student_attn, teacher_attn, layers, attn_mse)
        if w_attn > 0:
            total = total + w_attn * out["attn"]
    elif w_attn > 0:
        raise ValueError("distill.w_attn > 0 needs both models' attention outputs")
    out["total"] = total
    return out


def dmd_loss(sample: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Distribution-matching loss (DMD2) of generated samples (B, C, T, H, W).

    ``real`` and ``fake`` are the teacher's and the critic's x0 predictions of the samples
    after noising (no gradient). The gradient of the loss with respect to ``sample`` is
    ``g / numel`` with ``g = (fake - real) / mean|sample - real|`` (normalised per sample), so a
    descent step moves each sample towards the teacher's prediction and away from the
    critic's; ``g`` itself never carries a gradient (the stop-gradient of DMD).
    """
    with torch.no_grad():
        dims = tuple(range(1, sample.ndim))
        weight = (sample - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
        grad = torch.nan_to_num((fake - real) / weight)
        target = sample - grad
    return 0.5 * F.mse_loss(sample.float(), target.float())
