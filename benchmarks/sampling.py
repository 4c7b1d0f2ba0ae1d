"""Sampling speed on one GPU: the DiT's time per denoising step, dense vs STA, and a schedule.

One denoising step is one forward of the DiT at batch 1 without gradients (bf16 weights and
autocast, random weights), called with its ``step_index`` as the sampler calls it. Rows:

    dense       every layer dense: SDPA, cuDNN first in the backend order (``--sdpa``)
    STA w       one STA window ``w`` for every layer and head (Triton kernel)
    strategy    a synthetic per-(layer, head) strategy, not a searched one: each head draws
                a window from the suite's candidates (the last covers the whole canvas) with
                fixed probabilities and seed; heads whose window covers the canvas make
                layers mixed, which run STA for every head unless ``--cost-table`` is given
    strategy + cost table   the same windows routed by a measured cost table
                (``benchmarks/dispatch_table.py``): covering heads through SDPA where faster

and per row the time of a ``--steps``-step schedule whose first ``--dense-first-steps``
steps run dense (``attention.dense_first_steps``; their calls take the dense path, as the
sampler's do): dense_first x (dense step) + the rest x (this row's step). Each distinct
step is timed (median of ``--iters`` forwards after a warm-up), not the whole loop.

Few-step students (``distill=dmd2`` / ``trajectory``) against the dense schedule as it is
used, with classifier-free guidance:

    dense + guidance     one dense step with guidance: the conditional and the negative
                         forward as one batch of 2 (``ClassifierFreeGuidance``); its schedule
                         is ``--steps`` of them
    few-step student N   N steps of the first STA window, one batch-1 forward each (the
                         guidance is baked in), every step STA; x dense + guidance is the
                         dense guided schedule's time over the student's

Suites:

    hunyuan720  HunyuanVideo 13B-shaped: 2 dual + 4 single full-width blocks (of 20 + 40,
                the same 1:2 mix), 117 frames 720x1280: canvas 30x48x80 + 256 text tokens.
                The goal reported against: an STA step >= 3x faster than a dense step here.
    wan720      Wan 2.1 T2V 1.3B (all 30 blocks), 81 frames 720x1280: canvas 21x45x80.
    hv15_720p   HunyuanVideo 1.5 T2V 8.3B (all 54 blocks), 121 frames 720x1280: canvas
                31x45x80 + 256 text tokens (not in the default --suites).
    wan22_ti2v720  Wan 2.2 TI2V-5B (all 30 blocks) in text-to-video mode, 121 frames 704x1280
                through its 16x VAE: canvas 31x22x40, 6x3x5 tiles of 6x8x8.

    PYTHONPATH=kernels:. python benchmarks/sampling.py                  # ~1.5 min on an H200 before wan22_ti2v720
    PYTHONPATH=kernels:. python benchmarks/sampling.py --cost-table benchmarks/results/dispatch_table.json
    PYTHONPATH=kernels:. python benchmarks/sampling.py --suites hv15_720p  # HunyuanVideo 1.5
    PYTHONPATH=kernels:. python benchmarks/sampling.py --smoke           # CPU, tiny models: checks the script
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_util import (
    Budget,
    args_record,
    bench_device,
    describe_environment,
    environment,
    fmt,
    free_memory,
    median_ms,
    run_guarded,
    sdpa_priority,
    write_results,
)

from sta_kernels import density, num_tiles
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.dispatch import covering_heads

GOAL_SUITE, GOAL_WINDOW, GOAL_SPEEDUP = "hunyuan720", (3, 3, 3), 3.0
FEWSTEP_GOAL_STEPS, FEWSTEP_GOAL = 4, 100.0  # a 4-step student >= 100x the dense guided schedule


@dataclass(frozen=True)
class Suite:
    title: str
    flavor: str
    latent: tuple[int, int, int]  # latent (T, H, W)
    text_len: int
    overrides: dict[str, int] = field(default_factory=dict)
    tile: tuple[int, int, int] = (6, 8, 8)
    windows: tuple[tuple[int, int, int], ...] = ((3, 3, 3), (3, 3, 5))
    candidates: tuple[tuple[int, int, int], ...] = ((3, 3, 3), (3, 3, 5), (9, 9, 9))
    weights: tuple[float, ...] = (0.5, 0.3, 0.2)


SUITES = {
    "hunyuan720": Suite("HunyuanVideo 13B-shaped, 2 dual + 4 single full-width blocks, 720p",
                        "hunyuanvideo_13b", (30, 96, 160), 256,
                        {"num_layers": 2, "num_single_layers": 4}),
    "wan720": Suite("Wan 2.1 1.3B, 720p", "wan2.1_t2v_1.3b", (21, 90, 160), 512),
    "hv15_720p": Suite("HunyuanVideo 1.5 8.3B, 720p", "hunyuanvideo15_720p_t2v", (31, 45, 80), 256),
    # 6 x 3 x 5 tiles: a window of 3 tiles spans the whole height
    "wan22_ti2v720": Suite("Wan 2.2 TI2V-5B, 720p", "wan2.2_ti2v_5b", (31, 44, 80), 512,
                           windows=((3, 3, 3), (3, 2, 3)),
                           candidates=((3, 2, 3), (3, 3, 3), (9, 9, 9))),
}  # fmt: skip

SMOKE_SUITES = {
    "hunyuan720": Suite("hunyuan_tiny (smoke)", "hunyuan_tiny", (5, 16, 16), 16, tile=(1, 2, 2),
                        windows=((3, 1, 3),), candidates=((3, 1, 3), (1, 2, 2), (9, 9, 9))),
    "wan720": Suite("wan_tiny (smoke)", "wan_tiny", (5, 16, 16), 16, tile=(1, 2, 2),
                    windows=((3, 1, 3),), candidates=((3, 1, 3), (1, 2, 2), (9, 9, 9))),
    "hv15_720p": Suite("hunyuanvideo15_tiny (smoke)", "hunyuanvideo15_tiny", (5, 16, 16), 16,
                       tile=(1, 2, 2), windows=((3, 1, 3),),
                       candidates=((3, 1, 3), (1, 2, 2), (9, 9, 9))),
    "wan22_ti2v720": Suite("wan22_tiny_ti2v (smoke)", "wan22_tiny_ti2v", (5, 16, 16), 16,
                           tile=(1, 2, 2), windows=((3, 1, 3),),
                           candidates=((3, 1, 3), (1, 2, 2), (9, 9, 9))),
}  # fmt: skip


def synthetic_strategy(suite: Suite, layers: int, heads: int, seed: int = 0) -> list:
    """(L, H, 3) windows, each head's drawn from ``suite.candidates`` by ``suite.weights``."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(torch.tensor(suite.weights), layers * heads, replacement=True,
                              generator=gen).view(layers, heads)  # fmt: skip
    return [[list(suite.candidates[i]) for i in row] for row in picks.tolist()]


