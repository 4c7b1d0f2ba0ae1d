"""Resolve an ``AttentionConfig`` into the windows every layer and head uses at each step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sta_kernels import num_tiles

from .config import AttentionConfig
from .strategy import MaskStrategy


@dataclass
class WindowPlan:
    """Windows of every STA layer and head, step-independent and (optionally) per step.

    Attributes:
        train: (L, H, 3) int64 windows for ``step_index=None``; ``None`` means dense.
        steps: (num_steps, L, H, 3) int64 per-step windows from a strategy file, or ``None``;
            a strategy of one step applies at every step.
        dense_first_steps: steps ``< dense_first_steps`` run dense.
        source: the config field the windows came from (for error messages).
        canvas: the token canvas a strategy file was searched for, if any.
        canvases: every canvas a strategy file's windows are meant for (its ``canvas`` and
            ``metadata.canvases``); empty without a strategy file.
    """

    train: torch.Tensor | None
    steps: torch.Tensor | None = None
    dense_first_steps: int = 0
    source: str = "attention.window"
    canvas: tuple[int, int, int] | None = None
    canvases: tuple[tuple[int, int, int], ...] = ()

    def check_run_canvases(self, canvases: Sequence[Sequence[int]], run: str) -> None:
        """Raise ValueError naming the strategy file, its canvas and the run's canvases when
        a strategy file was made for none of ``canvases`` (what ``run`` trains or samples,
        e.g. ``"this run trains on"``); plans without a strategy file pass."""
        if not self.canvases or any(tuple(c) in self.canvases for c in canvases):
            return
        ours = ", ".join(str(list(c)) for c in canvases)
        theirs = " / ".join(str(list(c)) for c in self.canvases)
        raise ValueError(
            f"{self.source} holds windows for canvas {theirs} but {run} canvas {ours}; search "
            "windows for this canvas (stafinetune-search with the same model and data) or "
            "leave attention.strategy_path unset"
        )

    def windows_for_step(self, step_index: int | None) -> torch.Tensor | None:
        """(L, H, 3) windows for denoising step ``step_index`` (None: training), or None (dense)."""
        if self.train is None:
            return None
        if step_index is None:
            return self.train
        if step_index < 0:
            raise ValueError(f"step_index must be >= 0, got {step_index}")
        if step_index < self.dense_first_steps:
            return None
        if self.steps is None:
            return self.train
        if self.steps.shape[0] == 1:  # a step-independent strategy (what training exports)
            return self.steps[0]
        if step_index >= self.steps.shape[0]:
            raise ValueError(
                f"step_index={step_index} but the mask strategy ({self.source}) has "
                f"{self.steps.shape[0]} steps"
            )
        return self.steps[step_index]

    def check_canvas(self, canvas: tuple[int, int, int], tile: tuple[int, int, int]) -> None:
        """Strict mode (``attention.strict_window``): raise if a window is wider than ``canvas``'s
        tile grid, or if a strategy file was searched for another canvas."""
        if self.canvas is not None and tuple(canvas) != tuple(self.canvas):
            raise ValueError(
                f"{self.source} was searched for canvas {list(self.canvas)} but this forward's "
                f"canvas is {list(canvas)} (attention.strict_window is on)"
            )
        tiles = torch.tensor(num_tiles(canvas, tile))
        for windows in (self.train, self.steps):
            if windows is None:
                continue
            too_wide = (windows > tiles).any(dim=-1)
            if too_wide.any():
                where = too_wide.nonzero()[0].tolist()
                raise ValueError(
                    f"{self.source}: window {windows[tuple(where)].tolist()} at index {where} is "
                    f"wider than the tile grid {tiles.tolist()} of canvas {list(canvas)} with tile "
                    f"{list(tile)} (attention.strict_window is on)"
                )


def strategy_plan(strategy: MaskStrategy, dense_first_steps: int, source: str) -> WindowPlan:
    """The plan of a loaded (validated) mask strategy; ``source`` names it in errors."""
    return WindowPlan(
        train=strategy.train_tensor(),
        steps=strategy.step_tensor(),
        dense_first_steps=int(dense_first_steps),
        source=source,
        canvas=tuple(strategy.canvas),  # type: ignore[arg-type]
        canvases=tuple(strategy.canvases()),
    )


def build_window_plan(cfg: AttentionConfig, num_layers: int, num_heads: int) -> WindowPlan:
    """Resolve ``cfg`` for a model with ``num_layers`` STA layers of ``num_heads`` heads.

    Precedence: ``strategy_path`` > ``head_windows`` > ``layer_windows`` > ``window``.
    Raises ``ValueError`` naming the field whose shape does not fit the model.
    """
    if cfg.mode == "full":
        return WindowPlan(train=None, source="attention.mode")
    dense_first = int(cfg.dense_first_steps)
    if cfg.strategy_path is not None:
        strategy = MaskStrategy.load(cfg.strategy_path, num_layers, num_heads)
        if list(strategy.tile) != list(cfg.tile):
            raise ValueError(
                f"attention.tile {list(cfg.tile)} differs from the tile {strategy.tile} of the mask "
                f"strategy {cfg.strategy_path}; windows are counted in tiles, so they must match"
            )
        return strategy_plan(
            strategy, dense_first, source=f"attention.strategy_path={cfg.strategy_path}"
        )
    if cfg.head_windows is not None:
        windows = torch.tensor(
            [[list(w) for w in layer] for layer in cfg.head_windows], dtype=torch.int64
        )
        if windows.shape[:2] != (num_layers, num_heads):
            raise ValueError(
                f"attention.head_windows must be {num_layers} layers x {num_heads} heads for this "
                f"model, got {windows.shape[0]} x {windows.shape[1]}"
            )
        return WindowPlan(
            train=windows, dense_first_steps=dense_first, source="attention.head_windows"
        )
    if cfg.layer_windows is not None:
        windows = torch.tensor([list(w) for w in cfg.layer_windows], dtype=torch.int64)
        if windows.shape[0] != num_layers:
            raise ValueError(
                f"attention.layer_windows must give {num_layers} windows (one per STA layer), "
                f"got {windows.shape[0]}"
            )
        return WindowPlan(
            train=windows[:, None, :].expand(num_layers, num_heads, 3).contiguous(),
            dense_first_steps=dense_first,
            source="attention.layer_windows",
        )
    window = torch.tensor(list(cfg.window), dtype=torch.int64)
    return WindowPlan(
        train=window.expand(num_layers, num_heads, 3).contiguous(),
        dense_first_steps=dense_first,
        source="attention.window",
    )
