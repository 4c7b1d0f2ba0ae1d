"""Helpers of the window-search tests: tiny models, calibration batches, built attention."""

from __future__ import annotations

import torch

from stafinetune.models import AttentionConfig, ModelConfig, VideoDiT, build_model

CANVAS = (5, 8, 8)  # tokens of the tiny flavors' (16, 5, 16, 16) latents
TILE = (1, 2, 2)  # -> 5 x 4 x 4 tiles


def build_tiny(flavor: str, seed: int = 0, **attention) -> VideoDiT:
    """A tiny DiT with deterministic random weights; attention fields as keyword arguments."""
    attention.setdefault("backend", "reference")
    attention.setdefault("tile", list(TILE))
    torch.manual_seed(seed)
    return build_model(ModelConfig(flavor=flavor), AttentionConfig(**attention))


def calibration(
    flavor: str,
    sizes: tuple[int, ...] = (2,),
    latent_shape: tuple[int, int, int] = (5, 16, 16),
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches as the training loader yields them; text lengths vary (padding in HunyuanVideo)."""
    g = torch.Generator().manual_seed(seed)
    dim = 32  # text_dim / text_embed_dim and pooled_projection_dim of both tiny flavors
    batches = []
    for b in sizes:
        lengths = torch.randint(3, 17, (b,), generator=g)  # (B,)
        batches.append(
            {
                "latents": torch.randn(b, 16, *latent_shape, generator=g),
                "text": torch.randn(b, 16, dim, generator=g),
                "text_mask": torch.arange(16)[None, :] < lengths[:, None],
                "pooled_text": torch.randn(b, dim, generator=g),
            }
        )
    return batches


def positions(canvas: tuple[int, int, int]) -> torch.Tensor:
    """(Sv, 3) float (t, h, w) of every video token in raster order, centred on 0."""
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in canvas), indexing="ij"),
        dim=-1,
    ).reshape(-1, 3)
    return grid - grid.mean(dim=0)


def local_global_qkv(
    local: list[bool], batch: int = 2, dim: int = 16, sharpness: float = 2.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, Sv, H, D) q, k, v on the tiny canvas whose heads are built local or global.

    A local head's logit is ``-sharpness * |p_i - p_j|^2`` (plus a term constant per query):
    q_i = c [2 p_i, -1], k_j = [p_j, |p_j|^2] with c folding in the softmax scale, so the
    weights fall by e^-2 per token of distance 1 and e^-8 at distance 2. A global head has
    q = 0: uniform attention over every key. v is random.
    """
    g = torch.Generator().manual_seed(seed)
    p = positions(CANVAS)  # (Sv, 3)
    c = sharpness * dim**0.5
    q_local = torch.cat([2 * c * p, torch.full((p.shape[0], 1), -c)], dim=1)  # (Sv, 4)
    k_local = torch.cat([p, p.square().sum(dim=1, keepdim=True)], dim=1)  # (Sv, 4)
    heads = len(local)
    q = torch.zeros(batch, p.shape[0], heads, dim)
    k = torch.randn(batch, p.shape[0], heads, dim, generator=g)
    for h, is_local in enumerate(local):
        if is_local:
            k[:, :, h] = 0
            q[:, :, h, :4] = q_local
            k[:, :, h, :4] = k_local
    v = torch.randn(batch, p.shape[0], heads, dim, generator=g)
    return q, k, v
