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

    PYTHONPATH=kernels:. python benchmarks/dispatch_table.py             # ~1 min on an H200
    PYTHONPATH=kernels:. python benchmarks/dispatch_table.py --smoke     # CPU: checks the script
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_util import (
    Budget,
    bench_device,
    describe_environment,
    environment,
    free_memory,
    median_ms,
    run_guarded,
    sdpa_priority,
    write_results,
)

from sta_kernels import num_tiles, sliding_tile_attention
from stafinetune.models.dispatch import CostEntry, CostPoint, CostTable, head_density

CANVASES = {
    "wan480": (21, 30, 52),  # Wan 2.1 480p, partial tiles on every axis
    "wan720": (21, 45, 80),  # Wan 2.1 720p
    "hunyuan720": (30, 48, 80),  # HunyuanVideo 720p, whole tiles
}
SMOKE_CANVASES = {"wan480": (5, 8, 8), "hunyuan720": (4, 6, 6)}


def candidate_windows(tiles: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Windows from small to the whole grid, one per distinct density."""
    raw = [(2, 2, 2), (3, 3, 3), (3, 3, 5), (3, 5, 7), tiles]
    seen, out = set(), []
    for w in raw:
        clipped = tuple(min(a, n) for a, n in zip(w, tiles, strict=True))
        if clipped not in seen:
            seen.add(clipped)
            out.append(clipped)
    return out


def timer(device: torch.device, warmup: int, iters: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of a callable: triton's do_bench on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return lambda fn: median_ms(fn, device, warmup, iters)


def fwd_bwd_ms(fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], do: torch.Tensor,
               bench: Callable) -> tuple[float, float]:  # fmt: skip
    """Forward ms of ``fn(q, k, v)`` and the ms of its backward alone."""
    fwd = bench(lambda: fn(*qkv))
    o = fn(*qkv)
    bwd = bench(lambda: torch.autograd.grad(o, qkv, do, retain_graph=True))
    return fwd, bwd


def measure_canvas(canvas: tuple[int, int, int], args: argparse.Namespace, device: torch.device,
                   budget: Budget) -> tuple[CostEntry | None, list[dict[str, Any]]]:  # fmt: skip
    """The cost entry of ``canvas`` and the table rows it came from."""
    tile = tuple(args.tile)
    heads, dim = args.heads, args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "reference"
    gen = torch.Generator().manual_seed(0)
    seq = math.prod(canvas)
    qkv = [torch.randn(1, seq, heads, dim, generator=gen).to(device, dtype).requires_grad_()
           for _ in range(3)]  # fmt: skip
    do = torch.randn(1, seq, heads, dim, generator=gen).to(device, dtype)
    bench = timer(device, args.warmup, args.iters)
    rows: list[dict[str, Any]] = []

    def dense(q, k, v):
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(
            1, 2
        )

    with sdpa_priority(device, args.sdpa):
        dense_fwd, dense_bwd = fwd_bwd_ms(dense, qkv, do, bench)
    rows.append({"canvas": canvas, "impl": "dense SDPA", "window": None, "density": 1.0,
                 "fwd_ms": dense_fwd / heads, "bwd_ms": dense_bwd / heads})  # fmt: skip
    half = torch.arange(0, heads, 2, device=device), torch.arange(1, heads, 2, device=device)
    inverse = torch.argsort(torch.cat(half)).to(device)

    def split() -> torch.Tensor:
        parts = [[x.index_select(2, idx) for x in qkv] for idx in half]
        return torch.cat([p[0] for p in parts], dim=2).index_select(2, inverse)

    split_ms = bench(split) / heads
    rows.append({"canvas": canvas, "impl": "head split (gather + scatter)", "window": None,
                 "density": None, "fwd_ms": split_ms, "bwd_ms": split_ms})  # fmt: skip
    points = []
    for window in candidate_windows(num_tiles(canvas, tile)):
        if budget.exhausted():
            rows.append({"canvas": canvas, "impl": "STA", "window": window,
                         "error": f"skipped: the {budget.seconds:.0f} s budget ran out"})  # fmt: skip
            continue

        def sta(q, k, v, window=window):
            return sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=window,
                                          backend=backend)  # fmt: skip

        def timed(sta=sta) -> dict[str, float]:
            fwd, bwd = fwd_bwd_ms(sta, qkv, do, bench)
            return {"fwd": fwd, "bwd": bwd}

        result = run_guarded(timed, device)
        density = head_density(canvas, tile, window)
        row = {"canvas": canvas, "impl": "STA", "window": window, "density": density}
        if "error" in result:
            rows.append({**row, **result})
            continue
        row.update(fwd_ms=result["fwd"] / heads, bwd_ms=result["bwd"] / heads)
        rows.append(row)
        points.append(CostPoint(density, row["fwd_ms"], row["bwd_ms"], window))
    if not points:
        return None, rows
    entry = CostEntry(canvas=canvas, tile=tile, head_dim=dim, dense_fwd_ms=dense_fwd / heads,
                      dense_bwd_ms=dense_bwd / heads, split_ms=split_ms,
                      sta=tuple(sorted(points, key=lambda p: p.density)))  # fmt: skip
    return entry, rows


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
        try:
            entry, measured = measure_canvas(canvases[name], args, device, budget)
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
