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


def _probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(B, H, S, S) attention probabilities under the STA mask, float32 (float64 for float64
    inputs); rows without any attended key (text padding queries) are all 0."""
    batch, seq, _, _ = q.shape
    mask = sta_dense_mask(canvas, tile, window, text_len, seq).to(q.device)  # (B, H, S, S)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf = (x.transpose(1, 2).to(acc) for x in (q, k))  # (B, H, S, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, S, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    has_key = mask.any(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key


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
    attended key (text padding queries) produce zeros. Differentiable through torch's
    autograd; ``sta_reference_op`` is the same computation as a registered op.
    """
    probs = _probabilities(q, k, canvas, tile, window, text_len, scale)  # (B, H, S, S)
    o = torch.matmul(probs, v.transpose(1, 2).to(probs.dtype))  # (B, H, S, D)
    return o.transpose(1, 2).to(q.dtype)


def sta_reference_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``sta_reference`` for the output gradient ``do``, all (B, S, H, D).

    The softmax backward written out (as flash attention's): with P the probabilities,
    dV = P^T dO, dS = P * (dO V^T - rowsum(P * dO V^T)), dQ = dS K * scale,
    dK = dS^T Q * scale, in the reference's accumulation dtype.
    """
    probs = _probabilities(q, k, canvas, tile, window, text_len, scale)  # (B, H, S, S)
    qf, kf, vf, dof = (x.transpose(1, 2).to(probs.dtype) for x in (q, k, v, do))  # (B, H, S, D)
    dv = torch.matmul(probs.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))  # (B, H, S, S)
    ds = probs * (dp - (dp * probs).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return tuple(  # type: ignore[return-value]
        g.transpose(1, 2).to(x.dtype).contiguous()
        for g, x in zip((dq, dk, dv), (q, k, v), strict=True)
    )


# torch.library registration of the reference, as the triton backend does for its kernels:
# an opaque op traces under torch.compile without graph breaks, and a selective activation
# checkpointing policy can name it (``sta_kernels.forward_ops()``) to keep its output.


@torch.library.custom_op("sta_kernels::sta_reference", mutates_args=())
def _reference_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    text_len: torch.Tensor,
    canvas: list[int],
    tile: list[int],
    scale: float,
) -> torch.Tensor:
    # contiguous, as the fake implementation promises (compiled graphs view it by those strides)
    return sta_reference(q, k, v, canvas, tile, window, text_len, scale).contiguous()


@_reference_op.register_fake
def _reference_fake(q, k, v, window, text_len, canvas, tile, scale):
    return torch.empty_like(q)


@torch.library.custom_op("sta_kernels::sta_reference_bwd", mutates_args=())
def _reference_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: torch.Tensor,
    text_len: torch.Tensor,
    canvas: list[int],
    tile: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sta_reference_backward(do, q, k, v, canvas, tile, window, text_len, scale)


@_reference_bwd_op.register_fake
def _reference_bwd_fake(do, q, k, v, window, text_len, canvas, tile, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _reference_setup(ctx, inputs, output) -> None:
    q, k, v, window, text_len, canvas, tile, scale = inputs
    ctx.save_for_backward(q, k, v, window, text_len)
    ctx.geometry = (canvas, tile, scale)


def _reference_backward(ctx, do):
    q, k, v, window, text_len = ctx.saved_tensors
    canvas, tile, scale = ctx.geometry
    dq, dk, dv = torch.ops.sta_kernels.sta_reference_bwd(
        do, q, k, v, window, text_len, canvas, tile, scale
    )
    return dq, dk, dv, None, None, None, None, None


_reference_op.register_autograd(_reference_backward, setup_context=_reference_setup)


def sta_reference_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``sta_reference`` as the registered op ``sta_kernels::sta_reference`` (same values and
    gradients; the backward recomputes the scores instead of keeping them)."""
    return torch.ops.sta_kernels.sta_reference(
        q, k, v, window, text_len, [int(c) for c in canvas], [int(t) for t in tile], float(scale)
    )
