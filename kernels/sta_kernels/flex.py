"""The flex backend: torch ``flex_attention`` with a block mask built from the tile geometry.

Tokens are gathered from raster (t, h, w) order into tile order first, so that a full tile
of 384 tokens (6x8x8) covers exactly three 128-token flex blocks and the block mask is as
sparse as the tile mask. The mask itself is exact for any canvas: ``mask_mod`` looks the
query and key tiles up in the ``(H, N, N)`` tile mask, so partial edge tiles are handled by
the same rule as the reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .geometry import tile_mask, token_tile_ids

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tile_order(canvas: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """(Sv,) int64 permutation taking raster order to tile order.

    ``x_tiled = x_raster[:, perm]``; tokens are sorted by raster tile index and, inside a
    tile, keep their raster order.
    """
    ids = token_tile_ids(canvas, tile)
    return torch.sort(ids, stable=True).indices


def build_sta_mask_mod(
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """Return ``mask_mod(b, h, q_idx, kv_idx)`` of STA in tile order, text tokens last.

    Args:
        canvas, tile: latent grid and tile shape in tokens.
        window: (H, 3) int64 windows in tiles.
        text_len: (B,) int64 valid text tokens.
        device: where the lookup tables live (the device of the attention inputs).
    Returns:
        A mask_mod for ``create_block_mask``: True where query ``q_idx`` attends key ``kv_idx``,
        both indexing the tile-ordered sequence (video tokens in tile order, then text).
    """
    num_video = canvas[0] * canvas[1] * canvas[2]
    tiles_of = token_tile_ids(canvas, tile)[tile_order(canvas, tile)].to(device)  # (Sv,)
    masks = tile_mask(canvas, tile, window).to(device)  # (H, N, N)
    limit = (num_video + text_len).to(device)  # (B,) first padding position

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        q_video = q_idx < num_video
        kv_video = kv_idx < num_video
        qt = tiles_of[torch.clamp(q_idx, max=num_video - 1)]
        kt = tiles_of[torch.clamp(kv_idx, max=num_video - 1)]
        video = masks[h, qt, kt]
        joint = (q_idx < limit[b]) & (kv_idx < limit[b])
        return torch.where(q_video & kv_video, video, joint)

    return mask_mod


_COMPILED_FLEX: dict[str, Callable[..., torch.Tensor]] = {}


def _flex_fn(device: torch.device) -> Callable[..., torch.Tensor]:
    """flex_attention, compiled on CUDA (where the fused kernel lives), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED_FLEX:
        _COMPILED_FLEX["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["cuda"]


def build_sta_block_mask(
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    seq_len: int,
    device: torch.device | str,
    block_size: int = 128,
):
    """The flex ``BlockMask`` of STA over the tile-ordered sequence of length ``seq_len``.

    When there is no text and every tile is full and a whole number of blocks, the block
    mask is the tile mask itself (all blocks full, no ``mask_mod`` evaluated in the kernel);
    otherwise ``create_block_mask`` evaluates the exact ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    device = torch.device(device)
    tile_tokens = tile[0] * tile[1] * tile[2]
    aligned = all(c % t == 0 for c, t in zip(canvas, tile, strict=True))
    num_video = canvas[0] * canvas[1] * canvas[2]
    if aligned and tile_tokens % block_size == 0 and seq_len == num_video:
        reps = tile_tokens // block_size
        blocks = tile_mask(canvas, tile, window).to(device)  # (H, N, N)
        blocks = blocks.repeat_interleave(reps, 1).repeat_interleave(reps, 2)  # (H, Nb, Nb)
        blocks = blocks.unsqueeze(0).expand(text_len.shape[0], -1, -1, -1)  # (B, H, Nb, Nb)
        full_num = blocks.sum(-1, dtype=torch.int32)  # (B, H, Nb)
        full_idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return BlockMask.from_kv_blocks(
            torch.zeros_like(full_num),
            torch.zeros_like(full_idx, dtype=torch.int32),
            full_num,
            full_idx.to(torch.int32),
            BLOCK_SIZE=block_size,
            mask_mod=build_sta_mask_mod(canvas, tile, window, text_len, device),
        )
    mask_mod = build_sta_mask_mod(canvas, tile, window, text_len, device)
    return create_block_mask(
        mask_mod,
        B=text_len.shape[0],
        H=window.shape[0],
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=device,
        BLOCK_SIZE=block_size,
        _compile=device.type == "cuda",
    )


def sta_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    scale: float,
    block_mask=None,
) -> torch.Tensor:
    """STA through flex_attention; (B, S, H, D) raster-ordered in and out.

    Args:
        q, k, v: (B, S, H, D) video tokens in raster order, then text slots.
        canvas, tile: latent grid and tile shape.
        window: (H, 3) int64 windows; text_len: (B,) int64 valid text tokens.
        scale: softmax scale.
        block_mask: a precomputed ``build_sta_block_mask`` (same geometry) to skip rebuilding.
    Returns:
        (B, S, H, D) output, zero at text padding queries.
    """
    batch, seq, heads, _ = q.shape
    num_video = canvas[0] * canvas[1] * canvas[2]
    perm = tile_order(canvas, tile).to(q.device)  # (Sv,)
    order = torch.cat([perm, torch.arange(num_video, seq, device=q.device)])  # (S,)
    if block_mask is None:
        block_mask = build_sta_block_mask(canvas, tile, window, text_len, seq, q.device)
    qt, kt, vt = (x.index_select(1, order).transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    with warnings.catch_warnings():
        # off CUDA the unfused path is the point (tests, CPU users); don't warn about it
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        ot = _flex_fn(q.device)(qt, kt, vt, block_mask=block_mask, scale=scale)  # (B, H, S, D)
    inverse = torch.argsort(order)  # (S,) tile order back to raster order
    o = ot.transpose(1, 2).index_select(1, inverse).to(q.dtype)  # (B, S, H, D)
    valid = torch.arange(seq, device=q.device)[None, :] < (num_video + text_len.to(q.device))[:, None]
    return o * valid[:, :, None, None].to(o.dtype)  # (B, S, H, D)
