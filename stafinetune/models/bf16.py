"""bf16 storage of frozen linear weights (``train.frozen_weights=bf16``).

A LoRA student's frozen base (which is also its teacher) and a separate teacher keep the
large linear layers of their transformer blocks (the layers FP8 storage takes:
:func:`~stafinetune.models.fp8.frozen_linear_names`) as :class:`Bf16Linear`: 2 bytes per weight instead of 4.

Under bf16 autocast (``train.precision=auto`` on CUDA) this loses nothing: autocast rounds an
fp32 weight to bf16 for every matmul, and a weight stored in bf16 is that rounding done once,
so outputs and gradients are bit-equal to the fp32 base's. Without autocast (the CPU's fp32
runs) the layer computes with the bf16-rounded weight in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dit import VideoDiT
from .fp8 import apply_fp8_weights, replace_frozen_linears


class Bf16Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight and bias are stored in bf16.

    Args:
        weight: (out, in), cast to bf16.
        bias: (out,) or None, cast to bf16.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16),
                                                      requires_grad=False)  # fmt: skip
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        """``linear``'s weight and bias rounded to bf16."""
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in the autocast dtype when autocast is on, else ``x``'s."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bfloat16"
        )


def apply_bf16_weights(dit: VideoDiT) -> list[str]:
    """Store the frozen large linears of ``dit`` (:func:`frozen_linear_names`) as
    :class:`Bf16Linear`, in place; returns their names. Apply before any parallel wrapping;
    under LoRA, after the adapter is added (the base layers are then frozen)."""
    return replace_frozen_linears(dit, Bf16Linear.from_linear)


def apply_frozen_weights(dit: VideoDiT, kind: str) -> list[str]:
    """``train.frozen_weights``: ``fp8`` or ``bf16`` storage of ``dit``'s frozen block
    linears (names returned), ``none`` leaves it as built."""
    if kind == "none":
        return []
    apply = {"fp8": apply_fp8_weights, "bf16": apply_bf16_weights}[kind]
    return apply(dit)
