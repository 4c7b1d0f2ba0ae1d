"""Benchmark one distillation training step of a real-shape video DiT on a GPU: STA vs dense.

Builds a published flavor with random weights (default Wan 2.1 T2V 1.3B) in bf16 on the
GPU, with gradient checkpointing, and times at a real latent size (default 81 frames at
480x832 -> latents 21x60x104 -> token canvas 21x30x52):

    dense    student forward + backward with SDPA attention
    sta      the same with Sliding Tile Attention (triton backend), per window
    teacher  one dense forward without gradients (what distillation adds per step)

Numbers are medians of CUDA-event timings after warm-up; peak memory is per configuration.
Writes JSON (device, versions, date) and a markdown table.

    PYTHONPATH=kernels:. python benchmarks/train_step.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch
import triton

from sta_kernels import density
from stafinetune.models import AttentionConfig, ModelConfig, build_model


def _time(fn, warmup: int, reps: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` and its peak memory in GiB."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def render_table(meta: dict, rows: list[dict]) -> str:
    """Markdown table of the measured rows (the teacher row has no step speedup)."""
    canvas = meta["canvas"]
    lines = [
        f"Training step of {meta['flavor']} (random weights, bf16, gradient checkpointing), batch 1, "
        f"canvas {canvas[0]}x{canvas[1]}x{canvas[2]} = {meta['video_tokens']} video tokens + "
        f"{meta['text_len']} text; {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['date'][:10]}.",
        "",
        "| configuration | window (tiles) | video density | time (ms) | step speedup vs dense | peak GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        win = "-" if r["window"] is None else "x".join(map(str, r["window"]))
        speed = "-" if r["config"].startswith("teacher") else f"{r['speedup_vs_dense_step']:.2f}x"
        lines.append(
            f"| {r['config']} | {win} | {r['density']:.1%} | {r['step_ms']:.0f} | {speed} | {r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavor", default="wan2.1_t2v_1.3b")
    parser.add_argument("--latent", type=int, nargs=3, default=[21, 60, 104], help="latent T H W")
    parser.add_argument("--tile", type=int, nargs=3, default=[6, 8, 8])
    parser.add_argument("--windows", default="3,3,3;2,3,4", help="';'-separated window triples")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_step.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    dit = build_model(
        ModelConfig(flavor=args.flavor), AttentionConfig(mode="full"), device=device,
        dtype=torch.bfloat16,
    )  # fmt: skip
    dit.enable_gradient_checkpointing()  # what parallelize() does for model.gradient_checkpointing
    b, (t, h, w) = 1, args.latent
    latents = torch.randn(b, dit.in_channels, t, h, w, device=device)
    timestep = torch.full((b,), 500.0, device=device)
    text = torch.randn(b, args.text_len, dit.text_dim, device=device)
    text_mask = torch.ones(b, args.text_len, dtype=torch.bool, device=device)
    pooled = torch.randn(b, dit.pooled_dim, device=device) if dit.pooled_dim else None
    canvas = dit.canvas_for(latents.shape)
    tokens = canvas[0] * canvas[1] * canvas[2]

    def train_step() -> None:
        dit.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = dit(latents, timestep, text, text_mask, pooled)
        out.float().square().mean().backward()

    @torch.no_grad()
    def teacher_forward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            dit(latents, timestep, text, text_mask, pooled)

    rows = []
    ms, mem = _time(train_step, args.warmup, args.reps)
    rows.append(
        {"config": "dense (SDPA)", "window": None, "density": 1.0, "step_ms": ms, "peak_gib": mem}
    )
    ms, mem = _time(teacher_forward, args.warmup, args.reps)
    rows.append(
        {
            "config": "teacher fwd (dense, no grad)",
            "window": None,
            "density": 1.0,
            "step_ms": ms,
            "peak_gib": mem,
        }
    )
    for spec in args.windows.split(";"):
        window = [int(x) for x in spec.split(",")]
        dit.set_attention(
            AttentionConfig(mode="sta", backend="triton", tile=list(args.tile), window=window)
        )
        ms, mem = _time(train_step, args.warmup, args.reps)
        dens = float(density(canvas, args.tile, torch.tensor([window]))[0])
        rows.append(
            {
                "config": "STA (triton)",
                "window": window,
                "density": dens,
                "step_ms": ms,
                "peak_gib": mem,
            }
        )
    dense_ms = rows[0]["step_ms"]
    for row in rows:
        row["speedup_vs_dense_step"] = dense_ms / row["step_ms"]
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "flavor": args.flavor,
        "latent": args.latent,
        "canvas": list(canvas),
        "video_tokens": tokens,
        "text_len": args.text_len,
        "tile": args.tile,
        "gradient_checkpointing": True,
        "dtype": "bf16 weights, bf16 autocast",
    }
    table = render_table(meta, rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "train_step.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
