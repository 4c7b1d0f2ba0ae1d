"""FP8 storage of frozen linear weights: float8 e4m3 with one power-of-two scale per output row.

A frozen model (the dense teacher, a LoRA student's base) keeps each large linear layer of
its transformer blocks as :class:`Fp8Linear`: 1 byte per weight and one fp32 scale per
output channel, instead of 2 (bf16) or 4 (fp32) bytes per weight.

- Which layers (:func:`frozen_linear_names`): every ``nn.Linear`` inside the blocks that hold
  the STA layers (attention q/k/v/out, Wan's text cross-attention, the FFN, HunyuanVideo's
  context projections and single blocks' ``proj_mlp``/``proj_out``) whose weights are frozen.
  Embeddings, the token refiner, norms and their modulation linears (``norm*.linear``), the
  timestep layers and the model's output projection stay as they are: small, and what every
  token's scale and shift come from.
- Scales are powers of two, ``2 ** ceil(log2(absmax / 448))`` per row (448: the largest
  e4m3 value), so dequantising is exact in any float dtype (an e4m3 value has 4 significant
  bits) and a scale cast to bf16 (FSDP2's mixed precision) loses nothing. Each weight is off
  by at most 2**-4 of itself (2**-10 of its row's scale below e4m3's normal range).
- Storage: the e4m3 bits as a ``uint8`` parameter (``weight_fp8``, (out, in)) beside
  ``weight_scale`` (out,) and the unchanged ``bias``, all frozen. As non-float parameters
  they are moved by ``.to(device)``, left alone by ``.to(dtype)``, sharded by FSDP2 and not
  re-broadcast by DDP at every forward (buffers would be).
- Forward: on a CUDA device of compute capability >= 8.9, computing in bf16, with in and out
  features multiples of 16, ``torch._scaled_mm`` with the activations quantised per token to
  e4m3 (rowwise scales, bf16 output); gradients to the input (a LoRA base passes them on)
  use the dequantised bf16 weight. Elsewhere (the CPU, older GPUs, fp32, other shapes) the
  weight is dequantised to the compute dtype for the call: exactly the linear layer of the
  dequantised weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .dit import VideoDiT

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448
_SCALED_MM_CAPABILITY = (8, 9)  # rowwise-scaled _scaled_mm: Ada and Hopper on


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out, in) as e4m3 bits (out, in) ``uint8`` and power-of-two scales (out,) fp32.

    ``dequantize_fp8(*quantize_fp8(w))`` differs from ``w`` by at most ``2**-4 * |w|`` (or
    ``2**-10 * scale`` for values below e4m3's normal range); an all-zero row gets scale 1.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1).double()  # (out,)
    mantissa, exponent = torch.frexp(amax / E4M3_MAX)  # = mantissa * 2**exponent, in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).int()  # an exact power of two needs no rounding up
    scale = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exponent), 1.0).float()
    q = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q.view(torch.uint8), scale


def dequantize_fp8(
    bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight (out, in) in ``dtype`` from e4m3 ``bits`` (out, in) and ``scale`` (out,)."""
    return bits.view(FP8_DTYPE).to(dtype) * scale.to(dtype)[:, None]


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class _ScaledMatmul(torch.autograd.Function):
    """``x @ W.T + b`` through ``torch._scaled_mm``: x (M, K) bf16 quantised per row to e4m3,
    W the stored e4m3 bits (N, K) with its row scales; bf16 out (M, N). Backward: the input's
    gradient with the dequantised bf16 weight (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, bits, scale, bias):  # type: ignore[override]
        x_amax = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)  # (M, 1), exact
        x_scale = x_amax / E4M3_MAX
        xq = (x.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)  # (M, K)
        out = torch._scaled_mm(
            xq,
            bits.view(FP8_DTYPE).t(),  # (K, N), column-major as _scaled_mm wants
            scale_a=x_scale,
            scale_b=scale.float().view(1, -1),  # (1, N)
            out_dtype=torch.bfloat16,
        )
        if bias is not None:
            out = out + bias.to(torch.bfloat16)
        ctx.save_for_backward(bits, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        bits, scale = ctx.saved_tensors
        weight = dequantize_fp8(bits, scale, torch.bfloat16)  # (N, K)
        return grad_out.to(torch.bfloat16) @ weight, None, None, None


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in float8 e4m3 with per-row scales.

    Args:
        bits: e4m3 bits of the weight (out, in), ``uint8`` (see :func:`quantize_fp8`).
        scale: per-output-channel scales (out,), powers of two.
        bias: (out,) or None, kept in its own dtype.
    """

    def __init__(
        self, bits: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = bits.shape
        self.weight_fp8 = nn.Parameter(bits, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantise ``linear``'s weight (its bias stays as it is)."""
        bits, scale = quantize_fp8(linear.weight)
        return cls(bits, scale, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) in ``dtype`` (exact: the scales are powers of two)."""
        return dequantize_fp8(self.weight_fp8, self.weight_scale, dtype)

    def uses_scaled_mm(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether a call on ``x`` computing in ``dtype`` takes the FP8 matmul."""
        return (
            x.is_cuda
            and dtype == torch.bfloat16
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and _capability(
                torch.cuda.current_device() if x.device.index is None else x.device.index
            )
            >= _SCALED_MM_CAPABILITY
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), in the autocast dtype when autocast is on, else ``x``'s."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        if self.uses_scaled_mm(x, dtype):
            x2 = x.reshape(-1, self.in_features).to(dtype).contiguous()  # (M, K), row-major
            out = _ScaledMatmul.apply(x2, self.weight_fp8, self.weight_scale, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, float8_e4m3fn"
        )


def _frozen(module: nn.Linear) -> bool:
    return all(not p.requires_grad for p in module.parameters())


def frozen_linear_names(dit: VideoDiT) -> list[str]:
    """Names (relative to ``dit.transformer``) of the linear layers FP8 and bf16 storage
    apply to: the frozen ``nn.Linear`` layers of the STA blocks, outside norms and their
    modulation (a LoRA layer's frozen ``base_layer`` included, its trainable adapter not)."""
    path = {id(m): n for n, m in dit.transformer.named_modules()}
    names = []
    for block in dit.adapter.sta_blocks(dit.transformer):
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear) or not _frozen(module):
                continue
            if any(part.startswith("norm") for part in name.split(".")):
                continue
            names.append(f"{path[id(block)]}.{name}")
    return names


@torch.no_grad()
def replace_frozen_linears(dit: VideoDiT, make: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Replace each of ``dit``'s :func:`frozen_linear_names` layers by ``make(layer)``, in
    place; returns their names."""
    names = frozen_linear_names(dit)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = dit.transformer.get_submodule(parent)
        setattr(owner, child, make(getattr(owner, child)))
    return names


def apply_fp8_weights(dit: VideoDiT) -> list[str]:
    """Store the frozen large linears of ``dit`` (:func:`frozen_linear_names`) as :class:`Fp8Linear`,
    in place; returns their names. Apply before any parallel wrapping; under LoRA, after the
    adapter is added (the base layers are then frozen)."""
    return replace_frozen_linears(dit, Fp8Linear.from_linear)


def dequantize_state_dict(
    state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``state`` with every :class:`Fp8Linear`'s ``<m>.weight_fp8`` and ``<m>.weight_scale``
    replaced by the dequantised ``<m>.weight`` in ``dtype`` (a plain linear's state again)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_scale"):
            continue
        if key.endswith(".weight_fp8"):
            module = key[: -len(".weight_fp8")]
            out[f"{module}.weight"] = dequantize_fp8(value, state[f"{module}.weight_scale"], dtype)
        else:
            out[key] = value
    return out
