"""Training-step speed on one GPU: dense finetuning vs STA distillation vs an STA-only step.

Every step is what training does: ``stafinetune.training.distill.DistillStep.losses`` (noising, the
teacher's dense forward with its captured attention outputs, the student's forward and every
loss term), then backward and a fused AdamW step. The student keeps fp32 weights under bf16
autocast (as ``train.precision=auto``), the teacher bf16 weights; random weights, batch 1,
gradient checkpointing per block. Per suite (model and resolution) the rows are:

    dense     plain finetuning: dense student, flow-matching loss, no teacher
    sta       the STA student alone (flow-matching loss, no teacher)
    teacher   the teacher's dense forward with capture (no gradients): what distillation adds
    distill   the STA distillation step: teacher forward + STA student forward/backward with
              the output and attention-output losses (distill.w_out = w_attn = 1)
    dmd2      one step of the few-step student by distribution matching (``distill=dmd2``,
              4 steps, ``--critic-ratio`` critic updates per student update, STA critic):
              student rollouts, the teacher's and the critic's forwards, the critic's and the
              student's backward and AdamW steps (student + critic + teacher in memory)
    lora      LoRA STA distillation (rank ``--lora-rank`` on the STA layers' q/k/v/out, as
              ``train.trainable=lora``) whose teacher is the frozen base with the adapter off,
              the base in fp32 (``lora``), bf16 (``lora_bf16``) or FP8 (``lora_fp8``):
              ``train.frozen_weights``. Opt-in (not in the default --kinds) and run after the
              suite's other rows, whose models leave the GPU first, so the peak is the LoRA
              step's own. ``--offload none,single_gpu`` times each LoRA row without and with
              ``offload=single_gpu`` (activations, teacher_attention, block_swap=4).

each with ``model.checkpoint_policy`` full and selective (keeps attention outputs, so the
recomputation skips attention), and with ``--compile`` (``model.compile``: each block and its
checkpoint compiled as one region) as extra rows. Suites:

    wan480      Wan 2.1 T2V 1.3B, 81 frames 480x832: canvas 21x30x52 (32,760 tokens)
    wan720      Wan 2.1 T2V 1.3B, 81 frames 720x1280: canvas 21x45x80 (75,600 tokens)
    hunyuan720  HunyuanVideo 13B-shaped, 2 dual + 2 single full-width blocks (of 20 + 40),
                117 frames 720x1280: canvas 30x48x80 (115,200 tokens) + 256 text tokens
    compile     Wan 2.1 1.3B with 1 block at 720p: the distillation step eager vs compiled
                (one block keeps inductor's compile time inside the run's budget)
    hv15_720p   HunyuanVideo 1.5 8.3B-shaped, 4 of its 54 full-width dual-stream blocks,
                121 frames 720x1280: canvas 31x45x80 (111,600 tokens) + 256 text tokens
                (not in the default --suites)
    wan14b720   Wan 2.1 T2V 14B, all 40 blocks, 81 frames 720x1280 (75,600 tokens): LoRA rows
                only (issue 37's single-GPU case; its random weights are made on the host)
                (not in the default --suites)
    hunyuan13b720  HunyuanVideo 13B, all 20 + 40 blocks, 117 frames 720x1280 (115,200 tokens)
                + 256 text tokens: LoRA rows only, as wan14b720 (not in the default --suites)
    wan22_ti2v720  Wan 2.2 TI2V-5B-shaped, 10 of its 30 full-width blocks (the whole model's
                fp32 weights and AdamW state would not fit one GPU), text-to-video, 121 frames
                704x1280 through the 16x VAE: canvas 31x22x40 (27,280 tokens)

Reported per row: median step time, video tokens per second, peak memory (since the row's
first step, with the optimiser state), and the attention share of one timed step
(``stafinetune.models.profiling.AttentionTimer``: time inside the student's and the teacher's
attention modules, forward, recomputation and backward; not measured under compile).
Windows are one triple for every layer and head (default 3x3x3 tiles of 6x8x8 tokens).

    PYTHONPATH=kernels:. python benchmarks/train_step.py                 # all suites (~6 min on an H200 before wan22_ti2v720, unmeasured)
    PYTHONPATH=kernels:. python benchmarks/train_step.py --suites wan720 --policies selective
    PYTHONPATH=kernels:. python benchmarks/train_step.py --suites hv15_720p  # HunyuanVideo 1.5
    PYTHONPATH=kernels:. python benchmarks/train_step.py --suites wan14b720 --policies full \
        --offload none,single_gpu      # Wan 14B LoRA on one GPU: fp32 / bf16 / FP8 base, levers
    PYTHONPATH=kernels:. python benchmarks/train_step.py --smoke          # CPU, tiny models: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
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
    peak_gib,
    reset_peak,
    run_guarded,
    sdpa_priority,
    synchronize,
    time_call,
    write_results,
)
from step_profile import profile_step, render_breakdown

from sta_kernels import density
from stafinetune.config import DistillConfig
from stafinetune.diffusion.flow_matching import add_noise
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.bf16 import apply_frozen_weights
from stafinetune.models.block_swap import apply_block_swap
from stafinetune.models.dit import cast_like_diffusers, reset_rope_buffers
from stafinetune.models.offload import ActivationOffloader, apply_activation_offload
from stafinetune.models.profiling import AttentionTimer
from stafinetune.parallel.parallelize import apply_compile
from stafinetune.training.distill import DistillStep
from stafinetune.training.fewstep import DMD2Distill
from stafinetune.training.lora import BaseModelTeacher, apply_lora


@dataclass(frozen=True)
class Suite:
    """One model at one resolution."""

    title: str
    flavor: str
    latent: tuple[int, int, int]  # latent (T, H, W)
    text_len: int
    overrides: dict[str, int] = field(default_factory=dict)
    tile: tuple[int, int, int] = (6, 8, 8)
    compile_only: bool = False  # the compile suite: distillation eager vs compiled only
    lora_only: bool = False  # LoRA rows only: the student stays on the host, no teacher


SUITES = {
    "wan480": Suite("Wan 2.1 1.3B, 480p", "wan2.1_t2v_1.3b", (21, 60, 104), 512),
    "wan720": Suite("Wan 2.1 1.3B, 720p", "wan2.1_t2v_1.3b", (21, 90, 160), 512),
    "hunyuan720": Suite("HunyuanVideo 13B-shaped, 2+2 full-width blocks, 720p",
                        "hunyuanvideo_13b", (30, 96, 160), 256,
                        {"num_layers": 2, "num_single_layers": 2}),
    "compile": Suite("Wan 2.1 1.3B-shaped, 1 block, 720p", "wan2.1_t2v_1.3b", (21, 90, 160), 512,
                     {"num_layers": 1}, compile_only=True),
    "hv15_720p": Suite("HunyuanVideo 1.5 8.3B-shaped, 4 of 54 full-width blocks, 720p",
                       "hunyuanvideo15_720p_t2v", (31, 45, 80), 256, {"num_layers": 4}),
    "wan22_ti2v720": Suite("Wan 2.2 TI2V-5B-shaped, 10 of 30 blocks, 720p", "wan2.2_ti2v_5b",
                           (31, 44, 80), 512, {"num_layers": 10}),
    "wan14b720": Suite("Wan 2.1 14B, 720p", "wan2.1_t2v_14b", (21, 90, 160), 512, lora_only=True),
    "hunyuan13b720": Suite("HunyuanVideo 13B, 720p", "hunyuanvideo_13b", (30, 96, 160), 256,
                           lora_only=True),
}  # fmt: skip

# --smoke: the same code paths on tiny models on the CPU (reference STA, aot_eager compile)
SMOKE_SUITES = {
    "wan480": Suite("wan_tiny (smoke)", "wan_tiny", (5, 16, 16), 16, tile=(1, 2, 2)),
    "wan720": Suite("wan_tiny (smoke)", "wan_tiny", (5, 16, 16), 16, tile=(1, 2, 2)),
    "hunyuan720": Suite("hunyuan_tiny (smoke)", "hunyuan_tiny", (5, 16, 16), 16, tile=(1, 2, 2)),
    "compile": Suite("wan_tiny 1 block (smoke)", "wan_tiny", (5, 16, 16), 16, {"num_layers": 1},
                     tile=(1, 2, 2), compile_only=True),
    "hv15_720p": Suite("hunyuanvideo15_tiny (smoke)", "hunyuanvideo15_tiny", (5, 16, 16), 16,
                       tile=(1, 2, 2)),
    "wan22_ti2v720": Suite("wan22_tiny_ti2v (smoke)", "wan22_tiny_ti2v", (5, 16, 16), 16,
                           tile=(1, 2, 2)),
    "wan14b720": Suite("wan_tiny (smoke)", "wan_tiny", (5, 16, 16), 16, tile=(1, 2, 2),
                       lora_only=True),
    "hunyuan13b720": Suite("hunyuan_tiny (smoke)", "hunyuan_tiny", (5, 16, 16), 16,
                           tile=(1, 2, 2), lora_only=True),
}  # fmt: skip

KINDS = ("dense", "sta", "teacher", "distill", "dmd2", "lora", "lora_bf16", "lora_fp8")
DEFAULT_KINDS = KINDS[:5]
LORA_FROZEN = {"lora": "none", "lora_bf16": "bf16", "lora_fp8": "fp8"}  # train.frozen_weights


class LocalEngine:
    """The engine calls a few-step method makes, for one process without a wrapper."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        self.module = self.model = model
        self.optimizer = optimizer

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Row:
    kind: str
    policy: str  # checkpoint policy; "-" for the teacher (no backward)
    compiled: bool = False
    offload: str = "none"  # LoRA rows: none | single_gpu (conf/offload/single_gpu.yaml)


