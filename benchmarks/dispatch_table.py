"""Measure the attention cost table that routes mixed STA layers (``attention.cost_table``).

For each canvas (tile 6x8x8, head dim 128, bf16, batch 1) this times, per head (measured on
``--heads`` heads and divided by them; ``triton.testing.do_bench`` medians):

    dense   SDPA forward and backward (cuDNN first in the backend order, as the dense path
            of ``STAAttention`` runs under ``--sdpa cudnn``)
    STA     the Triton kernel forward and backward at several windows, from 2x2x2 tiles up
            to the whole canvas (density 1), so costs between them interpolate
    split   gathering q, k, v by head and scattering the output back (what a layer that
            splits its heads between SDPA and STA pays on top)

and writes ``results/dispatch_table.json`` (a ``stafinetune.models.dispatch.CostTable``) and
a markdown table. Pass the JSON as ``attention.cost_table=...`` on the same kind of device.
The measurement is the product's own (``python -m stafinetune.models.cost_table``); this
script adds the benchmark's environment record, time budget and report.

    PYTHONPATH=kernels:. python benchmarks/dispatch_table.py             # ~1 min on an H200
    PYTHONPATH=kernels:. python benchmarks/dispatch_table.py --smoke     # CPU: checks the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from bench_util import (
    Budget,
    bench_device,
    describe_environment,
    environment,
    free_memory,
    median_ms,
    write_results,
)

from stafinetune.models.cost_table import default_timer, measure_cost_entry
from stafinetune.models.dispatch import CostTable

CANVASES = {
    "wan480": (21, 30, 52),  # Wan 2.1 480p, partial tiles on every axis
    "wan720": (21, 45, 80),  # Wan 2.1 720p
    "hunyuan720": (30, 48, 80),  # HunyuanVideo 720p, whole tiles
}
SMOKE_CANVASES = {"wan480": (5, 8, 8), "hunyuan720": (4, 6, 6)}


def render_table(env: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Per-head attention cost (measured on {args.heads} heads of {args.head_dim}, bf16, "
        f"batch 1, tile {'x'.join(map(str, args.tile))}; dense: SDPA, "
        f"{'cuDNN first' if args.sdpa == 'cudnn' else 'torch default order'}; STA: Triton). "
        f"{describe_environment(env)}.",
        "",
        "| canvas | attention | window | video density | fwd ms / head | bwd ms / head | "
        "fwd x dense | bwd x dense |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense = {tuple(r["canvas"]): r for r in rows if r["impl"] == "dense SDPA"}
    for r in rows:
        canvas = "x".join(map(str, r["canvas"]))
        window = "-" if r.get("window") is None else "x".join(map(str, r["window"]))
        dens = "-" if r.get("density") is None else f"{r['density']:.1%}"
        if "error" in r:
            lines.append(f"| {canvas} | {r['impl']} | {window} | {dens} | {r['error']} | | | |")
            continue
        ref = dense.get(tuple(r["canvas"]))
        ratios = "| - | - |"
        if r["impl"] == "STA" and ref is not None:
            ratios = f"| {ref['fwd_ms'] / r['fwd_ms']:.2f}x | {ref['bwd_ms'] / r['bwd_ms']:.2f}x |"
        lines.append(f"| {canvas} | {r['impl']} | {window} | {dens} | {r['fwd_ms']:.3f} | "
                     f"{r['bwd_ms']:.3f} {ratios}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--canvases", default=",".join(CANVASES), help=f"from {list(CANVASES)}")
    parser.add_argument("--tile", type=int, nargs=3, default=[6, 8, 8])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sdpa", choices=("cudnn", "default"), default="cudnn")
    parser.add_argument("--warmup", type=int, default=1, help="CPU timing only")
    parser.add_argument("--iters", type=int, default=3, help="CPU timing only")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="dispatch_table")
    parser.add_argument("--smoke", action="store_true", help="tiny canvases on the CPU")
    args = parser.parse_args(argv)
    args.canvases = [c for c in args.canvases.split(",") if c]
    if args.smoke:
        args.tile, args.heads, args.head_dim = [1, 2, 2], 2, 16
        args.canvases = [c for c in args.canvases if c in SMOKE_CANVASES] or list(SMOKE_CANVASES)
    elif any(c not in CANVASES for c in args.canvases):
        parser.error(f"--canvases must come from {list(CANVASES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench_device(args.smoke, "dispatch_table.py")
    canvases = SMOKE_CANVASES if args.smoke else CANVASES
    env = environment(device)
    budget = Budget(args.budget_s)
    table = CostTable(device=env["device"], meta={**env, "heads": args.heads, "sdpa": args.sdpa})
    rows: list[dict[str, Any]] = []
    for name in args.canvases:
        print(f"[{budget.elapsed():6.0f} s] {name}", flush=True)
        if device.type == "cuda":
            bench = default_timer(device)
        else:
            bench = lambda fn: median_ms(fn, device, args.warmup, args.iters)  # noqa: E731
        try:
            entry, measured = measure_cost_entry(
                canvases[name], tile=args.tile, heads=args.heads, head_dim=args.head_dim,
                device=device, bench=bench, sdpa=args.sdpa,
                on_window=lambda window: not budget.exhausted(),
            )  # fmt: skip
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. dense SDPA failing
            free_memory(device)
            rows.append({"canvas": canvases[name], "impl": "dense SDPA", "window": None,
                         "density": None, "error": f"{type(err).__name__}: {err}"[:300]})  # fmt: skip
            continue
        rows.extend(measured)
        if entry is not None:
            table.entries.append(entry)
    payload = table.to_dict()
    payload["rows"] = rows
    write_results(args.out, args.name, payload, render_table(env, rows, args))


if __name__ == "__main__":
    sys.exit(main())
