"""Dense masked attention with the STA mask: the source of truth for every other backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .geometry import token_mask


def text_lengths(text_len: int | torch.Tensor, batch: int, max_text: int) -> torch.Tensor:
    """Return valid text lengths as a ``(B,)`` int64 CPU tensor, validated against ``max_text``."""
    tl = torch.as_tensor(text_len).detach().to("cpu", torch.int64)
    if tl.ndim == 0:
        tl = tl.expand(batch)
    if tl.shape != (batch,):
        raise ValueError(f"text_len must be an int or a (B,) = ({batch},) tensor, got {tuple(tl.shape)}")
    if torch.compiler.is_compiling():  # value checks read tensor data: eager only
        return tl.contiguous()
    if (tl < 0).any() or (tl > max_text).any():
        raise ValueError(f"text_len must lie in [0, {max_text}] (the text tokens in S), got {tl.tolist()}")
    return tl.contiguous()


def sta_dense_mask(
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    seq_len: int,
) -> torch.Tensor:
    """Full token mask of STA with joint text.

    Args:
        canvas, tile: the latent grid and tile shape (tokens).
        window: (H, 3) windows in tiles.
        text_len: (B,) valid text tokens after the video tokens.
        seq_len: S = video tokens + text slots (valid text plus padding).
    Returns:
        (B, H, S, S) bool, True where query attends key. Padding query rows are all False.
    """
    sv = canvas[0] * canvas[1] * canvas[2]
    heads = window.shape[0]
    batch = text_len.shape[0]
    video = token_mask(canvas, tile, window)  # (H, Sv, Sv)
    mask = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.bool)
    mask[:, :, :sv, :sv] = video
    pos = torch.arange(seq_len - sv)
    valid_text = pos[None, :] < text_len[:, None]  # (B, St)
    # video queries see valid text keys; valid text queries see all video and valid text keys
    mask[:, :, :sv, sv:] = valid_text[:, None, None, :]
    mask[:, :, sv:, :sv] = valid_text[:, None, :, None]
    mask[:, :, sv:, sv:] = valid_text[:, None, :, None] & valid_text[:, None, None, :]
    return mask


def sta_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense attention under the STA mask, (B, S, H, D) in and out.

    Scores and softmax run in float32 (float64 for float64 inputs); rows without any
    attended key (text padding queries) produce zeros.
    """
    batch, seq, _, _ = q.shape
    mask = sta_dense_mask(canvas, tile, window, text_len, seq).to(q.device)  # (B, H, S, S)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.transpose(1, 2).to(acc) for x in (q, k, v))  # (B, H, S, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, S, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    o = torch.matmul(probs, vf)  # (B, H, S, D)
    return o.transpose(1, 2).to(q.dtype)
