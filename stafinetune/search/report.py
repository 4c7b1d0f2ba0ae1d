"""The search's report: a JSON summary, a markdown page and a heatmap of the chosen windows.

Density is the fraction of video query/key token pairs a window attends; the predicted
attention speedup is dense pairs / attended pairs, i.e. ``1 / mean density`` over the entries
it summarises (a harmonic mean of per-entry speedups: time adds up, speedups do not). With
joint text (HunyuanVideo) a second figure counts the text pairs, which STA always attends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sta_kernels import num_tiles

from .config import SearchConfig
from .scoring import CandidateErrors

if TYPE_CHECKING:
    from .search import SearchResult

STRATEGY_FILE = "mask_strategy.json"
STRATEGY_FILE_2 = "mask_strategy_2.json"  # a two-expert model's low-noise expert
REPORT_FILE = "search_report.json"
ERRORS_FILE = "search_errors.json"
MARKDOWN_FILE = "search_report.md"
HEATMAP_FILE = "window_heatmap.png"
# Cells annotated with their window in the heatmap up to this many (layer, head) cells.
MAX_ANNOTATED_CELLS = 256


def _num(x: float) -> float | None:
    """A JSON-safe float (None for NaN), rounded to 6 significant digits."""
    x = float(x)
    return None if math.isnan(x) else float(f"{x:.6g}")


def _nested(t: torch.Tensor) -> Any:
    """A float tensor as nested lists of JSON-safe floats."""

    def clean(x: Any) -> Any:
        return [clean(v) for v in x] if isinstance(x, list) else _num(x)

    return clean(t.tolist())


def describe_rule(cfg: SearchConfig) -> str:
    """One sentence stating the selection rule exactly as applied."""
    if cfg.mode == "threshold":
        return (
            f"per (step, layer, head): the lowest-density candidate c with {cfg.metric}(c) <= "
            f"min over candidates of {cfg.metric} + {cfg.threshold} (ties: lower error)"
        )
    return (
        f"least total {cfg.metric} over the searched (step, layer, head) entries with their mean "
        f"density <= {cfg.budget} (Lagrangian relaxation, bisection on the multiplier, greedy fill)"
    )


def build_report(
    measured: CandidateErrors, cfg: SearchConfig, choice: torch.Tensor, train_choice: torch.Tensor
) -> dict[str, Any]:
    """Summarise a search.

    Args:
        measured: the candidate errors (all heads).
        cfg: the search settings.
        choice: (steps, L, H) chosen candidate indices.
        train_choice: (L, H) chosen step-independent candidate indices.
    Returns:
        a JSON-serialisable dict (``search_report.json``).
    """
    dens = measured.densities  # (C,)
    err = measured.errors[cfg.metric]  # (steps, L, H, C)
    first = cfg.dense_first_steps
    chosen_density = dens[choice]  # (steps, L, H)
    chosen_err = err.gather(-1, choice[..., None]).squeeze(-1)  # (steps, L, H), NaN when forced
    mean_err = err[first:].mean(dim=0)  # (L, H, C) over the searched steps
    train_err = mean_err.gather(-1, train_choice[..., None]).squeeze(-1)  # (L, H)
    density = {
        "searched_steps": float(chosen_density[first:].mean()),
        "all_steps": float(chosen_density.mean()),
        "train": float(dens[train_choice].mean()),
    }
    num_video = math.prod(measured.canvas)
    text = measured.mean_text_len

    def speedup_with_text(d: float) -> float:
        joint = (num_video + text) ** 2
        return joint / (d * num_video**2 + 2 * num_video * text + text**2)

    searched_counts = torch.bincount(choice[first:].flatten(), minlength=len(dens))  # (C,)
    train_counts = torch.bincount(train_choice.flatten(), minlength=len(dens))  # (C,)
    report: dict[str, Any] = {
        "canvas": list(measured.canvas),
        "tile": list(measured.tile),
        "num_tiles": list(num_tiles(measured.canvas, measured.tile)),
        "mode": cfg.mode,
        "rule": describe_rule(cfg),
        "metric": cfg.metric,
        "threshold": cfg.threshold if cfg.mode == "threshold" else None,
        "budget": cfg.budget,
        "steps": cfg.steps,
        "shift": cfg.shift,
        "dense_first_steps": first,
        "sigmas": [_num(s) for s in measured.sigmas[:-1]],
        "calibration": {"samples": measured.num_samples, "mean_text_len": _num(text)},
        "candidates": [
            {
                "window": w,
                "density": _num(d),
                "speedup": _num(1 / d),
                "chosen": int(n),
                "train_chosen": int(m),
            }
            for w, d, n, m in zip(
                measured.candidates.tolist(),
                dens.tolist(),
                searched_counts,
                train_counts,
                strict=True,
            )
        ],
        "density": {k: _num(v) for k, v in density.items()},
        "predicted_attention_speedup": {k: _num(1 / v) for k, v in density.items()},
        "predicted_attention_speedup_with_text": (
            {k: _num(speedup_with_text(v)) for k, v in density.items()} if text > 0 else None
        ),
        "total_error": _num(chosen_err[first:].sum()),
        "density_per_step": [_num(d) for d in chosen_density.mean(dim=(1, 2))],
        "error_per_step": [_num(e) for e in chosen_err.mean(dim=(1, 2))],
        "density_per_layer": [_num(d) for d in chosen_density[first:].mean(dim=(0, 2))],
        "density_per_head": _nested(chosen_density[first:].mean(dim=0)),
        "error_per_head": _nested(chosen_err[first:].mean(dim=0)),
        "train_windows": measured.candidates[train_choice].tolist(),
        "train_density_per_head": _nested(dens[train_choice]),
        "train_error_per_head": _nested(train_err),
    }
    return report


def format_markdown(report: dict[str, Any]) -> str:
    """The markdown summary of a ``build_report`` dict."""
    setting = (
        f"threshold {report['threshold']}"
        if report["mode"] == "threshold"
        else f"budget {report['budget']}"
    )
    lines = [
        "# STA window search",
        "",
        f"- canvas {report['canvas']} tokens, tile {report['tile']} -> {report['num_tiles']} tiles",
        f"- mode `{report['mode']}` ({setting}), metric `{report['metric']}`",
        f"- rule: {report['rule']}",
        f"- {report['steps']} Euler steps, shift {report['shift']}, first "
        f"{report['dense_first_steps']} dense; {report['calibration']['samples']} calibration samples",
        "",
        "| entries | density | predicted attention speedup |",
        "| --- | --- | --- |",
    ]
    names = {
        "searched_steps": "searched steps",
        "all_steps": "all steps (forced-dense included)",
        "train": "train windows",
    }
    for key, name in names.items():
        lines.append(
            f"| {name} | {report['density'][key]:.4f} | {report['predicted_attention_speedup'][key]:.2f}x |"
        )
    timing = report.get("timing")  # added by the stafinetune-search command
    if timing is not None:
        lines += [
            "",
            f"Search time: {timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} s CPU "
            f"({timing['device']}, {timing['torch_threads']} torch threads).",
        ]
    with_text = report["predicted_attention_speedup_with_text"]
    if with_text is not None:
        lines += [
            "",
            f"Counting the joint text pairs (mean {report['calibration']['mean_text_len']} valid text "
            f"tokens, always attended): {with_text['searched_steps']:.2f}x on the searched steps, "
            f"{with_text['all_steps']:.2f}x over all steps.",
        ]
    lines += [
        "",
        "## Candidates",
        "",
        "| window | density | speedup | chosen (step, layer, head) | chosen as train window |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in report["candidates"]:
        lines.append(
            f"| {c['window']} | {c['density']:.4f} | {c['speedup']:.2f}x | {c['chosen']} | {c['train_chosen']} |"
        )
    lines += [
        "",
        "## Per step",
        "",
        f"| step | sigma | density | mean {report['metric']} |",
        "| --- | --- | --- | --- |",
    ]
    for i, (sigma, d, e) in enumerate(
        zip(report["sigmas"], report["density_per_step"], report["error_per_step"], strict=True)
    ):
        err = "dense" if e is None else f"{e:.4f}"
        lines.append(f"| {i} | {sigma:.4f} | {d:.4f} | {err} |")
    lines += ["", "## Per layer (searched steps)", "", "| layer | density |", "| --- | --- |"]
    for i, d in enumerate(report["density_per_layer"]):
        lines.append(f"| {i} | {d:.4f} |")
    heads = len(report["error_per_head"][0])
    header = "| layer | " + " | ".join(f"h{h}" for h in range(heads)) + " |"
    rule = "| --- |" + " --- |" * heads
    lines += [
        "",
        f"## Error per head: mean {report['metric']} of the chosen windows over the searched steps",
        "",
        header,
        rule,
    ]
    for i, row in enumerate(report["error_per_head"]):
        lines.append(f"| {i} | " + " | ".join(f"{e:.4f}" for e in row) + " |")
    lines += ["", "## Train windows (step-independent) and their mean error", "", header, rule]
    for i, (wins, errs) in enumerate(
        zip(report["train_windows"], report["train_error_per_head"], strict=True)
    ):
        cells = " | ".join(f"{w} {e:.4f}" for w, e in zip(wins, errs, strict=True))
        lines.append(f"| {i} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_heatmap(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a PNG: layers x heads, colour = density; left the mean over the searched steps,
    right the step-independent train windows (annotated with their window when small)."""
    from matplotlib.figure import Figure

    per_step = torch.tensor(report["density_per_head"])  # (L, H)
    train = torch.tensor(report["train_density_per_head"])  # (L, H)
    layers, heads = per_step.shape
    width = min(4 + 2 * 0.45 * heads, 30)
    height = min(2 + 0.35 * layers, 30)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=True)
    titles = ("mean density over the searched steps", "train window density")
    for ax, grid, title in zip(axes, (per_step, train), titles, strict=True):
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
    if layers * heads <= MAX_ANNOTATED_CELLS:
        for li, row in enumerate(report["train_windows"]):
            for hi, window in enumerate(row):
                light = float(train[li, hi]) < 0.6
                axes[1].text(
                    hi,
                    li,
                    "\n".join(str(w) for w in window),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if light else "black",
                )
    fig.colorbar(image, ax=list(axes), label="density (attended / dense video pairs)")
    fig.suptitle(
        f"STA windows: canvas {report['canvas']}, tile {report['tile']}, {report['mode']} mode"
    )
    fig.savefig(path, dpi=100)


