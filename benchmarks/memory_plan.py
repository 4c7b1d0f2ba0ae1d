"""Per-GPU memory and all-to-all traffic of an STA distillation step, on paper.

For sizes no machine here holds (Wan 2.1 14B and HunyuanVideo 13B at 720p on 8 GPUs), this
estimates what one GPU keeps during a distillation step under each ``parallel.strategy`` and
``parallel.sp``, and how many bytes Ulysses moves per step. The model shapes come from the
flavors themselves (built on the meta device), so the parameter counts are exact; the
activation terms are formulas, stated below, checked against measured single-GPU peaks
(``--check``, on a GPU: Wan 1.3B at 480p and a few full-width HunyuanVideo blocks at 720p).

Assumptions (bf16 autocast, AdamW, gradient checkpointing per block, batch 1):
- peak = parameters + optimiser state + teacher + the larger of (gradients at the end of
  the backward, activations at its start): activations are freed as gradients fill in.
- student: fp32 parameters, fp32 gradients, two fp32 Adam moments (16 B/parameter);
  ``ddp`` keeps all of it per GPU; ``fsdp2`` shards all of it over the GPUs (plus two
  unsharded bf16 blocks in flight); ``zero2`` keeps bf16 parameters whole and shards fp32
  master weights, gradients and moments; ``zero3`` shards everything (plus two gathered
  blocks).
- teacher: bf16, replicated (or sharded with ``--teacher shard``); with ``--frozen-fp8``
  its block linears take 1 byte per weight plus a 4-byte scale per output row.
- activations: each block's input is kept (fp32, S/sp tokens); one block is recomputed at a
  time in backward, keeping what its backward needs (Megatron's count for S/sp tokens:
  about 20 x hidden + 4 x ffn bf16 values per token (Megatron's 12 x hidden, plus the norm and
  RoPE copies of q and k), plus q, k, v, o and their gradients over
  the whole sequence for H/sp heads after the all-to-all); both models' captured attention
  outputs for the attention loss (bf16, S/sp tokens, every layer; the loss keeps no fp32
  copies of them).
- all-to-all: per attention call 4 tensors of (S, hidden) bf16 each way in the forward, the
  same in the recomputation and the backward, and 4 in the teacher's forward; each rank
  sends (sp - 1) / sp of its shard.

    python benchmarks/memory_plan.py                      # the 720p table, JSON + markdown
    python benchmarks/memory_plan.py --check              # on a GPU: estimate vs measured peak
    python benchmarks/memory_plan.py --frozen-fp8         # the teacher in FP8 (ddp, fsdp2)
    python benchmarks/memory_plan.py --gpus 4 --frozen-fp8 --offload  # and the offload levers
    python benchmarks/memory_plan.py --single-gpu         # LoRA on one GPU: offload levers, bf16 / FP8 base
    python benchmarks/memory_plan.py --check-offload      # on a GPU: each lever's measured peak

``--single-gpu`` (:func:`offload_estimate`): a LoRA student whose frozen base is also its
dense teacher (its fp32 weights, or under ``train.frozen_weights=bf16`` / ``fp8`` its block
linears in bf16 / FP8), in one process, with the ``offload`` levers of ``docs/configuration.md#memory``:
``offload.activations`` keeps two blocks' inputs on the GPU (the one in use, the one being
copied) instead of every block's; ``offload.teacher_attention`` two layers' targets instead of
every layer's; ``offload.block_swap=N`` keeps the non-block weights and N + 2 blocks of the
frozen base (N resident, one computing, one being copied). What leaves the GPU waits in pinned
host memory (``host`` column).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

GIB = 2**30
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model at one resolution."""

    name: str
    flavor: str
    params: int  # student parameters
    block_params: int  # the largest transformer block
    layers: int  # STA layers (= blocks)
    hidden: int
    ffn: int
    heads: int
    tokens: int  # video tokens S
    text: int  # joint text tokens (HunyuanVideo) or cross-attention text (Wan)
    joint_text: bool


