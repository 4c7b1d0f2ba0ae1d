"""Measure the attention cost table that routes layers mixing covering and sparse heads.

``STAAttention`` runs a layer whose every head covers the tile grid as dense SDPA and a
sparse layer through the STA kernel. A layer that mixes both kinds of heads can split them
between the two, which pays a gather of q, k, v by head and a scatter of the output: whether
that wins depends on the device, so it is measured there. For each canvas (batch 1) this
times, per head (measured on ``heads`` heads and divided by them):

    dense   SDPA forward and backward (cuDNN first in the backend order, as on Hopper)
    STA     the STA kernel forward and backward at several windows, from 2x2x2 tiles up to
            the whole canvas, so costs between them interpolate
    split   gathering q, k, v by head and scattering the output back

and writes a :class:`~stafinetune.models.dispatch.CostTable` JSON to pass as
``attention.cost_table=...`` on the same kind of device::

    python -m stafinetune.models.cost_table --canvas 30 48 80 --canvas 21 45 80 \\
        --tile 6 8 8 --out cost_table.json                       # about a minute on an H100

``benchmarks/dispatch_table.py`` runs the same measurement and adds the markdown report.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sta_kernels import num_tiles, sliding_tile_attention, window_density
from sta_kernels.geometry import as_triple

from .dispatch import CostEntry, CostPoint, CostTable

Triple = tuple[int, int, int]
Timer = Callable[[Callable[[], Any]], float]


def candidate_windows(tiles: Sequence[int]) -> list[Triple]:
    """Windows from small to the whole tile grid ``tiles``, one per distinct clipped shape."""
    raw = [(2, 2, 2), (3, 3, 3), (3, 3, 5), (3, 5, 7), tuple(tiles)]
    out: list[Triple] = []
    for window in raw:
        clipped = tuple(min(a, n) for a, n in zip(window, tiles, strict=True))
        if clipped not in out:
            out.append(clipped)  # type: ignore[arg-type]
    return out


def sdpa_priority(device: torch.device, order: str = "cudnn") -> contextlib.AbstractContextManager:
    """SDPA backend order for dense attention: ``cudnn`` tries cuDNN first (the fastest dense
    kernel on Hopper), then flash, memory-efficient and math; ``default`` keeps torch's."""
    if device.type != "cuda" or order == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # fmt: skip
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # torch without set_priority: the same set in torch's order
        return sdpa_kernel(backends)


def default_timer(device: torch.device, *, repeats: int = 3) -> Timer:
    """Median milliseconds of a call: triton's ``do_bench`` on a GPU, the wall clock of
    ``repeats`` calls after one warm-up on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu


def _forward_backward_ms(
    fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], do: torch.Tensor, bench: Timer
) -> tuple[float, float]:
    """Forward ms of ``fn(q, k, v)`` and the ms of its backward alone."""
    fwd = bench(lambda: fn(*qkv))
    o = fn(*qkv)
    bwd = bench(lambda: torch.autograd.grad(o, qkv, do, retain_graph=True))
    return fwd, bwd


def measure_cost_entry(
    canvas: Sequence[int],
    *,
    tile: Sequence[int],
    heads: int,
    head_dim: int,
    device: torch.device,
    bench: Timer | None = None,
    sdpa: str = "cudnn",
    windows: Sequence[Sequence[int]] | None = None,
    on_window: Callable[[Triple], bool] | None = None,
) -> tuple[CostEntry | None, list[dict[str, Any]]]:
    """The per-head costs of one canvas, and the rows they came from.

    Args:
        canvas, tile: the token canvas (T, Hc, Wc) and tile (tt, th, tw).
        heads, head_dim: the heads measured together (costs are divided by ``heads``).
        device: CUDA (bf16, the triton backend) or the CPU (fp32, the reference backend).
        bench: milliseconds of a call (default: :func:`default_timer`).
        sdpa: the dense baseline's backend order (:func:`sdpa_priority`).
        windows: the STA windows to time (default: :func:`candidate_windows`).
        on_window: called before each STA window; returning False skips it (a time budget).
    Returns:
        (the entry, None when no STA window was measured; rows with ``canvas``, ``impl``,
        ``window``, ``density`` and ``fwd_ms``/``bwd_ms`` per head, or ``error``).
    """
    canvas, tile = as_triple(canvas, "canvas"), as_triple(tile, "tile")
    bench = bench or default_timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "reference"
    gen = torch.Generator().manual_seed(0)
    seq = math.prod(canvas)
    qkv = [torch.randn(1, seq, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
           for _ in range(3)]  # (1, S, H, D) each  # fmt: skip
    do = torch.randn(1, seq, heads, head_dim, generator=gen).to(device, dtype)
    rows: list[dict[str, Any]] = []

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
        return o.transpose(1, 2)

    with sdpa_priority(device, sdpa):
        dense_fwd, dense_bwd = _forward_backward_ms(dense, qkv, do, bench)
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
    for window in windows or candidate_windows(num_tiles(canvas, tile)):
        window = as_triple(window, "window")
        row: dict[str, Any] = {"canvas": canvas, "impl": "STA", "window": window,
                               "density": window_density(canvas, tile, window)}  # fmt: skip
        if on_window is not None and not on_window(window):
            rows.append({**row, "error": "skipped: the time budget ran out"})
            continue

        def sta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window=window) -> torch.Tensor:
            return sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=window,
                                          backend=backend)  # fmt: skip

        try:
            fwd, bwd = _forward_backward_ms(sta, qkv, do, bench)
        except (RuntimeError, ValueError) as err:  # e.g. out of memory: keep the other rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            rows.append({**row, "error": f"{type(err).__name__}: {first[:300]}"})
            continue
        row.update(fwd_ms=fwd / heads, bwd_ms=bwd / heads)
        rows.append(row)
        points.append(CostPoint(row["density"], row["fwd_ms"], row["bwd_ms"], window))
    if not points:
        return None, rows
    entry = CostEntry(canvas=canvas, tile=tile, head_dim=head_dim,
                      dense_fwd_ms=dense_fwd / heads, dense_bwd_ms=dense_bwd / heads,
                      split_ms=split_ms,
                      sta=tuple(sorted(points, key=lambda p: p.density)))  # fmt: skip
    return entry, rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m stafinetune.models.cost_table``."""
    parser = argparse.ArgumentParser(
        prog="python -m stafinetune.models.cost_table",
        description="Measure attention.cost_table on this device (see the module docstring).",
    )
    parser.add_argument("--canvas", type=int, nargs=3, action="append", required=True,
                        metavar=("T", "H", "W"), help="a token canvas; repeat for several")  # fmt: skip
    parser.add_argument("--tile", type=int, nargs=3, default=[6, 8, 8], metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=4, help="heads timed together")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sdpa", choices=("cudnn", "default"), default="cudnn")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--out", type=Path, default=Path("cost_table.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every ``--canvas`` and write the table to ``--out``."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible (use --device cpu)")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = CostTable(device=name, meta={"heads": args.heads, "sdpa": args.sdpa,
                                         "torch": torch.__version__})  # fmt: skip
    for canvas in args.canvas:
        print(f"measuring canvas {canvas} on {name}", flush=True)
        entry, _ = measure_cost_entry(canvas, tile=args.tile, heads=args.heads,
                                      head_dim=args.head_dim, device=device,
                                      sdpa=args.sdpa)  # fmt: skip
        if entry is not None:
            table.entries.append(entry)
    table.save(args.out)
    print(f"cost table        {args.out} ({len(table.entries)} canvases)")


if __name__ == "__main__":
    main()
