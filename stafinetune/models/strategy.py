"""The mask-strategy file: STA windows per (denoising step, layer, head).

The mask search writes it, the model adapters read it (per-step windows at inference via
``step_index``; a step-independent window per (layer, head) in training). JSON layout,
``version`` 1::

    {
      "format": "stafinetune.mask_strategy",
      "version": 1,
      "canvas": [T, Hc, Wc],            # latent token grid the search ran on
      "tile": [tt, th, tw],             # tile shape in tokens; windows are in these tiles
      "candidates": [[wt, wh, ww], ...],# the window set searched; every window is one of them
      "windows": [[[[wt, wh, ww], ...   # [step][layer][head] -> window
      "train_windows": [[[wt, wh, ww], ...]] | null,  # [layer][head]; default: per-axis max
      "metadata": {...}                 # free-form (model, search settings, scores)
    }

Every window must be one of the candidates and fit the canvas's tile grid
(``1 <= w <= ceil(canvas / tile)`` per axis). Canvas and tile axes are at most
:data:`MAX_AXIS` tokens (no video comes near; a larger value is a corrupt or forged file).
``metadata.canvases``, when present, lists further canvases the windows are meant for (a
trained student's export: every canvas it was trained on); the commands refuse a strategy
whose canvases do not include the one they train or sample
(:meth:`~stafinetune.models.windows.WindowPlan.check_run_canvases`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from sta_kernels import num_tiles
from sta_kernels.geometry import as_triple
from stafinetune.safety import load_json_file

FORMAT = "stafinetune.mask_strategy"
VERSION = 1
MAX_AXIS = 1 << 16  # tokens per canvas or tile axis


class StrategyError(ValueError):
    """A mask-strategy file or object that does not satisfy the schema."""


def _triple(value: Any, where: str, limit: int | None = None) -> list[int]:
    try:
        triple = list(as_triple(value, where))
    except ValueError as err:
        raise StrategyError(str(err)) from None
    if limit is not None and max(triple) > limit:
        raise StrategyError(f"{where} {triple} is beyond any video (at most {limit} per axis)")
    return triple


@dataclass
class MaskStrategy:
    """STA windows for every (denoising step, layer, head), with the canvas/tile they fit.

    Attributes:
        canvas: (T, Hc, Wc) latent token grid.
        tile: (tt, th, tw) tile shape in tokens.
        candidates: the candidate windows (in tiles) the search chose from.
        windows: ``windows[step][layer][head] = [wt, wh, ww]``.
        train_windows: optional ``[layer][head]`` windows for training (``step_index=None``);
            when absent the per-axis maximum over steps is used (covers every step's window).
        metadata: free-form JSON-serialisable information.
    """

    canvas: list[int]
    tile: list[int]
    candidates: list[list[int]]
    windows: list[list[list[list[int]]]]
    train_windows: list[list[list[int]]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    @property
    def num_steps(self) -> int:
        return len(self.windows)

    @property
    def num_layers(self) -> int:
        return len(self.windows[0]) if self.windows else 0

    @property
    def num_heads(self) -> int:
        return len(self.windows[0][0]) if self.windows and self.windows[0] else 0

    def validate(
        self,
        num_layers: int | None = None,
        num_heads: int | None = None,
        source: str = "mask strategy",
    ) -> MaskStrategy:
        """Check the schema (and the model's layer/head counts if given); return ``self``.

        Raises:
            StrategyError naming ``source`` and the offending entry.
        """
        if self.version != VERSION:
            raise StrategyError(f"{source}: version must be {VERSION}, got {self.version!r}")
        canvas = _triple(self.canvas, f"{source}: canvas", MAX_AXIS)
        tile = _triple(self.tile, f"{source}: tile", MAX_AXIS)
        tiles = list(num_tiles(canvas, tile))
        if not isinstance(self.candidates, list) or not self.candidates:
            raise StrategyError(f"{source}: candidates must be a non-empty list of windows")
        allowed = set()
        for i, cand in enumerate(self.candidates):
            w = _triple(cand, f"{source}: candidates[{i}]")
            if any(a > n for a, n in zip(w, tiles, strict=True)):
                raise StrategyError(
                    f"{source}: candidates[{i}] = {w} is wider than the tile grid {tiles} "
                    f"(canvas {canvas}, tile {tile})"
                )
            allowed.add(tuple(w))
        if not isinstance(self.windows, list) or not self.windows:
            raise StrategyError(f"{source}: windows must be a non-empty [step][layer][head] list")
        layers = num_layers if num_layers is not None else self.num_layers
        heads = num_heads if num_heads is not None else self.num_heads
        if layers < 1 or heads < 1:
            raise StrategyError(f"{source}: windows must hold at least one layer and one head")

        def check_grid(grid: Any, where: str) -> None:
            if not isinstance(grid, list) or len(grid) != layers:
                got = len(grid) if isinstance(grid, list) else type(grid).__name__
                raise StrategyError(f"{where} must hold {layers} layers (the model's), got {got}")
            for li, layer in enumerate(grid):
                if not isinstance(layer, list) or len(layer) != heads:
                    got = len(layer) if isinstance(layer, list) else type(layer).__name__
                    raise StrategyError(
                        f"{where}[{li}] must hold {heads} heads (the model's), got {got}"
                    )
                for hi, w in enumerate(layer):
                    w = _triple(w, f"{where}[{li}][{hi}]")
                    if tuple(w) not in allowed:
                        raise StrategyError(
                            f"{where}[{li}][{hi}] = {w} is not one of the candidates "
                            f"{sorted(allowed)}"
                        )

        for si, step in enumerate(self.windows):
            check_grid(step, f"{source}: windows[{si}]")
        if self.train_windows is not None:
            check_grid(self.train_windows, f"{source}: train_windows")
        if not isinstance(self.metadata, dict):
            raise StrategyError(
                f"{source}: metadata must be an object, got {type(self.metadata).__name__}"
            )
        extra = self.metadata.get("canvases", [])
        if not isinstance(extra, list):
            raise StrategyError(f"{source}: metadata.canvases must be a list of canvases")
        for i, other in enumerate(extra):
            _triple(other, f"{source}: metadata.canvases[{i}]", MAX_AXIS)
        return self

    def canvases(self) -> list[tuple[int, int, int]]:
        """Every canvas the windows are meant for: ``canvas`` and ``metadata.canvases``."""
        found = [tuple(self.canvas), *(tuple(c) for c in self.metadata.get("canvases", []))]
        return list(dict.fromkeys((int(t), int(h), int(w)) for t, h, w in found))

    def step_tensor(self) -> torch.Tensor:
        """(num_steps, L, H, 3) int64 windows."""
        return torch.tensor(self.windows, dtype=torch.int64)

    def train_tensor(self) -> torch.Tensor:
        """(L, H, 3) int64 step-independent windows (``train_windows`` or per-axis max)."""
        if self.train_windows is not None:
            return torch.tensor(self.train_windows, dtype=torch.int64)
        return self.step_tensor().amax(dim=0)

    @classmethod
    def from_tensor(
        cls,
        windows: torch.Tensor,
        *,
        canvas: list[int],
        tile: list[int],
        candidates: list[list[int]],
        train_windows: torch.Tensor | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> MaskStrategy:
        """Build (and validate) a strategy from a (steps, L, H, 3) int tensor of windows."""
        if windows.ndim != 4 or windows.shape[-1] != 3:
            raise StrategyError(f"windows must be (steps, L, H, 3), got {tuple(windows.shape)}")
        strategy = cls(
            canvas=[int(c) for c in canvas],
            tile=[int(t) for t in tile],
            candidates=[[int(v) for v in c] for c in candidates],
            windows=windows.to(torch.int64).tolist(),
            train_windows=None if train_windows is None else train_windows.to(torch.int64).tolist(),
            metadata=dict(metadata or {}),
        )
        return strategy.validate()

    @classmethod
    def from_plan(
        cls,
        plan: Any,
        *,
        canvas: list[int] | tuple[int, int, int],
        tile: list[int] | tuple[int, int, int],
        metadata: dict[str, Any] | None = None,
    ) -> MaskStrategy:
        """The windows of a ``WindowPlan`` (e.g. what a student was trained with) as a strategy
        for ``canvas``; windows wider than its tile grid become the whole axis."""
        if plan.train is None:
            raise StrategyError("a dense plan (attention.mode=full) has no windows to write")
        grid = torch.tensor(num_tiles(canvas, tile))
        train = torch.minimum(plan.train, grid)  # (L, H, 3)
        steps = train[None] if plan.steps is None else torch.minimum(plan.steps, grid)
        candidates = torch.unique(torch.cat([steps.reshape(-1, 3), train.reshape(-1, 3)]), dim=0)
        return cls.from_tensor(
            steps,
            canvas=list(canvas),
            tile=list(tile),
            candidates=candidates.tolist(),
            train_windows=train,
            metadata=metadata,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object written by ``save``."""
        return {
            "format": FORMAT,
            "version": self.version,
            "canvas": list(self.canvas),
            "tile": list(self.tile),
            "candidates": [list(c) for c in self.candidates],
            "windows": self.windows,
            "train_windows": self.train_windows,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Validate and write the strategy as JSON (one step per line block, human-diffable)."""
        self.validate(source=str(path))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        num_layers: int | None = None,
        num_heads: int | None = None,
    ) -> MaskStrategy:
        """Read and validate a strategy file (against the model's layer/head counts if given)."""
        source = str(path)
        if not os.path.isfile(path):
            raise StrategyError(f"mask strategy file not found: {source}")
        try:
            raw = load_json_file(path, source)
        except ValueError as err:  # bad syntax, bad UTF-8, nested too deep
            raise StrategyError(str(err)) from None
        if not isinstance(raw, dict):
            raise StrategyError(f"{source}: top level must be a JSON object")
        if raw.get("format") != FORMAT:
            raise StrategyError(f"{source}: format must be {FORMAT!r}, got {raw.get('format')!r}")
        known = {
            "format",
            "version",
            "canvas",
            "tile",
            "candidates",
            "windows",
            "train_windows",
            "metadata",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StrategyError(f"{source}: unknown keys {unknown}")
        missing = sorted({"version", "canvas", "tile", "candidates", "windows"} - set(raw))
        if missing:
            raise StrategyError(f"{source}: missing keys {missing}")
        strategy = cls(
            canvas=raw["canvas"],
            tile=raw["tile"],
            candidates=raw["candidates"],
            windows=raw["windows"],
            train_windows=raw.get("train_windows"),
            metadata=raw.get("metadata") or {},
            version=raw["version"],
        )
        return strategy.validate(num_layers, num_heads, source=source)