def model_shape(name: str, flavor: str, canvas: tuple[int, int, int], text: int,
                overrides: dict | None = None) -> Shape:  # fmt: skip
    """Exact sizes of ``flavor`` (built on the meta device) at a token ``canvas``."""
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    dit = build_model(
        ModelConfig(flavor=flavor, config_overrides=overrides or {}),
        AttentionConfig(mode="full"),
        device="meta",
    )
    blocks = dit.adapter.blocks(dit.transformer)
    cfg = dit.transformer.config
    hidden = dit.num_heads * dit.head_dim
    ffn = int(cfg.ffn_dim) if dit.family == "wan" else int(hidden * cfg.mlp_ratio)
    return Shape(
        name=name,
        flavor=flavor,
        params=sum(p.numel() for p in dit.parameters()),
        block_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        layers=dit.num_layers,
        hidden=hidden,
        ffn=ffn,
        heads=dit.num_heads,
        tokens=math.prod(canvas),
        text=text,
        joint_text=dit.adapter.joint_text,
    )


def _stored_linears(flavor: str, overrides: dict | None) -> tuple[int, list[nn.Linear]]:
    """All parameters of ``flavor`` and the frozen block linears that ``train.frozen_weights``
    stores (``stafinetune.models.fp8.frozen_linear_names``), built on the meta device."""
    from stafinetune.models import AttentionConfig, ModelConfig, build_model
    from stafinetune.models.fp8 import frozen_linear_names

    dit = build_model(
        ModelConfig(flavor=flavor, config_overrides=overrides or {}),
        AttentionConfig(mode="full"),
        device="meta",
    ).requires_grad_(False)
    layers = [dit.transformer.get_submodule(n) for n in frozen_linear_names(dit)]
    return sum(p.numel() for p in dit.parameters()), layers


def fp8_teacher_bytes_per_param(
    flavor: str, overrides: dict | None = None, rest_bytes: int = 2
) -> float:
    """Bytes per teacher parameter under ``train.frozen_weights=fp8``: the block linears of
    ``stafinetune.models.fp8`` at 1 byte plus a 4-byte scale per output row, the rest at
    ``rest_bytes`` (2: a bf16 teacher; 4: a LoRA student's fp32 base)."""
    params, layers = _stored_linears(flavor, overrides)
    fp8 = sum(m.weight.numel() for m in layers)
    rows = sum(m.out_features for m in layers)
    return (rest_bytes * (params - fp8) + fp8 + 4 * rows) / params


def bf16_base_bytes_per_param(flavor: str, overrides: dict | None = None) -> float:
    """Bytes per parameter of a LoRA student's fp32 base under ``train.frozen_weights=bf16``:
    the block linears' weights and biases at 2 bytes, the rest at 4."""
    params, layers = _stored_linears(flavor, overrides)
    stored = sum(p.numel() for m in layers for p in m.parameters())
    return (4 * (params - stored) + 2 * stored) / params


def estimate(shape: Shape, *, strategy: str, sp: int, gpus: int, teacher: str = "replicate",
             attention_loss: bool = True, teacher_bytes_per_param: float = 2.0,
             offload: bool = False) -> dict[str, float]:  # fmt: skip
    """GiB per GPU by component, and all-to-all GiB sent per GPU per step.

    ``teacher_bytes_per_param``: 2 (bf16), or :func:`fp8_teacher_bytes_per_param`.
    ``offload``: ``offload.activations`` and ``offload.teacher_attention`` on (two blocks'
    inputs and two layers' teacher targets stay on the GPU, as in :func:`offload_estimate`)."""
    p, n = shape.params, gpus
    block = shape.block_params
    # resident: parameters and optimiser state; grads: what the gradients take at the end of
    # the backward (activations are freed as gradients fill in, so only the larger counts)
    if strategy == "ddp":
        resident, grads = 12 * p + 4 * p, 4 * p  # + DDP's gradient buckets
    elif strategy == "fsdp2":
        resident, grads = 12 * p / n + 2 * 2 * block, 4 * p / n
    elif strategy == "zero2":
        resident, grads = 2 * p + (4 + 8) * p / n, 2 * p / n + 2 * block
    elif strategy == "zero3":
        resident, grads = 2 * p / n + (4 + 8) * p / n + 2 * 2 * block, 2 * p / n + 2 * block
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    tb = teacher_bytes_per_param
    teacher_bytes = tb * p if teacher == "replicate" else tb * p / n + tb * 2 * block
    s_loc = math.ceil(shape.tokens / sp)
    rows = s_loc + (shape.text if shape.joint_text else 0)
    kept_inputs = (2 if offload else shape.layers) * rows * shape.hidden * 4
    whole = shape.tokens + (shape.text if shape.joint_text else 0)
    attention_working = 4 * whole * shape.hidden / sp * 2 * 2  # q, k, v, o and their grads
    ffn_working = rows * (20 * shape.hidden + 4 * shape.ffn) * 2  # one block's saved tensors
    # the student's and the teacher's captured attention outputs
    captured_layers = shape.layers + (2 if offload else shape.layers)
    captured = (captured_layers if attention_loss else 0) * rows * shape.hidden * 2
    a2a_tensor = shape.tokens * shape.hidden * 2 * (sp - 1) / sp / sp  # bytes one rank sends
    a2a = shape.layers * (8 + 4 + 4 + 4) * a2a_tensor if sp > 1 else 0.0
    activations = kept_inputs + attention_working + ffn_working + captured
    out = {
        "student": resident + grads,
        "teacher": teacher_bytes,
        "kept_block_inputs": kept_inputs,
        "recompute_working_set": attention_working + ffn_working,
        "captured_attention": captured,
    }
    gib = {k: v / GIB for k, v in out.items()}
    gib["total"] = (resident + teacher_bytes + max(grads, activations)) / GIB
    gib["all_to_all_gib_per_step"] = a2a / GIB
    return gib