class Bench:
    """One suite's bf16 model and inputs; rows switch its attention."""

    def __init__(self, suite: Suite, device: torch.device) -> None:
        self.suite, self.device = suite, device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        cfg = ModelConfig(flavor=suite.flavor, config_overrides=dict(suite.overrides))
        self.dit = build_model(cfg, AttentionConfig(mode="full", tile=list(suite.tile)),
                               device=device, dtype=dtype)  # fmt: skip
        self.dit.requires_grad_(False).eval()
        gen = torch.Generator().manual_seed(1)
        t, h, w = suite.latent
        self.inputs = {
            "latents": torch.randn(1, self.dit.in_channels, t, h, w, generator=gen).to(device),
            "timestep": torch.full((1,), 700.0, device=device),
            "text": torch.randn(1, suite.text_len, self.dit.text_dim, generator=gen).to(device),
            "text_mask": torch.ones(1, suite.text_len, dtype=torch.bool, device=device),
            "pooled_text": torch.randn(1, self.dit.pooled_dim or 1, generator=gen).to(device),
        }
        if self.dit.pooled_dim is None:
            self.inputs["pooled_text"] = None
        self.canvas = self.dit.canvas_for(self.inputs["latents"].shape)
        self.heads, self.layers = self.dit.num_heads, self.dit.num_layers

    def step_ms(
        self, attention: AttentionConfig, step_index: int, warmup: int, iters: int,
        batch: int = 1,
    ) -> float:  # fmt: skip
        """Median ms of one forward at ``batch`` (2: a guided step's cond + negative)."""
        self.dit.set_attention(attention)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        inputs = {k: None if v is None else torch.cat([v] * batch) for k, v in self.inputs.items()}

        @torch.no_grad()
        def forward() -> None:
            with autocast:
                self.dit(**inputs, step_index=step_index)

        return median_ms(forward, self.device, warmup, iters)

    def describe(self, windows: list) -> dict[str, float]:
        """Mean video density and the share of heads whose window covers the canvas."""
        table = torch.tensor(windows).view(-1, 3)
        return {
            "density": float(density(self.canvas, self.suite.tile, table).mean()),
            "covering_heads": float(
                covering_heads(table, self.canvas, self.suite.tile).float().mean()
            ),
        }