def suite_rows(suite: Suite, kinds: list[str], policies: list[str], compile: bool,
               offloads: tuple[str, ...] = ("none",)) -> list[Row]:  # fmt: skip
    """The rows of ``suite``: eager ones first (compiling changes the models in place), the
    LoRA rows last (their first one moves the other models off the device), each LoRA row
    with every ``offloads`` setting."""
    if suite.compile_only:
        policy = policies[-1]
        return [Row("distill", policy), Row("distill", policy, compiled=True)]
    rows = []
    for kind in (k for k in kinds if k not in LORA_FROZEN and not suite.lora_only):
        if kind == "teacher":
            rows.append(Row("teacher", "-"))
            continue
        rows.extend(Row(kind, p) for p in policies)
    if compile:
        rows.extend(Row(r.kind, r.policy, True) for r in list(rows) if r.kind != "teacher")
    lora = [k for k in kinds if k in LORA_FROZEN] or (list(LORA_FROZEN) if suite.lora_only else [])
    rows.extend(Row(k, p, offload=o) for k in lora for o in offloads for p in policies)
    return rows


def host_model(model_cfg: ModelConfig, attention: AttentionConfig) -> Any:
    """Random fp32 weights on the host, made quickly (a 14B model's init would take minutes):
    built on the meta device, then N(0, 0.02) matrices, unit norm scales, zero biases."""
    dit = build_model(model_cfg, attention, device="meta", dtype=torch.float32)
    dit.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            else:
                param.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    reset_rope_buffers(dit, "cpu")
    return dit