def step_seconds(shape: Shape, *, sp: int, density: float, tflops: float = 600.0,
                 a2a_gbps: float = 150.0) -> dict[str, float]:  # fmt: skip
    """A rough step time per GPU: linear-layer and STA FLOPs at ``tflops``, all-to-all at
    ``a2a_gbps`` GB/s per GPU (NVLink all-to-all in practice), and the all-to-all share."""
    tokens = shape.tokens / sp
    linear = 2 * shape.params * tokens * (3 + 1 + 1)  # student fwd+bwd, recompute, teacher fwd
    attn_pairs = shape.tokens * shape.tokens * density * shape.heads / sp
    attention = 4 * attn_pairs * (shape.hidden // shape.heads) * shape.layers
    attention = attention * (1 + 2.5 + 1) + 4 * shape.tokens**2 * shape.hidden / sp * shape.layers
    compute = (linear + attention) / (tflops * 1e12)
    a2a = estimate(shape, strategy="fsdp2", sp=sp, gpus=8)["all_to_all_gib_per_step"]
    comm = a2a * GIB / (a2a_gbps * 1e9)
    return {"compute_s": compute, "all_to_all_s": comm, "all_to_all_share": comm / (compute + comm)}


def plan_720p(gpus: int = 8, budget_gib: float = 80.0, frozen_fp8: bool = False,
              offload: bool = False) -> dict:  # fmt: skip
    """The table of docs/parallel.md: Wan 14B and HunyuanVideo 13B at 720p on ``gpus`` GPUs
    (``frozen_fp8``: the teacher under ``train.frozen_weights=fp8``, ddp and fsdp2 only;
    ``offload``: activation and attention-target offload, see :func:`estimate`)."""
    shapes = [
        model_shape("wan2.1-14B 720p", "wan2.1_t2v_14b", (21, 45, 80), 512),
        model_shape("hunyuanvideo-13B 720p", "hunyuanvideo_13b", (30, 48, 80), 256),
    ]
    rows = []
    for shape in shapes:
        tb = fp8_teacher_bytes_per_param(shape.flavor) if frozen_fp8 else 2.0
        for strategy in ("ddp", "fsdp2") if frozen_fp8 else ("ddp", "fsdp2", "zero2", "zero3"):
            for sp in (s for s in (1, 2, 4, 8) if s <= gpus):  # sp divides the launch
                est = estimate(shape, strategy=strategy, sp=sp, gpus=gpus,
                               teacher_bytes_per_param=tb, offload=offload)  # fmt: skip
                timing = step_seconds(shape, sp=sp, density=0.09)
                rows.append({"model": shape.name, "strategy": strategy, "sp": sp, **est,
                             **timing, "fits": est["total"] <= budget_gib * 0.9})  # fmt: skip
    return {"gpus": gpus, "budget_gib": budget_gib, "shapes": [asdict(s) for s in shapes],
            "frozen_fp8": frozen_fp8, "offload": offload, "rows": rows}  # fmt: skip


def markdown(plan: dict) -> str:
    lines = [
        f"Per-GPU memory (GiB) of an STA distillation step on {plan['gpus']} GPUs, batch 1, "
        "bf16 autocast, gradient checkpointing, attention loss on"
        f"{'; the teacher with FP8 block linears' if plan.get('frozen_fp8') else ''}"
        f"{'; activations and attention targets offloaded' if plan.get('offload') else ''}"
        "; fits = under 90% of "
        f"{plan['budget_gib']:.0f} GiB. All-to-all share from a 600 TFLOP/s, 150 GB/s model.",
        "",
        "| model | strategy | sp | student | teacher | activations | total | fits | a2a GiB/step | a2a share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in plan["rows"]:
        act = r["kept_block_inputs"] + r["recompute_working_set"] + r["captured_attention"]
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['sp']} | {r['student']:.1f} | "
            f"{r['teacher']:.1f} | {act:.1f} | {r['total']:.1f} | "
            f"{'yes' if r['fits'] else 'no'} | {r['all_to_all_gib_per_step']:.1f} | "
            f"{r['all_to_all_share']:.1%} |"
        )
    return "\n".join(lines)


