"""Which attention one STA call runs: plain SDPA, the STA kernel, or both on a head split.

STA with a window that covers the whole tile grid is dense attention, and the dense SDPA
kernels (cuDNN, flash) compute it faster than a sparse kernel looping over every tile. So:

- every head's window covers the canvas (``window >= num_tiles`` on each axis): dense SDPA;
- no head's window covers it: the STA kernel;
- a mix: the STA kernel for all heads, unless a measured :class:`CostTable` for this canvas,
  tile and head dim says that SDPA on the covering heads plus STA on the others (plus the
  gather and scatter of the head split) is faster. Without a table the call stays on STA,
  which is what it ran before; the table comes from ``benchmarks/dispatch_table.py`` on the
  device that trains, never from a guess.

Windows are small CPU tables, so the choice costs microseconds; it reads their values, so a
``torch.compile``'d block keeps the STA kernel (see ``STAAttention.forward``).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sta_kernels.geometry import as_triple, covering_heads, window_density

Triple = tuple[int, int, int]
TABLE_VERSION = 1


@dataclass(frozen=True)
class Route:
    """How one call attends.

    Attributes:
        kind: ``dense`` (SDPA for all heads), ``sta`` (the STA kernel for all heads) or
            ``split`` (SDPA for ``dense_heads``, STA for ``sparse_heads``).
        dense_heads, sparse_heads: head indices of a split, ascending.
    """

    kind: str
    dense_heads: tuple[int, ...] = ()
    sparse_heads: tuple[int, ...] = ()


DENSE, STA = Route("dense"), Route("sta")


@dataclass(frozen=True)
class CostPoint:
    """Measured milliseconds per head of STA at one video density (forward, backward)."""

    density: float
    fwd_ms: float
    bwd_ms: float
    window: tuple[int, int, int] | None = None  # the window measured, for the record


@dataclass(frozen=True)
class CostEntry:
    """Measured per-head times at one (canvas, tile, head dim).

    ``dense_*`` is SDPA (what ``auto`` picks on the device); ``split_ms`` the per-head cost of
    gathering q, k, v by head and scattering the output back (forward and backward alike);
    ``sta`` the STA kernel at several densities, sorted by density.
    """

    canvas: Triple
    tile: Triple
    head_dim: int
    dense_fwd_ms: float
    dense_bwd_ms: float
    split_ms: float
    sta: tuple[CostPoint, ...]

    def sta_ms(self, density: float, backward: bool) -> float:
        """STA milliseconds per head at ``density``: linear between the measured densities,
        extended along the nearest measured segment outside them."""
        points = self.sta
        if len(points) == 1:
            p = points[0]
            return (p.fwd_ms + (p.bwd_ms if backward else 0.0)) * density / p.density
        xs = [p.density for p in points]
        i = min(max(bisect.bisect_left(xs, density), 1), len(points) - 1)
        a, b = points[i - 1], points[i]
        ta = a.fwd_ms + (a.bwd_ms if backward else 0.0)
        tb = b.fwd_ms + (b.bwd_ms if backward else 0.0)
        return ta + (tb - ta) * (density - a.density) / (b.density - a.density)

    def dense_ms(self, backward: bool) -> float:
        """SDPA milliseconds per head."""
        return self.dense_fwd_ms + (self.dense_bwd_ms if backward else 0.0)


@dataclass
class CostTable:
    """Per-head attention costs measured on one device, keyed by (canvas, tile, head dim).

    Written by ``benchmarks/dispatch_table.py`` (JSON, ``save``/``load``); read by
    ``STAAttention`` (``attention.cost_table``) to route layers that mix covering and sparse
    heads.
    """

    device: str
    entries: list[CostEntry] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)

    def entry(self, canvas: Sequence[int], tile: Sequence[int], head_dim: int) -> CostEntry | None:
        """The measurements of this geometry, or None when it was not measured."""
        key = (tuple(canvas), tuple(tile), int(head_dim))
        for e in self.entries:
            if (e.canvas, e.tile, e.head_dim) == key:
                return e
        return None

    def to_dict(self) -> dict[str, object]:
        return {"version": TABLE_VERSION, "device": self.device, "meta": self.meta,
                "entries": [asdict(e) for e in self.entries]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> CostTable:
        """Parse (and validate) a table written by :meth:`to_dict`."""
        if data.get("version") != TABLE_VERSION:
            raise ValueError(
                f"cost table version must be {TABLE_VERSION}, got {data.get('version')!r}"
            )
        entries = []
        for raw in data["entries"]:
            points = sorted(
                (CostPoint(float(p["density"]), float(p["fwd_ms"]), float(p["bwd_ms"]),
                           None if p.get("window") is None else as_triple(p["window"], "window"))
                 for p in raw["sta"]),
                key=lambda p: p.density,
            )  # fmt: skip
            if not points or any(not 0 < p.density <= 1 for p in points):
                raise ValueError(f"cost table entry {raw['canvas']} needs STA densities in (0, 1]")
            if len({p.density for p in points}) != len(points):
                raise ValueError(f"cost table entry {raw['canvas']} repeats a density")
            entries.append(
                CostEntry(
                    canvas=as_triple(raw["canvas"], "canvas"),
                    tile=as_triple(raw["tile"], "tile"),
                    head_dim=int(raw["head_dim"]),
                    dense_fwd_ms=float(raw["dense_fwd_ms"]),
                    dense_bwd_ms=float(raw["dense_bwd_ms"]),
                    split_ms=float(raw["split_ms"]),
                    sta=tuple(points),
                )
            )
        return cls(device=str(data["device"]), entries=entries, meta=dict(data.get("meta", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


def choose_route(
    window: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    *,
    head_dim: int,
    backward: bool,
    table: CostTable | None = None,
) -> Route:
    """The route of one call with (H, 3) int64 CPU windows (see the module docstring).

    Args:
        window: (H, 3) windows in tiles, already validated (``normalize_window``).
        canvas, tile: the call's token canvas and tile.
        head_dim: D of q, k, v (the table is measured per head dim).
        backward: the call's backward will run too (training), so costs add forward and
            backward; otherwise forward only (sampling).
        table: measured costs, or None (mixed layers then stay on STA).
    """
    covers = covering_heads(window, canvas, tile)
    if bool(covers.all()):
        return DENSE
    if not bool(covers.any()) or table is None:
        return STA
    entry = table.entry(canvas, tile, head_dim)
    if entry is None:
        return STA
    triples = [tuple(w) for w in window.tolist()]
    sta_costs = [entry.sta_ms(window_density(canvas, tile, w), backward) for w in triples]
    dense = [h for h, c in enumerate(covers.tolist()) if c]
    sparse = [h for h, c in enumerate(covers.tolist()) if not c]
    passes = 2.0 if backward else 1.0
    split = (
        len(dense) * entry.dense_ms(backward)
        + sum(sta_costs[h] for h in sparse)
        + len(triples) * entry.split_ms * passes
    )
    if split < sum(sta_costs):
        return Route("split", tuple(dense), tuple(sparse))
    return STA


def load_cost_table(path: str | Path | None) -> CostTable | None:
    """The table at ``path`` (``attention.cost_table``), or None without a path."""
    if path is None:
        return None
    try:
        return CostTable.load(path)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"attention.cost_table={str(path)!r} is not a readable cost table: {err}"
        ) from err