class Bench:
    """One suite's models, batch and steps; rows reconfigure the same models."""

    def __init__(self, suite: Suite, window: list[int], device: torch.device, backend: str) -> None:
        self.suite, self.device, self.compile_backend = suite, device, backend
        self.sta_cfg = AttentionConfig(mode="sta", tile=list(suite.tile), window=window)
        self.dense_cfg = AttentionConfig(mode="full", tile=list(suite.tile))
        torch.manual_seed(0)
        model_cfg = ModelConfig(flavor=suite.flavor, config_overrides=dict(suite.overrides))
        self.teacher: Any = None
        if suite.lora_only:  # every row builds its LoRA model from these host weights
            self.student = host_model(model_cfg, self.sta_cfg)
        else:
            self.student = build_model(model_cfg, self.sta_cfg, device=device, dtype=torch.float32)
            self.teacher = copy.deepcopy(self.student)
            cast_like_diffusers(
                self.teacher.transformer, torch.bfloat16 if device.type == "cuda" else torch.float32
            )
            self.teacher.set_attention(self.dense_cfg)
            self.teacher.requires_grad_(False).eval()
            self.optimizer = torch.optim.AdamW(
                self.student.parameters(), lr=1e-6, fused=device.type == "cuda"
            )
        student = self.student
        b = 1
        t, h, w = suite.latent
        gen = torch.Generator().manual_seed(1)
        self.batch = {
            "latents": torch.randn(b, student.in_channels, t, h, w, generator=gen).to(device),
            "text": torch.randn(b, suite.text_len, student.text_dim, generator=gen).to(device),
            "text_mask": torch.ones(b, suite.text_len, dtype=torch.bool, device=device),
            "pooled_text": torch.randn(b, student.pooled_dim or 1, generator=gen).to(device),
        }
        self.noise = torch.randn(self.batch["latents"].shape, generator=gen).to(device)
        self.sigma = torch.full((b,), 0.6, device=device)
        self.canvas = student.canvas_for(self.batch["latents"].shape)
        self.tokens = math.prod(self.canvas)
        self.compiled_student = self.compiled_teacher = False
        self.critic = None  # the dmd2 row's, built on first use
        self.lora_model: Any = None  # the LoRA rows' model, rebuilt per row

    def dmd2_step(self, row: Row, critic_ratio: int):
        """One few-step distribution-matching step: critic updates, then the student's."""
        bf16 = self.device.type == "cuda"
        if self.critic is None:
            self.critic = copy.deepcopy(self.student)  # fp32, STA, trainable
            self.critic_optimizer = torch.optim.AdamW(
                self.critic.parameters(), lr=1e-6, fused=self.device.type == "cuda"
            )
        self.critic.enable_gradient_checkpointing(row.policy)
        cfg = DistillConfig(method="dmd2", w_data=0.0)
        cfg.fewstep.critic_ratio = critic_ratio
        critic = LocalEngine(self.critic, self.critic_optimizer)
        method = DMD2Distill(cfg, self.teacher, self.device, bf16=bf16, teacher_bf16=bf16,
                             critic_engine=critic)  # fmt: skip
        student = LocalEngine(self.student, self.optimizer)
        gen = torch.Generator().manual_seed(0)

        def train_step() -> None:
            student.zero_grad()
            method.forward_backward(student, lambda: self.batch, gen, 1)
            student.clip_grad_norm(1.0)
            student.step()

        return train_step

    def lora_step(self, row: Row, rank: int):
        """One LoRA distillation step whose teacher is the frozen base (adapter off), the base
        stored as ``train.frozen_weights`` says for ``row.kind``. The first LoRA row moves
        the suite's full-finetuning models to the host (LoRA rows run last)."""
        bf16 = self.device.type == "cuda"
        if self.teacher is not None:
            self.student.cpu()  # the fp32 weights every LoRA model is built from
            self.teacher = self.critic = None
            self.optimizer.state.clear()
        self.lora_model = None
        free_memory(self.device)
        dit = copy.deepcopy(self.student)
        trainable = apply_lora(dit, rank=rank)
        apply_frozen_weights(dit, LORA_FROZEN[row.kind])  # on the host: the fp32 base never
        dit.to(self.device)  # needs to fit beside the stored one
        dit.enable_gradient_checkpointing(row.policy)
        targets = None
        if row.offload == "single_gpu":  # conf/offload/single_gpu.yaml, as the trainer applies it
            apply_activation_offload(dit, ActivationOffloader(self.device))
            apply_block_swap(dit, min(4, dit.num_layers - 1))  # smoke models have 2 blocks
            targets = ActivationOffloader(self.device)
        self.lora_model = dit
        names = set(trainable)
        params = [p for n, p in dit.named_parameters() if n in names]
        optimizer = torch.optim.AdamW(params, lr=1e-6, fused=self.device.type == "cuda")
        cfg = DistillConfig(w_data=0.0, w_out=1.0, w_attn=1.0)
        step = DistillStep(cfg, BaseModelTeacher(dit), self.device, bf16=bf16, teacher_bf16=bf16,
                           target_offload=targets)  # fmt: skip

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            terms = step.losses(dit, dit, self.batch, self.noise, self.sigma)
            terms["total"].backward()
            optimizer.step()

        return train_step

    def density(self) -> float:
        return float(density(self.canvas, self.suite.tile, torch.tensor([self.sta_cfg.window]))[0])

    def configure(self, row: Row) -> DistillStep:
        """Attention, checkpointing and compile of the student for ``row``; its DistillStep."""
        bf16 = self.device.type == "cuda"
        if row.kind == "dense":
            self.student.set_attention(self.dense_cfg)
        else:
            self.student.set_attention(self.sta_cfg)
        if row.kind != "teacher":
            self.student.enable_gradient_checkpointing(
                row.policy, compile=row.compiled, backend=self.compile_backend
            )
        if row.compiled and row.kind in ("distill", "teacher") and not self.compiled_teacher:
            apply_compile(self.teacher, checkpointed=False, backend=self.compile_backend)
            self.compiled_teacher = True
        if row.kind in ("distill", "teacher"):
            cfg = DistillConfig(w_data=0.0, w_out=1.0, w_attn=1.0)
            teacher = self.teacher
        else:
            cfg, teacher = DistillConfig(w_data=1.0), None
        return DistillStep(cfg, teacher, self.device, bf16=bf16, teacher_bf16=bf16)

    def step_fn(self, row: Row, step: DistillStep):
        """One training step of ``row`` (the teacher row: its captured forward only)."""
        if row.kind == "teacher":
            x_t = add_noise(self.batch["latents"], self.noise, self.sigma)

            def teacher_only() -> None:
                step.teacher_forward(self.batch, x_t, self.sigma, capture=True)

            return teacher_only

        def train_step() -> None:
            self.optimizer.zero_grad(set_to_none=True)
            terms = step.losses(self.student, self.student, self.batch, self.noise, self.sigma)
            terms["total"].backward()
            self.optimizer.step()

        return train_step

    def measure(self, row: Row, warmup: int, iters: int, profile: bool = False,
                critic_ratio: int = 5, lora_rank: int = 64) -> dict[str, Any]:  # fmt: skip
        if row.kind in LORA_FROZEN:
            fn = self.lora_step(row, lora_rank)
            modules = [self.lora_model.attention]
        else:
            step = self.configure(row)
            fn = self.dmd2_step(row, critic_ratio) if row.kind == "dmd2" else self.step_fn(row, step)
            modules = [self.student.attention, self.teacher.attention]
        reset_peak(self.device)
        for _ in range(warmup):
            fn()
        synchronize(self.device)
        times = [time_call(fn, self.device) for _ in range(iters - 1)]
        timer = AttentionTimer(modules, self.device, enabled=not row.compiled)
        timer.start()
        last = time_call(fn, self.device)
        attn_s = timer.stop()
        times.append(last)
        ms = statistics.median(times)
        result = {
            "step_ms": ms,
            "tokens_per_s": self.tokens / (ms / 1e3),
            "peak_gib": peak_gib(self.device),
            "attn_share": attn_s / (last / 1e3) if attn_s == attn_s else None,
            "times_ms": times,
        }
        if profile:
            result["profile"] = profile_step(fn, self.device)
        return result