def measure(flavor: str, canvas: tuple[int, int, int], text: int, overrides: dict,
            offload: Offload | None = None) -> float:  # fmt: skip
    """Peak GiB of one real distillation step (student STA + dense teacher) on this GPU, with
    ``offload``'s levers (block swap: of the teacher)."""
    from stafinetune.config import DistillConfig
    from stafinetune.models import AttentionConfig, ModelConfig, build_model
    from stafinetune.training.distill import DistillStep

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    student = build_model(ModelConfig(flavor=flavor, config_overrides=overrides),
                          AttentionConfig(tile=[6, 8, 8], window=[3, 3, 3]), device=device)  # fmt: skip
    student.enable_gradient_checkpointing()
    teacher = build_model(ModelConfig(flavor=flavor, config_overrides=overrides),
                          AttentionConfig(mode="full"), device=device, dtype=torch.bfloat16)  # fmt: skip
    teacher.requires_grad_(False)
    offload = offload or Offload()
    targets = apply_offload_levers(student, teacher, offload)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    step = DistillStep(DistillConfig(w_data=0.0, w_out=1.0, w_attn=1.0), teacher, device,
                       bf16=True, teacher_bf16=True, target_offload=targets)  # fmt: skip
    t, h, w = canvas
    pt, ph, pw = student.patch_size
    batch = {
        "latents": torch.randn(1, student.in_channels, t * pt, h * ph, w * pw, device=device),
        "text": torch.randn(1, text, student.text_dim, device=device),
        "text_mask": torch.ones(1, text, dtype=torch.bool, device=device),
        "pooled_text": torch.randn(1, student.pooled_dim or 1, device=device),
    }
    noise = torch.randn_like(batch["latents"])
    sigma = torch.full((1,), 0.5, device=device)
    for _ in range(2):  # the second step has the optimiser state allocated
        terms = step.losses(student, student, batch, noise, sigma)
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def check() -> dict:
    """Estimate (one process, sp=1) against the measured peak at two real shapes."""
    cases = [
        ("wan2.1-1.3B 480p", "wan2.1_t2v_1.3b", (21, 30, 52), 512, {}),
        ("hunyuanvideo 4 blocks 720p", "hunyuanvideo_13b", (30, 48, 80), 256,
         {"num_layers": 2, "num_single_layers": 2}),
    ]  # fmt: skip
    out = []
    for name, flavor, canvas, text, overrides in cases:
        shape = model_shape(name, flavor, canvas, text, overrides)
        predicted = estimate(shape, strategy="fsdp2", sp=1, gpus=1)  # one process: no buckets
        measured = measure(flavor, canvas, text, overrides)
        out.append({"case": name, "predicted_gib": predicted["total"], "measured_gib": measured,
                    "ratio": predicted["total"] / measured, "components": predicted})  # fmt: skip
        torch.cuda.empty_cache()
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "cases": out}  # fmt: skip


@dataclass(frozen=True)
class Offload:
    """The ``offload`` levers of one row (``OffloadConfig``'s fields)."""

    activations: bool = False
    teacher_attention: bool = False
    block_swap: int | None = None

    def label(self) -> str:
        parts = [name for name in ("activations", "teacher_attention") if getattr(self, name)]
        if self.block_swap is not None:
            parts.append(f"block_swap={self.block_swap}")
        return ", ".join(parts) or "none"


