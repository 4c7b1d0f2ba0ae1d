"""Figures of a run, written at its end into ``<run>/figures/``.

- :func:`plot_frame_strip`: rows of evenly spaced frames (the data clip, the teacher, the
  student before and after training: the same prompt and noise), one block per sample.
- :func:`plot_training_curves`: the training losses, the validation gaps and, where logged,
  the motion errors of the sample videos, read back from ``metrics.jsonl``.

matplotlib's object API (``Figure``, no pyplot state), so figures can be drawn from any thread
and without a display.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

FRAME_GAP = 2  # pixels between the frames of a strip

# The validation scalars drawn in the gaps panel, in this order, where logged.
GAP_KEYS = ("val/student_teacher_mse", "val/attn_mse", "val/sample_gap_mse", "val/flow_loss")
MOTION_KEYS = ("motion_direction_error_deg", "motion_speed_error")


def frame_indices(num_frames: int, count: int) -> list[int]:
    """``count`` evenly spaced frame indices from the first to the last (fewer for short videos)."""
    count = max(1, min(count, num_frames))
    return sorted({round(i) for i in np.linspace(0, num_frames - 1, count)})


def _strip(video: np.ndarray, frames: Sequence[int]) -> np.ndarray:
    """Frames of one (F, H, W, 3) uint8 video side by side, white gaps between: (H, W', 3)."""
    height = video.shape[1]
    gap = np.full((height, FRAME_GAP, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i in frames:
        parts += [video[i], gap]
    return np.concatenate(parts[:-1], axis=1)


def plot_frame_strip(
    videos: Sequence[tuple[str, torch.Tensor]],
    captions: Sequence[str],
    path: str | Path,
    *,
    frames: int = 6,
) -> Path:
    """Write a PNG: for each sample ``k`` (one block, titled with ``captions[k]``), one row
    per ``(label, videos)`` entry showing ``frames`` evenly spaced frames of ``videos[k]``.

    Args:
        videos: ``(label, (n, F, H, W, 3) uint8)`` pairs of equal shapes, top to bottom.
        captions: the ``n`` prompts.
        path: the PNG to write (its folder is created).
        frames: frames per row.
    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure

    arrays = [(label, np.asarray(v)) for label, v in videos]
    num, num_frames, height, width = arrays[0][1].shape[:4]
    if len(captions) < num:
        raise ValueError(f"{num} samples but {len(captions)} captions")
    picked = frame_indices(num_frames, frames)
    dpi = 100
    strip_w = (len(picked) * (width + FRAME_GAP) - FRAME_GAP) / dpi  # inches at 1 px per px
    row_h = height / dpi
    label_w, title_h = 1.7, 0.45
    fig = Figure(
        figsize=(
            strip_w + label_w + 0.1,
            num * (len(arrays) * (row_h + 0.06) + title_h + 0.12) + 0.2,
        ),
        dpi=dpi,
    )
    total_h = fig.get_figheight()
    top = total_h - 0.1
    for k in range(num):
        top -= title_h
        fig.text(
            label_w / fig.get_figwidth(),
            (top + 0.06) / total_h,
            "\n".join(textwrap.wrap(captions[k], width=int(strip_w * 13))),
            fontsize=8,
            va="bottom",
        )
        for r, (label, array) in enumerate(arrays):
            bottom = top - row_h
            ax = fig.add_axes(
                (label_w / fig.get_figwidth(), bottom / total_h, strip_w / fig.get_figwidth(),
                 row_h / total_h)
            )  # fmt: skip
            ax.imshow(_strip(array[k], picked), interpolation="nearest")
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            if r == len(arrays) - 1:
                ax.set_xticks(
                    [j * (width + FRAME_GAP) + width / 2 for j in range(len(picked))],
                    [f"frame {i}" for i in picked],
                    fontsize=7,
                )
                ax.tick_params(length=0, pad=2)
            else:
                ax.set_xticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            top = bottom - 0.06
        top -= 0.12  # the frame numbers under the block
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl`` -> key -> ``[(step, value)]`` sorted by step, the last value of a step
    kept (a resumed run logs its steps again); ``"nan"`` / ``"inf"`` strings become floats."""
    series: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("step", "time"):
                series.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def _plot_series(ax, series: dict[str, list[tuple[int, float]]], keys: Sequence[str]) -> bool:
    drawn = False
    for key in keys:
        points = [(s, v) for s, v in series.get(key, []) if math.isfinite(v)]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3,
                    label=key)  # fmt: skip
            drawn = True
    return drawn


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path | None:
    """Write a PNG of the run's curves from ``metrics.jsonl``: the training loss terms
    (``loss/*``), the validation gaps (:data:`GAP_KEYS`) and, when logged, the student's
    sample-video motion errors against the captions, with the teacher's as dashed lines.

    Returns:
        ``path``, or None when the file holds no loss and no validation scalar.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    series = read_metrics(metrics_path)
    losses = sorted(k for k in series if k.startswith("loss/"))
    gaps = [k for k in GAP_KEYS if k in series]
    motion = [k for k in MOTION_KEYS if f"val/student/{k}" in series]
    if not losses and not gaps:
        return None
    panels = 2 + bool(motion)
    fig = Figure(figsize=(4.6 * panels, 3.6))
    # fixed margins: constrained layout costs seconds of text measuring on a busy CPU
    fig.subplots_adjust(left=0.2 / panels, right=1 - 0.2 / panels, bottom=0.14, top=0.9,
                        wspace=0.45)  # fmt: skip
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, keys, title in ((axes[0], losses, "training loss"), (axes[1], gaps, "validation")):
        if _plot_series(ax, series, keys):
            ax.set_yscale("log")
            # plain tick labels: the default log labels go through mathtext, whose first
            # use costs seconds
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if motion:
        ax = axes[2]
        twin = ax.twinx() if len(motion) == 2 else None
        for i, (key, target) in enumerate(zip(motion, (ax, twin), strict=False)):
            colour = f"C{i}"
            for model, style in (("student", "-"), ("teacher", "--")):
                points = series.get(f"val/{model}/{key}", [])
                if points:
                    steps, values = zip(*points, strict=True)
                    target.plot(steps, values, style, color=colour, marker="o", markersize=3,
                                label=f"{model} {key}")  # fmt: skip
            target.set_ylabel(key, color=colour)
        ax.set_ylim(bottom=0)
        if twin is not None:
            twin.set_ylim(bottom=0)
        handles = [h for a in (ax, twin) if a is not None for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=7)
        ax.set_title("sample motion vs caption (lower is better)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
