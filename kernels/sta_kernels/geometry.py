"""Tile geometry of Sliding Tile Attention: which key tiles each query tile attends.

Everything here is pure index arithmetic shared by every backend (reference, flex, triton)
and by the mask search, so that all of them agree on one definition of the window.

Semantics (see the package docstring): on each axis with ``n`` tiles and window ``w``
(``w >= 1``; ``w >= n`` means the whole axis), ``lo = w // 2``, ``hi = w - 1 - lo``,
``c = clamp(qi, lo, n - 1 - hi)`` and key tile ``ki`` is attended iff
``c - lo <= ki <= c + hi``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

Triple = tuple[int, int, int]


def as_triple(value: Sequence[int], name: str) -> Triple:
    """Return ``value`` as three positive ints, or raise ``ValueError`` naming ``name``.

    The one validator of (t, h, w) triples (canvases, tiles, windows) in this package and in
    stafinetune: integral numbers only (``3`` or ``3.0``; not ``3.5``, ``True`` or ``"3"``).
    """
    message = f"{name} must be a list of 3 positive ints, got {value!r}"
    try:
        items = list(value)
    except TypeError:
        raise ValueError(message) from None
    triple = []
    for v in items:
        if isinstance(v, (bool, str, bytes)):
            raise ValueError(message)
        try:
            as_int, as_float = int(v), float(v)
        except (TypeError, ValueError):
            raise ValueError(message) from None
        if as_int != as_float:
            raise ValueError(f"{name} must hold integers, got {value!r}")
        if as_int < 1:
            raise ValueError(message)
        triple.append(as_int)
    if len(triple) != 3:
        raise ValueError(message)
    return tuple(triple)  # type: ignore[return-value]


def num_tiles(canvas: Sequence[int], tile: Sequence[int]) -> Triple:
    """Tiles per axis, ``ceil(canvas / tile)``; the last tile of an axis may be partial."""
    return tuple(math.ceil(c / t) for c, t in zip(canvas, tile, strict=True))  # type: ignore[return-value]


def covering_heads(
    window: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]
) -> torch.Tensor:
    """(H,) bool: heads whose (H, 3) window spans the whole tile grid on every axis (dense
    attention over the video)."""
    return (window >= torch.tensor(num_tiles(canvas, tile))).all(dim=1)


def window_start(qi: torch.Tensor, n: int, w: torch.Tensor) -> torch.Tensor:
    """First key tile of the window of query tile ``qi`` on an axis of ``n`` tiles.

    ``qi`` and ``w`` broadcast; ``w`` is clipped to ``[1, n]``. The window covers
    ``[start, start + w - 1]`` and always lies inside ``[0, n - 1]``.
    """
    w = w.clamp(1, n)
    lo = w // 2
    hi = w - 1 - lo
    c = torch.minimum(torch.maximum(qi, lo), n - 1 - hi)
    return c - lo


def query_tile_range(ki: int, n: int, w: int) -> tuple[int, int]:
    """``(first, count)`` of the query tiles whose window holds key tile ``ki`` on one axis.

    The window start ``clamp(qi - w // 2, 0, n - w)`` is monotone in ``qi``, so these query
    tiles are contiguous; the backward kernel loops over exactly this range for dk/dv.
    """
    w = max(1, min(w, n))
    first = 0 if ki <= w - 1 else ki - w + 1 + w // 2
    last = n - 1 if ki >= n - w else ki + w // 2
    return first, last - first + 1


def normalize_window(window: Sequence[int] | torch.Tensor, num_heads: int) -> torch.Tensor:
    """Return the window as an ``(H, 3)`` int64 CPU tensor, validating its values.

    Accepts one triple for all heads or an ``(H, 3)`` tensor/nested sequence.
    """
    w = torch.as_tensor(window).detach().to("cpu")
    if w.is_floating_point() or w.is_complex() or w.dtype == torch.bool:
        raise ValueError(f"window must hold integers, got dtype {w.dtype}")
    w = w.to(torch.int64)
    if w.ndim == 1:
        if w.numel() != 3:
            raise ValueError(f"window must be a triple (wt, wh, ww), got shape {tuple(w.shape)}")
        w = w.expand(num_heads, 3)
    elif w.ndim != 2 or w.shape != (num_heads, 3):
        raise ValueError(
            f"per-head window must have shape (H, 3) = ({num_heads}, 3), got {tuple(w.shape)}"
        )
    # value checks read tensor data: eager only (torch.compile would break the graph here)
    if not torch.compiler.is_compiling() and (w < 1).any():
        raise ValueError(f"window entries must be >= 1 (in tiles), got {w.tolist()}")
    return w.contiguous()


def tile_mask(canvas: Sequence[int], tile: Sequence[int], window: torch.Tensor) -> torch.Tensor:
    """Tile-level STA mask.

    Args:
        canvas: (T, Hc, Wc) latent token grid.
        tile: (tt, th, tw) tile shape in tokens.
        window: (H, 3) window in tiles per head.
    Returns:
        (H, N, N) bool, N = nt * nh * nw tiles in raster order; ``[h, q, k]`` is True iff
        query tile q attends key tile k for head h.
    """
    n = num_tiles(canvas, tile)
    axis_masks = []
    for axis in range(3):
        idx = torch.arange(n[axis])
        w = window[:, axis].view(-1, 1)  # (H, 1)
        start = window_start(idx.view(1, -1), n[axis], w)  # (H, n)
        width = w.clamp(1, n[axis])
        ki = idx.view(1, 1, -1)
        axis_masks.append((ki >= start.unsqueeze(-1)) & (ki < (start + width).unsqueeze(-1)))
    mt, mh, mw = axis_masks  # (H, n_a, n_a) each
    heads = window.shape[0]
    full = (
        mt[:, :, None, None, :, None, None]
        & mh[:, None, :, None, None, :, None]
        & mw[:, None, None, :, None, None, :]
    )  # (H, nt, nh, nw, nt, nh, nw)
    total = n[0] * n[1] * n[2]
    return full.reshape(heads, total, total)


def token_tile_ids(canvas: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """(T*Hc*Wc,) int64: the raster tile index of every video token (raster t, h, w order)."""
    n = num_tiles(canvas, tile)
    t = torch.arange(canvas[0]) // tile[0]
    h = torch.arange(canvas[1]) // tile[1]
    w = torch.arange(canvas[2]) // tile[2]
    ids = (t[:, None, None] * n[1] + h[None, :, None]) * n[2] + w[None, None, :]
    return ids.reshape(-1)


def token_mask(canvas: Sequence[int], tile: Sequence[int], window: torch.Tensor) -> torch.Tensor:
    """(H, Sv, Sv) bool token-level video-video mask, Sv = T*Hc*Wc in raster order."""
    ids = token_tile_ids(canvas, tile)
    return tile_mask(canvas, tile, window)[:, ids][:, :, ids]


@functools.lru_cache(maxsize=4096)
def _axis_pairs(tokens: int, tile: int, window: int) -> int:
    """(query, key) token pairs of one axis of ``tokens`` tokens, in tiles of ``tile`` (the
    last one partial), that a window of ``window`` tiles keeps."""
    n = math.ceil(tokens / tile)
    w = max(1, min(window, n))
    sizes = [min(tile, tokens - i * tile) for i in range(n)]  # tokens per tile
    starts = window_start(torch.arange(n), n, torch.tensor(w)).tolist()  # (n,) per query tile
    return sum(sizes[qi] * sum(sizes[s : s + w]) for qi, s in enumerate(starts))


def window_density(canvas: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> float:
    """Fraction of the video (query, key) token pairs that one window attends, exactly.

    Args:
        canvas: (T, Hc, Wc) latent token grid.
        tile: (tt, th, tw) tile shape in tokens (edge tiles may be partial).
        window: (wt, wh, ww) in tiles; entries are clipped to [1, n] as everywhere else.
    Returns:
        attended pairs / (T*Hc*Wc)^2 as a float, counting partial tiles by their tokens.

    Builds no mask: the STA mask is the product of one mask per axis, so the pairs it keeps
    are the product of each axis's. ``density`` is this for every row of an (H, 3) table.
    """
    kept = math.prod(_axis_pairs(int(c), int(t), int(w))
                     for c, t, w in zip(canvas, tile, window, strict=True))
    return kept / math.prod(int(c) for c in canvas) ** 2


def density(canvas: Sequence[int], tile: Sequence[int], window: torch.Tensor) -> torch.Tensor:
    """(H,) float32 fraction of video query/key token pairs that each head of the (H, 3)
    ``window`` attends (``window_density`` per head)."""
    rows = torch.as_tensor(window).reshape(-1, 3).tolist()
    values = [window_density(canvas, tile, w) for w in rows]
    return torch.tensor(values, dtype=torch.float64).float()