def write_report(result: SearchResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the search outputs into ``out_dir`` (created if missing).

    Files: ``mask_strategy.json`` (``MaskStrategy``, loads with ``attention.strategy_path``),
    for a two-expert model also ``mask_strategy_2.json`` (``attention.strategy_path_2``),
    ``search_report.json`` (the summary), ``search_errors.json`` (the full (steps, L, H, C)
    error tables, null at forced-dense steps), ``search_report.md`` and ``window_heatmap.png``.

    Returns:
        the written paths by kind: ``strategy``, ``report``, ``errors``, ``markdown``, ``heatmap``
        (and ``strategy_2``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "strategy": out / STRATEGY_FILE,
        "report": out / REPORT_FILE,
        "errors": out / ERRORS_FILE,
        "markdown": out / MARKDOWN_FILE,
        "heatmap": out / HEATMAP_FILE,
    }
    result.strategy.save(paths["strategy"])
    if result.strategy_2 is not None:
        paths["strategy_2"] = out / STRATEGY_FILE_2
        result.strategy_2.save(paths["strategy_2"])
    with open(paths["report"], "w", encoding="utf-8") as f:
        json.dump(result.report, f, indent=1)
        f.write("\n")
    errors = {
        "shape": ["step", "layer", "head", "candidate"],
        "candidates": result.candidates.tolist(),
        **{metric: _nested(table) for metric, table in result.errors.items()},
    }
    with open(paths["errors"], "w", encoding="utf-8") as f:
        json.dump(errors, f)
        f.write("\n")
    paths["markdown"].write_text(format_markdown(result.report), encoding="utf-8")
    plot_heatmap(result.report, paths["heatmap"])
    return paths
