"""``SearchConfig``: the settings of the training-free per-head window search (group ``search``).

A Hydra/OmegaConf structured config (plain types, lists not tuples, ``typing.Optional``); it
validates itself in ``__post_init__`` with messages naming the field (``search.budget``).
Checks that need the canvas (a candidate wider than the tile grid, a budget below the
sparsest candidate) run when the search starts, also naming the field.
"""

# OmegaConf 2.3 structured configs understand typing.Optional, not PEP 604 unions.
# ruff: noqa: UP045
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

SEARCH_MODES = ("threshold", "budget")
# ``auto`` resolves to one of SEARCH_MODES when the config is built (see ``SearchConfig.mode``).
MODE_CHOICES = ("auto", *SEARCH_MODES)
SEARCH_METRICS = ("rel_l2", "rel_l1")


@dataclass
class SearchConfig:
    """How candidate windows are scored and chosen.

    Attributes:
        mode: ``threshold`` (per (step, layer, head), the sparsest candidate whose error is
            within ``threshold`` of the best candidate's), ``budget`` (the windows with the
            least total error whose mean density stays within ``budget``) or ``auto``
            (``budget`` when ``budget`` is set, else ``threshold``; resolved in place when the
            config is built, so ``mode`` always reads ``threshold`` or ``budget`` afterwards).
        threshold: additive tolerance of ``threshold`` mode on ``metric``: candidate ``c`` is
            acceptable iff ``err(c) <= min_c' err(c') + threshold``.
        budget: ``budget`` mode's ceiling on the mean attended fraction of video query/key
            pairs over the searched (not forced-dense) (step, layer, head) entries, in (0, 1].
        metric: the error that selection minimises: ``rel_l2`` (``||o_c - o||_2 / ||o||_2``)
            or ``rel_l1`` (``||o_c - o||_1 / ||o||_1``), per head over the video query rows,
            averaged over calibration samples. Both are always recorded.
        steps: Euler steps of the calibration sampler; the strategy has one window table per
            step, so sample with the same number of steps.
        shift: timestep shift of the schedule (``stafinetune.diffusion.sampling.flow_sigmas``), >= 1.
        dense_first_steps: the first steps keep the full window (as the STA paper does);
            they are not evaluated and do not count towards ``budget``.
        candidates: windows in tiles, e.g. ``[[3, 3, 3], [1, 4, 4]]``; ``None`` derives a set
            from the canvas's tile grid (``default_candidates``). The full window is always
            added (forced-dense steps use it; it is the zero-error reference).
        density_levels: target densities of the derived candidate set (ignored when
            ``candidates`` is given), each in (0, 1).
        candidate_batch: candidates evaluated per kernel call, stacked along the head axis
            (more uses more memory and fewer, larger launches).
        seed: seed of the calibration noise (and, in ``stafinetune-search``, of the draw of
            calibration samples from the data).
        num_samples: calibration samples ``stafinetune-search`` draws from the data (the
            library functions search whatever batches they are given).
        batch_size: calibration samples per forward in ``stafinetune-search``.
    """

    mode: str = "auto"
    threshold: float = 0.05
    budget: Optional[float] = None
    metric: str = "rel_l2"
    steps: int = 20
    shift: float = 1.0
    dense_first_steps: int = 0
    candidates: Optional[list[list[int]]] = None
    density_levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])
    candidate_batch: int = 1
    seed: int = 0
    num_samples: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODE_CHOICES:
            raise ValueError(f"search.mode must be one of {MODE_CHOICES}, got {self.mode!r}")
        if self.mode == "auto":
            self.mode = "threshold" if self.budget is None else "budget"
        if self.metric not in SEARCH_METRICS:
            raise ValueError(f"search.metric must be one of {SEARCH_METRICS}, got {self.metric!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"search.threshold must be a finite number >= 0, got {self.threshold}")
        if self.mode == "budget":
            if self.budget is None:
                raise ValueError("search.budget must be set when search.mode=budget (e.g. 0.15)")
            if not (0 < self.budget <= 1):
                raise ValueError(f"search.budget must lie in (0, 1], got {self.budget}")
        elif self.budget is not None:
            raise ValueError(
                f"search.budget={self.budget} is only used in budget mode, but "
                "search.mode=threshold (set search.mode=budget or auto, or search.budget=null)"
            )
        _check_int(self.steps, "search.steps", 1)
        if not (math.isfinite(self.shift) and self.shift >= 1):
            raise ValueError(f"search.shift must be >= 1, got {self.shift}")
        _check_int(self.dense_first_steps, "search.dense_first_steps", 0)
        if self.dense_first_steps >= self.steps:
            raise ValueError(
                f"search.dense_first_steps={self.dense_first_steps} leaves no step to search "
                f"(search.steps={self.steps}); it must be < search.steps"
            )
        if self.candidates is not None:
            if len(self.candidates) == 0:
                raise ValueError(
                    "search.candidates must be null (derive from the tile grid) or a non-empty "
                    "list of [wt, wh, ww] windows"
                )
            for i, window in enumerate(self.candidates):
                _check_window(window, f"search.candidates[{i}]")
        if len(self.density_levels) == 0:
            raise ValueError("search.density_levels must be a non-empty list of numbers in (0, 1)")
        for i, level in enumerate(self.density_levels):
            if not (0 < float(level) < 1):
                raise ValueError(f"search.density_levels[{i}] must lie in (0, 1), got {level}")
        _check_int(self.candidate_batch, "search.candidate_batch", 1)
        _check_int(self.seed, "search.seed", 0)
        _check_int(self.num_samples, "search.num_samples", 1)
        _check_int(self.batch_size, "search.batch_size", 1)


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_window(value: object, name: str) -> None:
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{name} must be a window of 3 ints >= 1 (in tiles), got {value!r}")