def run_suite(name: str, suite: Suite, args: argparse.Namespace, device: torch.device,
              budget: Budget) -> list[dict[str, Any]]:  # fmt: skip
    bench = Bench(suite, device)
    tile = list(suite.tile)
    common = {"suite": name, "title": suite.title, "canvas": list(bench.canvas),
              "tiles": list(num_tiles(bench.canvas, suite.tile)), "tile": tile,
              "layers": bench.layers, "heads": bench.heads}  # fmt: skip
    strategy = synthetic_strategy(suite, bench.layers, bench.heads)
    first = args.dense_first_steps
    configs: list[tuple[str, AttentionConfig, list]] = [
        ("dense", AttentionConfig(mode="full", tile=tile), [])
    ]
    sparse = {"tile": tile, "dense_first_steps": first}
    for w in suite.windows:
        configs.append((f"STA {'x'.join(map(str, w))}", AttentionConfig(window=list(w), **sparse),
                        [[list(w)] * bench.heads] * bench.layers))  # fmt: skip
    configs.append(("strategy", AttentionConfig(head_windows=strategy, **sparse), strategy))
    if args.cost_table is not None:
        configs.append(("strategy + cost table",
                        AttentionConfig(head_windows=strategy, cost_table=str(args.cost_table),
                                        **sparse), strategy))  # fmt: skip
    rows = []
    for label, attention, windows in configs:
        record = {**common, "row": label}
        if windows:
            record.update(bench.describe(windows))
        if budget.exhausted():
            record["error"] = f"skipped: the {budget.seconds:.0f} s budget ran out"
            rows.append(record)
            continue
        print(f"[{budget.elapsed():6.0f} s] {name}: {label}", flush=True)
        # a sparse row's step index lies past the dense steps, so its windows apply
        step_index = 0 if label == "dense" else first
        measure = functools.partial(bench.step_ms, attention, step_index, args.warmup, args.iters)
        with sdpa_priority(device, args.sdpa):
            result = run_guarded(lambda m=measure: {"step_ms": m()}, device)
        record.update(result)
        rows.append(record)
    dense_ms = rows[0].get("step_ms")
    for r in rows:
        if "step_ms" not in r or dense_ms is None:
            continue
        r["x_dense_step"] = dense_ms / r["step_ms"]
        sparse_steps = args.steps - (0 if r["row"] == "dense" else first)
        r["schedule_s"] = (
            (args.steps - sparse_steps) * dense_ms + sparse_steps * r["step_ms"]
        ) / 1e3
        r["x_dense_schedule"] = args.steps * dense_ms / 1e3 / r["schedule_s"]
    rows.extend(fewstep_rows(bench, rows, common, args, device, budget))
    del bench
    free_memory(device)
    return rows


def fewstep_rows(bench: Bench, rows: list[dict[str, Any]], common: dict[str, Any],
                 args: argparse.Namespace, device: torch.device,
                 budget: Budget) -> list[dict[str, Any]]:  # fmt: skip
    """The dense guided step and the few-step students' schedules (see the module docstring)."""
    window = bench.suite.windows[0]
    sta = next((r for r in rows if r["row"] == f"STA {'x'.join(map(str, window))}"), {})
    record = {**common, "row": "dense + guidance (batch 2)", "density": 1.0}
    if budget.exhausted() or "step_ms" not in sta:
        return [{**record, "error": "skipped: no time left or no STA step measured"}]
    print(f"[{budget.elapsed():6.0f} s] {common['suite']}: dense + guidance", flush=True)
    dense = AttentionConfig(mode="full", tile=list(bench.suite.tile))
    measure = functools.partial(bench.step_ms, dense, 0, args.warmup, args.iters, 2)
    with sdpa_priority(device, args.sdpa):
        record.update(run_guarded(lambda: {"step_ms": measure()}, device))
    if "step_ms" not in record:
        return [record]
    guided_s = args.steps * record["step_ms"] / 1e3
    record.update(schedule_s=guided_s, x_dense_guided=1.0)
    out = [record]
    for n in args.fewstep:
        schedule_s = n * sta["step_ms"] / 1e3
        out.append({**common, "row": f"few-step student, {n} STA {'x'.join(map(str, window))} "
                    "steps", "density": sta.get("density"), "step_ms": sta["step_ms"],
                    "schedule_s": schedule_s, "x_dense_guided": guided_s / schedule_s})  # fmt: skip
    return out


def fewstep_goal_line(rows: list[dict[str, Any]], steps: int) -> str:
    hit = [r for r in rows if r["suite"] == GOAL_SUITE and "x_dense_guided" in r
           and r["row"].startswith(f"few-step student, {FEWSTEP_GOAL_STEPS} ")]  # fmt: skip
    if not hit:
        return "Few-step goal: not measured."
    ratio = hit[0]["x_dense_guided"]
    verdict = "met" if ratio >= FEWSTEP_GOAL else "not met"
    return (f"Few-step goal: a {FEWSTEP_GOAL_STEPS}-step STA student >= {FEWSTEP_GOAL:.0f}x "
            f"the dense {steps}-step guided schedule on the HunyuanVideo 720p shape: "
            f"{ratio:.1f}x, {verdict}.")  # fmt: skip