def run_suite(name: str, suite: Suite, args: argparse.Namespace, device: torch.device,
              budget: Budget) -> list[dict[str, Any]]:  # fmt: skip
    rows = suite_rows(suite, args.kinds, args.policies, args.compile, tuple(args.offload))
    out = []
    bench = None
    for row in rows:
        record = {"suite": name, "title": suite.title, **asdict(row)}
        if budget.exhausted():
            record["error"] = f"skipped: the {budget.seconds:.0f} s budget ran out"
            out.append(record)
            continue
        if bench is None:
            bench = Bench(suite, args.window, device, args.compile_backend)
            meta = {"canvas": list(bench.canvas), "video_tokens": bench.tokens,
                    "text_len": suite.text_len, "tile": list(suite.tile),
                    "window": args.window, "density": bench.density(),
                    "layers": bench.student.num_layers}  # fmt: skip
        record.update(meta)
        print(f"[{budget.elapsed():6.0f} s] {name}: {row}", flush=True)
        measure = functools.partial(bench.measure, row, args.warmup, args.iters, args.profile,
                                    args.critic_ratio, args.lora_rank)  # fmt: skip
        with sdpa_priority(device, args.sdpa):
            record.update(run_guarded(measure, device))
        out.append(record)
    bench = None  # free the suite's models before the next one
    free_memory(device)
    return out