def offload_estimate(shape: Shape, offload: Offload, *, lora_rank: int = 64,
                     base_bytes_per_param: float = 4.0) -> dict[str, float]:  # fmt: skip
    """GiB on the one GPU and in pinned host memory of a LoRA distillation step whose teacher
    is the student's base (fp32, as the student is built; autocast computes in bf16), with
    ``offload``'s levers (the activation terms as in :func:`estimate`, at sp=1).

    ``base_bytes_per_param``: 4 (fp32), or under ``train.frozen_weights=fp8`` /
    ``bf16`` :func:`fp8_teacher_bytes_per_param` with ``rest_bytes=4`` /
    :func:`bf16_base_bytes_per_param` (taken as the blocks' too)."""
    block_bytes = base_bytes_per_param * shape.block_params
    base = base_bytes_per_param * shape.params
    on_device_base = base
    if offload.block_swap is not None:
        in_flight = min(offload.block_swap + 2, shape.layers)
        on_device_base = base - block_bytes * (shape.layers - in_flight)
    adapter = shape.layers * 4 * 2 * lora_rank * shape.hidden  # q, k, v, out: A and B
    adapter_state = 16 * adapter  # fp32 weights, gradients and Adam's two moments
    rows = shape.tokens + (shape.text if shape.joint_text else 0)
    block_input = rows * shape.hidden * 4
    layer_output = rows * shape.hidden * 2
    kept = (2 if offload.activations else shape.layers) * block_input
    working = 4 * rows * shape.hidden * 2 * 2 + rows * (20 * shape.hidden + 4 * shape.ffn) * 2
    student_attention = shape.layers * layer_output
    teacher_attention = (2 if offload.teacher_attention else shape.layers) * layer_output
    host = (
        (base - on_device_base)
        + (shape.layers * block_input - kept)
        + (shape.layers * layer_output - teacher_attention)
    )
    gib = {
        "base": on_device_base, "adapter": adapter_state, "kept_block_inputs": kept,
        "recompute_working_set": working,
        "captured_attention": student_attention + teacher_attention, "host": host,
    }  # fmt: skip
    out = {k: v / GIB for k, v in gib.items()}
    out["total"] = sum(v for k, v in out.items() if k != "host")
    return out


def apply_offload_levers(student: Any, teacher: Any, offload: Offload) -> Any:
    """Put ``offload``'s levers on a checkpointed student and its separate teacher (as the
    trainer does); returns the offloader of the teacher's attention targets, or None."""
    from stafinetune.models.block_swap import apply_block_swap
    from stafinetune.models.offload import ActivationOffloader, apply_activation_offload

    device = next(student.parameters()).device
    if offload.activations:
        apply_activation_offload(student, ActivationOffloader(device))
    if offload.block_swap is not None:
        apply_block_swap(teacher, offload.block_swap)
    return ActivationOffloader(device) if offload.teacher_attention else None


def check_offload() -> dict:
    """On a GPU: the measured peak of a Wan 1.3B distillation step at 480p (full finetune,
    separate bf16 teacher) with each lever, and what it saved against no lever."""
    levers = [
        Offload(),
        Offload(activations=True),
        Offload(teacher_attention=True),
        Offload(block_swap=4),
        Offload(activations=True, teacher_attention=True, block_swap=4),
    ]
    rows = []
    for offload in levers:
        peak = measure("wan2.1_t2v_1.3b", (21, 30, 52), 512, {}, offload)
        rows.append({"offload": offload.label(), "measured_gib": peak})
        torch.cuda.empty_cache()
    for row in rows:
        row["saved_gib"] = rows[0]["measured_gib"] - row["measured_gib"]
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(), "rows": rows}  # fmt: skip