def goal_line(rows: list[dict[str, Any]]) -> str:
    label = f"STA {'x'.join(map(str, GOAL_WINDOW))}"
    hit = [
        r for r in rows if r["suite"] == GOAL_SUITE and r["row"] == label and "x_dense_step" in r
    ]
    if not hit:
        return f"Goal (an STA step >= {GOAL_SPEEDUP:.0f}x faster than a dense step at {GOAL_SUITE}): not measured."
    ratio = hit[0]["x_dense_step"]
    verdict = "met" if ratio >= GOAL_SPEEDUP else "not met"
    return (f"Goal: an {label} step >= {GOAL_SPEEDUP:.0f}x faster than a dense step on the "
            f"HunyuanVideo 720p shape: {ratio:.2f}x, {verdict}.")  # fmt: skip


def render_table(env: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    tiles = ", ".join(sorted({"x".join(map(str, r["tile"])) for r in rows})) or "-"
    lines = [
        f"Time per denoising step (one DiT forward, batch 1, bf16, no gradients, random weights) "
        f"and of a {args.steps}-step schedule whose first {args.dense_first_steps} steps are "
        f"dense; the strategy is synthetic (see `benchmarks/sampling.py`). Dense attention: SDPA "
        f"({'cuDNN first' if args.sdpa == 'cudnn' else 'torch default order'}); STA: the Triton "
        f"kernel, tiles of {tiles} tokens. Median of {args.iters} forwards. "
        f"{describe_environment(env)}.",
        "",
        "| suite | canvas (tiles) | row | mean video density | covering heads | ms / step | "
        "x dense step | schedule s | x dense schedule | x dense + guidance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        canvas = f"{'x'.join(map(str, r['canvas']))} ({'x'.join(map(str, r['tiles']))})"
        dens = fmt(None if "density" not in r else 100 * r["density"], ".1f")
        cover = fmt(None if "covering_heads" not in r else 100 * r["covering_heads"], ".0f")
        head = (f"| {r['title']} | {canvas} | {r['row']} | {dens if dens == '-' else dens + '%'} | "
                f"{cover if cover == '-' else cover + '%'} |")  # fmt: skip
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | |")
            continue
        ratios = [fmt(r.get(k), ".2f") for k in ("x_dense_step", "x_dense_schedule")]
        guided = fmt(r.get("x_dense_guided"), ".1f")
        lines.append(
            f"{head} {r['step_ms']:.0f} | {' | '.join(x if x == '-' else x + 'x' for x in ratios[:1])}"
            f" | {fmt(r.get('schedule_s'), '.1f')} | {ratios[1] if ratios[1] == '-' else ratios[1] + 'x'}"
            f" | {guided if guided == '-' else guided + 'x'} |"
        )
    lines += ["", goal_line(rows), fewstep_goal_line(rows, args.steps)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", default="hunyuan720,wan720,wan22_ti2v720",
                        help=f"from {list(SUITES)}")  # fmt: skip
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dense-first-steps", type=int, default=10)
    parser.add_argument("--fewstep", default="1,2,4", help="few-step students' step counts")
    parser.add_argument(
        "--cost-table",
        type=Path,
        default=None,
        help="a dispatch_table.py JSON: adds the strategy row routed by it",
    )
    parser.add_argument("--sdpa", choices=("cudnn", "default"), default="cudnn")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="sampling")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    args = parser.parse_args(argv)
    args.suites = [s for s in args.suites.split(",") if s]
    args.fewstep = [int(n) for n in args.fewstep.split(",") if n]
    if any(s not in SUITES for s in args.suites) or not 0 <= args.dense_first_steps <= args.steps:
        parser.error("unknown suite, or --dense-first-steps outside [0, --steps]")
    if args.cost_table is not None and not args.cost_table.is_file():
        parser.error(f"--cost-table {args.cost_table} does not exist")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench_device(args.smoke, "sampling.py")
    suites = SMOKE_SUITES if args.smoke else SUITES
    budget = Budget(args.budget_s)
    env = environment(device)
    rows: list[dict[str, Any]] = []
    for name in args.suites:
        rows.extend(run_suite(name, suites[name], args, device, budget))
    meta = {**env, "args": args_record(args), "goal": goal_line(rows),
            "fewstep_goal": fewstep_goal_line(rows, args.steps), "seconds": budget.elapsed()}
    payload = {"meta": meta, "rows": rows}
    write_results(args.out, args.name, payload, render_table(env, rows, args))


if __name__ == "__main__":
    sys.exit(main())