def render_table(env: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One markdown table over all suites; speedups against the suite's dense full-checkpointing step."""
    tiles = ", ".join(sorted({"x".join(map(str, r["tile"])) for r in rows if "tile" in r})) or "-"
    lines = [
        f"One training step, batch 1, random weights (student fp32 + bf16 autocast, teacher bf16), "
        f"fused AdamW, gradient checkpointing per block; STA window {'x'.join(map(str, args.window))} "
        f"tiles (of {tiles} tokens) for every layer and head, Triton kernel; dense attention: SDPA "
        f"({'cuDNN first' if args.sdpa == 'cudnn' else 'torch default order'}); median of "
        f"{args.iters} timed step(s) after {args.warmup} warm-up. {describe_environment(env)}.",
        "",
        "| suite | canvas (video density) | step | checkpointing | compiled | ms | x dense step | "
        "tokens/s | peak GiB | attention share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = {r["suite"]: r["step_ms"] for r in rows
            if r["kind"] == "dense" and r["policy"] == "full" and not r["compiled"] and "step_ms" in r}  # fmt: skip
    for r in rows:
        canvas = "x".join(map(str, r["canvas"])) if "canvas" in r else "-"
        where = f"{canvas} ({r['density']:.1%})" if "density" in r else canvas
        step = r["kind"] + ("" if r.get("offload", "none") == "none" else f", offload={r['offload']}")
        head = f"| {r['title']} | {where} | {step} | {r['policy']} | {'yes' if r['compiled'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | | |")
            continue
        ref = base.get(r["suite"])
        speed = f"{ref / r['step_ms']:.2f}x" if ref and r["kind"] != "teacher" else "-"
        share = fmt(None if r["attn_share"] is None else 100 * r["attn_share"], ".0f")
        share = share if share == "-" else share + "%"
        lines.append(
            f"{head} {r['step_ms']:.0f} | {speed} | {r['tokens_per_s']:,.0f} | "
            f"{fmt(r['peak_gib'], '.1f')} | {share} |"
        )
    lines += ["", *summary_lines(rows)]
    if any("profile" in r for r in rows):
        lines += [
            "",
            "Where one step's time goes (`--profile`: one more step under `torch.profiler`, its "
            "kernels bucketed by name, `benchmarks/step_profile.py`; idle: wall time the GPU ran "
            "no kernel; ms and share of the profiled step):",
            "",
            render_breakdown(rows),
        ]
    return "\n".join(lines)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per suite: the distillation step against dense finetuning (same policy, and the best of
    each), and every compiled row against its eager twin."""
    done = [r for r in rows if "step_ms" in r]
    out = []
    for suite in dict.fromkeys(r["suite"] for r in done):
        mine = [r for r in done if r["suite"] == suite and not r["compiled"]]
        title = mine[0]["title"] if mine else suite
        for policy in ("full", "selective"):
            dense = [r for r in mine if r["kind"] == "dense" and r["policy"] == policy]
            distill = [r for r in mine if r["kind"] == "distill" and r["policy"] == policy]
            if dense and distill:
                ratio = dense[0]["step_ms"] / distill[0]["step_ms"]
                out.append(f"- {title}, {policy} checkpointing: the distillation step runs at "
                           f"{ratio:.2f}x the speed of the dense finetuning step.")  # fmt: skip
        best = {k: min((r["step_ms"] for r in mine if r["kind"] == k), default=None)
                for k in ("dense", "distill")}  # fmt: skip
        if best["dense"] and best["distill"]:
            out.append(f"- {title}, fastest of each: distillation at "
                       f"{best['dense'] / best['distill']:.2f}x the speed of dense finetuning.")  # fmt: skip
        out += lora_lines(title, [r for r in mine if r["kind"] in LORA_FROZEN])
    for r in (r for r in done if r["compiled"]):
        twin = [e for e in done if not e["compiled"] and
                (e["suite"], e["kind"], e["policy"]) == (r["suite"], r["kind"], r["policy"])]  # fmt: skip
        if twin:
            out.append(f"- {r['title']}, {r['kind']} ({r['policy']} checkpointing): compiled "
                       f"{twin[0]['step_ms'] / r['step_ms']:.2f}x the speed of eager.")  # fmt: skip
    return out


def lora_lines(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """The LoRA rows of one suite: each stored base against the fp32 base, and the
    single-GPU offload levers against none, at the same checkpointing (time and peak)."""
    by = {(r["kind"], r["policy"], r.get("offload", "none")): r for r in rows}
    out = []

    def line(what: str, r: dict[str, Any], ref: dict[str, Any]) -> str:
        return (f"- {title}, {r['policy']} checkpointing: {what} takes "
                f"{r['step_ms'] / ref['step_ms']:.2f}x the step time, peak "
                f"{fmt(ref['peak_gib'], '.1f')} -> {fmt(r['peak_gib'], '.1f')} GiB.")  # fmt: skip

    for (kind, policy, offload), r in by.items():
        base = by.get(("lora", policy, offload))
        if kind != "lora" and base:
            where = "" if offload == "none" else f" (offload={offload})"
            out.append(line(f"LoRA with the base in {LORA_FROZEN[kind]}{where}", r, base))
        plain = by.get((kind, policy, "none"))
        if offload != "none" and plain:
            out.append(line(f"{kind} with offload={offload}", r, plain))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--suites",
        default="wan480,wan720,hunyuan720,compile,wan22_ti2v720",
        help=f"comma-separated, from {list(SUITES)}",
    )
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                        help=f"comma-separated, from {KINDS}")  # fmt: skip
    parser.add_argument(
        "--policies",
        default="full,selective",
        help="checkpoint policies (full, selective); the compile suite uses the last",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time compiled variants of every row (slow to compile)",
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--sdpa",
        choices=("cudnn", "default"),
        default="cudnn",
        help="SDPA backend order of the dense attention (cudnn: cuDNN first)",
    )
    parser.add_argument("--window", type=int, nargs=3, default=[3, 3, 3])
    parser.add_argument("--critic-ratio", type=int, default=5, help="dmd2: critic updates")
    parser.add_argument("--lora-rank", type=int, default=64, help="lora rows: the adapter's rank")
    parser.add_argument("--offload", default="none",
                        help="lora rows: comma-separated from none, single_gpu")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--iters", type=int, default=1, help="timed steps per row after the warm-up (median)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=360.0,
        help="rows starting after this many seconds are skipped (recorded)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one more step per row: kernel time by kind (attention, matmul, norm, ...)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="train_step", help="results file stem")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models on the CPU, aot_eager compile: checks the script only",
    )
    args = parser.parse_args(argv)
    args.suites = [s for s in args.suites.split(",") if s]
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.policies = [p for p in args.policies.split(",") if p]
    args.offload = [o for o in args.offload.split(",") if o]
    unknown = [s for s in args.suites if s not in SUITES] + [
        k for k in args.kinds if k not in KINDS
    ]
    unknown += [p for p in args.policies if p not in ("full", "selective")]
    unknown += [o for o in args.offload if o not in ("none", "single_gpu")]
    if unknown or not args.policies or not args.offload or args.iters < 1:
        parser.error(f"unknown or empty choices: {unknown or 'policies/iters'}")
    if args.smoke:
        args.compile_backend = "aot_eager"
        if args.window == [3, 3, 3]:
            args.window = [3, 1, 3]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = bench_device(args.smoke, "train_step.py")
    suites = SMOKE_SUITES if args.smoke else SUITES
    budget = Budget(args.budget_s)
    env = environment(device)
    rows: list[dict[str, Any]] = []
    for name in args.suites:
        rows.extend(run_suite(name, suites[name], args, device, budget))
    meta = {**env, "args": args_record(args), "seconds": budget.elapsed()}
    payload = {"meta": meta, "rows": rows}
    write_results(args.out, args.name, payload, render_table(env, rows, args))


if __name__ == "__main__":
    sys.exit(main())