def plan_single_gpu(budget_gib: float = 80.0) -> dict:
    """Wan 2.1 14B LoRA distillation on one GPU at 480p and 720p, lever by lever."""
    shapes = [
        model_shape("wan2.1-14B 480p", "wan2.1_t2v_14b", (21, 30, 52), 512),
        model_shape("wan2.1-14B 720p", "wan2.1_t2v_14b", (21, 45, 80), 512),
    ]
    levers = [
        Offload(),
        Offload(block_swap=4),
        Offload(activations=True, block_swap=4),
        Offload(activations=True, teacher_attention=True, block_swap=4),
        Offload(activations=True, teacher_attention=True, block_swap=0),
    ]
    fp8_levers = [
        Offload(),
        Offload(activations=True, teacher_attention=True),
        Offload(activations=True, teacher_attention=True, block_swap=4),
    ]
    fp8_bytes = fp8_teacher_bytes_per_param("wan2.1_t2v_14b", rest_bytes=4)
    bf16_bytes = bf16_base_bytes_per_param("wan2.1_t2v_14b")
    rows = []
    for shape in shapes:
        for frozen, bytes_per_param, row_levers in (("fp32", 4.0, levers),
                                                    ("bf16", bf16_bytes, fp8_levers),
                                                    ("fp8", fp8_bytes, fp8_levers)):  # fmt: skip
            for offload in row_levers:
                est = offload_estimate(shape, offload, base_bytes_per_param=bytes_per_param)
                rows.append({"model": shape.name, "frozen": frozen, "offload": offload.label(),
                             **est, "fits": est["total"] <= budget_gib * 0.9})  # fmt: skip
    return {"budget_gib": budget_gib, "shapes": [asdict(s) for s in shapes], "rows": rows}


def markdown_single_gpu(plan: dict) -> str:
    lines = [
        "GiB of a LoRA (rank 64) STA distillation step on one GPU, its teacher the frozen "
        "base (fp32, or with train.frozen_weights=bf16 / fp8 its block linears in bf16 / FP8), "
        "batch 1, bf16 "
        "autocast, gradient checkpointing, attention loss on; fits = under "
        f"90% of {plan['budget_gib']:.0f} GiB; host = pinned host memory the levers use.",
        "",
        "| model | frozen base | offload | base | block inputs | attention outputs | working set | total | fits | host |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in plan["rows"]:
        lines.append(
            f"| {r['model']} | {r.get('frozen', 'fp32')} | {r['offload']} | {r['base']:.1f} | "
            f"{r['kept_block_inputs']:.1f} | "
            f"{r['captured_attention']:.1f} | {r['recompute_working_set']:.1f} | "
            f"{r['total']:.1f} | {'yes' if r['fits'] else 'no'} | {r['host']:.1f} |"
        )
    return "\n".join(lines)


def offload_results(*, measured: bool, budget_gib: float) -> None:
    """Write and print ``--check-offload`` (``measured``, on a GPU) or ``--single-gpu``."""
    if measured:
        name, result = "memory_check_offload", check_offload()
        text = "\n".join(f"{r['offload']}: {r['measured_gib']:.1f} GiB measured, "
                         f"{r['saved_gib']:.1f} saved" for r in result["rows"])  # fmt: skip
    else:
        name, result = "memory_plan-1gpu", plan_single_gpu(budget_gib)
        text = markdown_single_gpu(result)
        (RESULTS / f"{name}.md").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="measure peaks on this GPU")
    parser.add_argument("--single-gpu", action="store_true",
                        help="LoRA on one GPU with the offload levers")  # fmt: skip
    parser.add_argument("--check-offload", action="store_true",
                        help="measure each offload lever's peak on this GPU")  # fmt: skip
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--budget-gib", type=float, default=80.0)
    parser.add_argument("--frozen-fp8", action="store_true",
                        help="the teacher under train.frozen_weights=fp8")  # fmt: skip
    parser.add_argument("--offload", action="store_true",
                        help="offload.activations and offload.teacher_attention on")  # fmt: skip
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.check_offload or args.single_gpu:
        offload_results(measured=args.check_offload, budget_gib=args.budget_gib)
        return
    if args.check:
        result = check()
        (RESULTS / "memory_check.json").write_text(json.dumps(result, indent=1))
        for case in result["cases"]:
            print(f"{case['case']}: predicted {case['predicted_gib']:.1f} GiB, measured "
                  f"{case['measured_gib']:.1f} GiB (ratio {case['ratio']:.2f})")  # fmt: skip
        return
    plan = plan_720p(args.gpus, args.budget_gib, frozen_fp8=args.frozen_fp8, offload=args.offload)
    name = (f"memory_plan-{args.gpus}gpu{'-fp8' if args.frozen_fp8 else ''}"
            f"{'-offload' if args.offload else ''}")  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps(plan, indent=1))
    table = markdown(plan)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
