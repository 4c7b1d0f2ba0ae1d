"""Sliding Tile Attention (STA) kernels: one public function, three backends.

``sliding_tile_attention(q, k, v, *, canvas, tile, window, text_len=0, scale=None,
backend="auto")`` computes attention over ``S = T*Hc*Wc`` video tokens in raster
(t, h, w) order followed by optional joint text tokens, where each video query tile
attends only the key tiles of a 3D window around it. This package depends only on torch
(and triton for the fast path) so it can be used without the stafinetune framework.
"""

from .api import BACKENDS, forward_ops, resolve_backend, sliding_tile_attention
from .geometry import (
    density,
    num_tiles,
    query_tile_range,
    tile_mask,
    token_mask,
    token_tile_ids,
    window_density,
    window_start,
)
from .reference import sta_dense_mask

__all__ = [
    "BACKENDS",
    "density",
    "forward_ops",
    "num_tiles",
    "query_tile_range",
    "resolve_backend",
    "sliding_tile_attention",
    "sta_dense_mask",
    "tile_mask",
    "token_mask",
    "token_tile_ids",
    "window_density",
    "window_start",
]
