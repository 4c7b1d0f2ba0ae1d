"""Plot the attention benchmark: kernel time against window density, per shape.

Reads the JSON that ``benchmarks/attention.py`` writes (no GPU, no triton needed) and draws,
for each benchmarked shape, forward and backward time (ms, log scale) against the share of
video query/key pairs the window attends: the Triton STA kernel (and its FP8 forward where
the run has it), flex STA, and dense cuDNN
SDPA at density 1 with its proportional line (cuDNN time x density, what a kernel that only
skips work would reach).

    python benchmarks/plot_attention.py benchmarks/results/attention.json docs/attention_density.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# impl name in the JSON -> (legend label, matplotlib format)
STA_IMPLS = {"triton[default]": ("triton STA", "o-"), "flex": ("flex STA", "s--"),
             "triton[fp8] (forward only)": ("triton STA, FP8 forward", "^-")}
DENSE_IMPL = "sdpa-cudnn"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def density_series(
    results: list[dict[str, Any]], shape: str, impl: str, key: str
) -> list[tuple[float, float]]:
    """``[(density, time ms)]`` of one implementation on one shape, by increasing density."""
    points = [
        (float(r["density"]), float(r[key]))
        for r in results
        if r["shape"] == shape and r["impl"] == impl and _finite(r.get(key))
        and _finite(r.get("density"))
    ]  # fmt: skip
    return sorted(points)


def plot_attention(results_json: str | Path, png: str | Path) -> Path:
    """Write ``png``: one row per shape of ``results_json``, forward and backward columns.

    Returns:
        the PNG's path.
    """
    from matplotlib.figure import Figure

    report = json.loads(Path(results_json).read_text())
    results, meta = report["results"], report.get("meta", {})
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig = Figure(figsize=(9, 3.2 * len(shapes)), layout="constrained")
    axes = fig.subplots(len(shapes), 2, squeeze=False)
    for row, shape in zip(axes, shapes, strict=True):
        for ax, key, title in ((row[0], "fwd_ms", "forward"), (row[1], "bwd_ms", "backward")):
            for impl, (label, fmt) in STA_IMPLS.items():
                points = density_series(results, shape, impl, key)
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, fmt, label=label)
            dense = [r[key] for r in results
                     if r["shape"] == shape and r["impl"] == DENSE_IMPL and _finite(r.get(key))]  # fmt: skip
            if dense:
                low = min((x for impl in STA_IMPLS
                           for x, _ in density_series(results, shape, impl, key)), default=1.0)  # fmt: skip
                ax.plot([1.0], [dense[0]], "k*", markersize=10, label="cuDNN dense")
                ax.plot([low / 1.5, 1.0], [low / 1.5 * dense[0], dense[0]], ":", color="grey",
                        label="cuDNN x density")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("window density (attended / all video pairs)")
            ax.set_ylabel("time, ms")
            ax.set_title(f"{shape} {title}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    if meta:
        fig.suptitle(
            f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, triton "
            f"{meta.get('triton', '?')}; bf16, D=128, median of do_bench",
            fontsize=9,
        )
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="attention.json written by benchmarks/attention.py")
    parser.add_argument("png", help="the figure to write")
    args = parser.parse_args()
    print(plot_attention(args.results, args.png))


if __name__ == "__main__":
    main()
