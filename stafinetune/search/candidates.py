"""Candidate windows of the search: derived from the canvas's tile grid, or given and checked.

Windows count tiles (``sta_kernels`` semantics): on an axis of ``n`` tiles a window ``w``
spans exactly ``w`` tiles, shifted inward at the edges, so every query tile sees the same
number of key tiles and a window's density is (nearly, with partial edge tiles exactly as
``sta_kernels.density`` counts) the product of its per-axis fractions ``w / n``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from sta_kernels import density, num_tiles

# The derived set keeps windows whose density lies in this range (the targets sit inside it).
MIN_DERIVED_DENSITY = 0.05
MAX_DERIVED_DENSITY = 0.5


def all_windows(tiles: Sequence[int]) -> torch.Tensor:
    """(N, 3) int64: every window ``1 <= w <= n`` on each axis of a ``tiles`` grid."""
    ranges = [range(1, n + 1) for n in tiles]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.int64)


def _shape_targets(level: float) -> list[list[float]]:
    """Per-axis fractions of density ``level``: balanced, then elongated along t, h and w.

    Elongated means the whole axis (fraction 1) with the other two sharing the density.
    """
    balanced = [level ** (1 / 3)] * 3
    side = math.sqrt(level)
    return [balanced, [1.0, side, side], [side, 1.0, side], [side, side, 1.0]]


def default_candidates(
    canvas: Sequence[int], tile: Sequence[int], levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4)
) -> list[list[int]]:
    """Candidate windows derived from the tile grid of ``canvas``, plus the full window.

    For each density level and each shape (balanced, or the whole axis along t, h or w with
    the other axes sharing the density) the window nearest to that shape's per-axis fractions
    in log space is taken; windows outside [5%, 50%] density and duplicates are dropped. On the
    embedded canvas (5, 8, 8) with tile (1, 2, 2) (5 x 4 x 4 tiles) this yields windows keeping
    roughly 10-40% of the tile pairs, some of them elongated along one axis.

    Args:
        canvas: (T, Hc, Wc) latent token grid.
        tile: (tt, th, tw) tile in tokens.
        levels: target densities, each in (0, 1).
    Returns:
        windows ``[[wt, wh, ww], ...]`` in tiles, sparsest first, the full window last.
    """
    tiles = num_tiles(canvas, tile)
    grid = all_windows(tiles)  # (N, 3)
    log_frac = torch.log(grid.double() / torch.tensor(tiles, dtype=torch.float64))  # (N, 3)
    dens = density(canvas, tile, grid).double()  # (N,)
    chosen: list[int] = []
    for level in levels:
        for target in _shape_targets(float(level)):
            dist = (log_frac - torch.log(torch.tensor(target, dtype=torch.float64))).square().sum(1)
            best = int(torch.argmin(dist))
            if (
                MIN_DERIVED_DENSITY <= float(dens[best]) <= MAX_DERIVED_DENSITY
                and best not in chosen
            ):
                chosen.append(best)
    chosen.sort(key=lambda i: (float(dens[i]), grid[i].tolist()))
    windows = [grid[i].tolist() for i in chosen]
    full = list(tiles)
    if full not in windows:
        windows.append(full)
    return windows


def resolve_candidates(
    candidates: Sequence[Sequence[int]] | None,
    canvas: Sequence[int],
    tile: Sequence[int],
    levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate set the search evaluates, checked against the canvas's tile grid.

    Args:
        candidates: ``search.candidates`` (windows in tiles) or ``None`` for the derived set.
        canvas, tile: the token canvas and the tile in tokens.
        levels: ``search.density_levels`` for the derived set.
    Returns:
        windows: (C, 3) int64, duplicates removed, the full window appended if missing.
        densities: (C,) float64 fraction of video query/key pairs each window attends.
    Raises:
        ValueError naming ``search.candidates`` for an empty set or a window wider than the grid.
    """
    tiles = num_tiles(canvas, tile)
    if candidates is None:
        windows = default_candidates(canvas, tile, levels)
    else:
        if len(candidates) == 0:
            raise ValueError("search.candidates must be a non-empty list of [wt, wh, ww] windows")
        windows = []
        for i, window in enumerate(candidates):
            w = [int(v) for v in window]
            if len(w) != 3 or any(v < 1 for v in w):
                raise ValueError(f"search.candidates[{i}] must be 3 ints >= 1, got {list(window)}")
            if any(v > n for v, n in zip(w, tiles, strict=True)):
                raise ValueError(
                    f"search.candidates[{i}] = {w} is wider than the tile grid {list(tiles)} of "
                    f"canvas {list(canvas)} with tile {list(tile)} (at most {list(tiles)})"
                )
            if w not in windows:
                windows.append(w)
        if list(tiles) not in windows:
            windows.append(list(tiles))
    table = torch.tensor(windows, dtype=torch.int64)  # (C, 3)
    return table, density(canvas, tile, table).double()
