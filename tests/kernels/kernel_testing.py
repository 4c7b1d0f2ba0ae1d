"""Helpers shared by the kernel tests: errors, inputs, a low-precision reference."""

from __future__ import annotations

import math

import torch

from sta_kernels import sta_dense_mask
from sta_kernels.reference import text_lengths


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||x - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_qkv(batch: int, canvas, text_slots: int, heads: int, head_dim: int, dtype, device,
             seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Fresh random q, k, v, do of shape (B, S, H, D), S = prod(canvas) + text_slots."""
    gen = torch.Generator().manual_seed(seed)
    seq = math.prod(canvas) + text_slots
    return tuple(
        torch.randn(batch, seq, heads, head_dim, generator=gen).to(device=device, dtype=dtype)
        for _ in range(4)
    )


def lowp_attention(q, k, v, canvas, tile, window, text_len, scale=None) -> torch.Tensor:
    """Masked attention computed the way a 16-bit kernel does (flash-attn's attention_ref).

    Scores from 16-bit matmuls, softmax in fp32, probabilities rounded to the input dtype
    before the second matmul. Its error against the fp64 reference sets the tolerance.
    """
    batch, seq, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    num_video = math.prod(canvas)
    lengths = text_lengths(text_len, batch, seq - num_video)
    mask = sta_dense_mask(canvas, tile, window, lengths, seq).to(q.device)  # (B, H, S, S)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has_key, 0.0), -1) * has_key
    return (p.to(q.dtype) @ vh).transpose(1, 2)  # (B, S, H, D)
