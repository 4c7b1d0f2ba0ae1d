"""``search_windows``: score the candidates on calibration data, choose windows, build a strategy.

``search_windows = select_windows(evaluate_candidates(...))``. The two halves are public so a
sequence-parallel run can score each rank's heads (``evaluate_candidates(heads=...)``), gather
the error tables along the head axis and select once over all heads (the budget is global).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sta_kernels import num_tiles
from stafinetune.models.dit import VideoDiT
from stafinetune.models.experts import ExpertDiT, expert_steps
from stafinetune.models.strategy import MaskStrategy
from stafinetune.parallel.sequence import gather_along

from .config import SearchConfig
from .report import build_report
from .scoring import CandidateErrors, evaluate_candidates
from .select import select_budget, select_threshold


@dataclasses.dataclass
class SearchResult:
    """The outcome of a window search.

    Attributes:
        strategy: the mask strategy (per-step windows and step-independent ``train_windows``).
        errors: ``{"rel_l2", "rel_l1"}`` -> (steps, L, H, C) float64 mean errors per (step,
            layer, head, candidate); NaN at the forced-dense steps.
        candidates: (C, 3) int64 windows in tiles; densities: (C,) float64.
        choice: (steps, L, H) int64 chosen candidate per (step, layer, head).
        train_choice: (L, H) int64 chosen step-independent candidate per (layer, head).
        config: the settings used.
        report: summary (densities per step and layer, predicted speedup, error per head...);
            ``write_report`` writes it.
        strategy_2: a two-expert model's low-noise expert's strategy (``transformer_2``): the
            same per-step windows (each step's were searched on the expert that runs it), its
            own ``train_windows`` chosen on its steps; ``strategy`` is then the high-noise
            expert's. None for one transformer.
    """

    strategy: MaskStrategy
    errors: dict[str, torch.Tensor]
    candidates: torch.Tensor
    densities: torch.Tensor
    choice: torch.Tensor
    train_choice: torch.Tensor
    config: SearchConfig
    report: dict[str, Any]
    strategy_2: MaskStrategy | None = None


def _choose(errors: torch.Tensor, densities: torch.Tensor, cfg: SearchConfig) -> torch.Tensor:
    """Apply ``cfg``'s rule to an (..., C) error table; (...,) candidate indices."""
    if cfg.mode == "threshold":
        return select_threshold(errors, densities, cfg.threshold)
    assert cfg.budget is not None  # SearchConfig guarantees it in budget mode
    flat = select_budget(errors.reshape(-1, errors.shape[-1]), densities, cfg.budget)
    return flat.reshape(errors.shape[:-1])


def select_windows(
    measured: CandidateErrors,
    cfg: SearchConfig,
    *,
    metadata: Mapping[str, Any] | None = None,
    train_steps: Sequence[int] | None = None,
) -> SearchResult:
    """Choose every (step, layer, head)'s window and a step-independent one per (layer, head).

    Per-step windows: the first ``cfg.dense_first_steps`` steps take the full window; the rest
    follow ``cfg.mode`` on ``cfg.metric``, the budget counting only those searched entries.
    Training windows (``train_windows``): the same rule applied to each (layer, head)'s errors
    averaged over the searched steps (so they are candidates themselves, which a per-axis
    maximum over steps need not be; in budget mode their mean density also meets the budget).

    Args:
        measured: ``evaluate_candidates``' output covering every head of the model.
        cfg: the search settings (the same ones ``measured`` was evaluated with).
        metadata: extra JSON-serialisable facts for the strategy (e.g. ``{"model": flavor}``).
        train_steps: the steps whose errors choose the training windows (one expert's steps
            of a two-expert model); default every searched step.
    Returns:
        the ``SearchResult``.
    """
    if measured.heads != list(range(measured.num_heads)):
        raise ValueError(
            f"select_windows needs the errors of all {measured.num_heads} heads, got heads "
            f"{measured.heads}; gather the ranks' errors along the head axis first"
        )
    dense_first = cfg.dense_first_steps
    err = measured.errors[cfg.metric]  # (steps, L, H, C)
    if err.shape[0] != cfg.steps:
        raise ValueError(f"the errors hold {err.shape[0]} steps but search.steps={cfg.steps}")
    if torch.isnan(err[dense_first:]).any():
        raise ValueError(
            f"search.dense_first_steps={dense_first} selects steps that were not scored; select "
            "with the dense_first_steps the errors were evaluated with (or a larger one)"
        )
    full = measured.candidates.tolist().index(list(num_tiles(measured.canvas, measured.tile)))
    choice = torch.full(err.shape[:-1], full, dtype=torch.int64)  # (steps, L, H)
    choice[dense_first:] = _choose(err[dense_first:], measured.densities, cfg)
    steps = [i for i in (range(cfg.steps) if train_steps is None else train_steps)
             if i >= dense_first]  # fmt: skip
    if not steps:
        raise ValueError(
            f"no searched step is left to choose training windows from (steps {list(train_steps or [])}"
            f", search.dense_first_steps={dense_first}): raise search.steps or lower "
            "search.dense_first_steps"
        )
    train_choice = _choose(err[steps].mean(dim=0), measured.densities, cfg)  # (L, H)
    report = build_report(measured, cfg, choice, train_choice)
    info = {
        "search": {
            "mode": cfg.mode,
            "metric": cfg.metric,
            "threshold": cfg.threshold if cfg.mode == "threshold" else None,
            "budget": cfg.budget,
            "steps": cfg.steps,
            "shift": cfg.shift,
            "dense_first_steps": dense_first,
            "seed": cfg.seed,
            "calibration_samples": measured.num_samples,
            "density": report["density"],
        },
        **dict(metadata or {}),
    }
    strategy = MaskStrategy.from_tensor(
        measured.candidates[choice],
        canvas=measured.canvas,
        tile=measured.tile,
        candidates=measured.candidates.tolist(),
        train_windows=measured.candidates[train_choice],
        metadata=info,
    )
    return SearchResult(
        strategy=strategy,
        errors=measured.errors,
        candidates=measured.candidates,
        densities=measured.densities,
        choice=choice,
        train_choice=train_choice,
        config=cfg,
        report=report,
    )


def search_windows(
    dit: VideoDiT,
    calibration: Sequence[Mapping[str, Any]],
    cfg: SearchConfig,
    *,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Training-free per-head STA window search on calibration batches.

    Runs the dense Euler sampler over ``calibration`` (``evaluate_candidates``), scores every
    candidate window for every (step, layer, head) against dense attention, and chooses the
    windows with ``cfg``'s rule (``select_windows``).

    Args:
        dit: the model (any attention config; it runs dense during the search, tile and
            backend come from ``dit.attention_cfg``).
        calibration: batches with ``latents`` (B, C, T, H, W) (shape only), ``text``
            (B, L, Dt), ``text_mask`` (B, L) bool, ``pooled_text`` (B, Dp); one latent shape.
        cfg: the search settings.
        progress: show a progress bar over the denoising steps.
        metadata: extra facts stored in the strategy's metadata (e.g. the model flavor).
    Under sequence parallelism (``dit.attention.sp`` set by ``parallel.sequence_split``) each
    rank scores its own heads on the whole sequence and the error tables are gathered over
    heads, so every rank selects the same windows.

    Returns:
        the ``SearchResult``; ``write_report(result, out_dir)`` writes it.
    """
    if isinstance(dit, ExpertDiT):  # each expert's training windows from its own steps
        measured = evaluate_candidates(dit, calibration, cfg, progress=progress)
        steps = expert_steps(dit, measured.sigmas[:-1].tolist())
        for folder, owned in steps.items():
            if not owned:
                raise ValueError(
                    f"no step of the search (search.steps={cfg.steps}, search.shift={cfg.shift}) "
                    f"falls in the noise range of {folder}: search more steps"
                )
        result = select_windows(measured, cfg, metadata=metadata, train_steps=steps["transformer"])
        low = select_windows(measured, cfg, metadata=metadata, train_steps=steps["transformer_2"])
        result.strategy_2 = low.strategy
        return result
    sp = getattr(dit.attention, "sp", None)
    if sp is None:
        measured = evaluate_candidates(dit, calibration, cfg, progress=progress)
    else:
        heads = sp.heads(dit.num_heads)
        measured = evaluate_candidates(
            dit, calibration, cfg, heads=list(range(heads.start, heads.stop)), progress=progress
        )
        measured = dataclasses.replace(
            measured,
            errors={m: gather_along(e, 2, sp.group) for m, e in measured.errors.items()},
            heads=list(range(dit.num_heads)),
        )
    return select_windows(measured, cfg, metadata=metadata)
