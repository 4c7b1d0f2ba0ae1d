"""Where a training step's time goes: one step under ``torch.profiler``, its kernels in buckets.

On CUDA every device kernel of the step is put in one bucket by its name (below); what the
buckets do not cover of the step's wall time is time the GPU sat idle (launch gaps, host work,
synchronisation). On the CPU (``--smoke``) the buckets hold the self time of the ATen ops
instead, so the script can be checked without a GPU.

    attention    the STA Triton kernels (_sta_*), SDPA (flash, cuDNN, efficient), flex
    matmul       GEMMs: cuBLAS/cuBLASLt (gemm, nvjet, cutlass, xmma), aten mm/addmm/bmm/linear
    norm         layer/RMS/group norm kernels
    optimizer    the fused AdamW step (multi_tensor_apply, fused_adam)
    rope         rotary-embedding math (ops named rope/rotary, and aten complex multiplies)
    copy/cast    copies, dtype casts, cat/stack, index/gather/scatter, fills
    elementwise  the rest of the pointwise and reduction kernels (activations, modulation, adds,
                 the loss reductions)
    other        whatever matched nothing above
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch

# (bucket, pattern over the lower-cased kernel or op name), first match wins
BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("attention", r"_sta_|sta_fwd|sta_bwd|flash|fmha|sdpa|scaled_dot_product|cudnn.*(attn|mha)"
                      r"|flex_attention|_attn_"),
        ("optimizer", r"multi_tensor|fused_adam|adamw|_foreach"),
        ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm|linear|matmul)\b"),
        ("norm", r"layer_norm|layernorm|rms_norm|rmsnorm|group_norm|native_layer_norm"),
        ("rope", r"rope|rotary|complex|view_as_real"),
        ("copy/cast", r"copy|cast|to_copy|\bcat\b|catarray|stack|index|gather|scatter|fill"
                      r"|memcpy|memset|contiguous|clone"),
        ("elementwise", r"elementwise|vectorized|unrolled|reduce|pointwise|triton_|aten::"),
    )
)  # fmt: skip
ORDER = [name for name, _ in BUCKETS] + ["other"]


def bucket_of(name: str) -> str:
    """The bucket of one kernel or op name."""
    low = name.lower()
    for bucket, pattern in BUCKETS:
        if pattern.search(low):
            return bucket
    return "other"


def profile_step(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Run ``fn`` once under the profiler; milliseconds per bucket, the step's wall time and,
    on CUDA, the idle remainder (wall time minus the sum of kernel times: the kernels of one
    stream do not overlap, so the sum is the busy time).

    Returns ``{"wall_ms", "buckets": {bucket: ms}, "idle_ms" (CUDA only), "top": [(name, ms,
    bucket)] of the 12 costliest kernels}``.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    per_name: dict[str, float] = {}
    for event in prof.events():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time  # a kernel's own duration
        else:
            if event.device_type != torch.autograd.DeviceType.CPU or not event.name.startswith(
                ("aten::", "sta_kernels::")
            ):
                continue
            us = event.self_cpu_time_total
        per_name[event.name] = per_name.get(event.name, 0.0) + us / 1e3
    buckets = dict.fromkeys(ORDER, 0.0)
    for name, ms in per_name.items():
        buckets[bucket_of(name)] += ms
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:12]
    out: dict[str, Any] = {
        "wall_ms": wall_ms,
        "buckets": buckets,
        "top": [(name[:90], ms, bucket_of(name)) for name, ms in top],
    }
    if cuda:
        out["idle_ms"] = max(0.0, wall_ms - sum(buckets.values()))
    return out


def render_breakdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table: one line per profiled row, ms and share of the step per bucket."""
    columns = ORDER + ["idle"]
    head = "| row | step ms | " + " | ".join(columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 2)]
    for row in rows:
        prof = row.get("profile")
        if not prof:
            continue
        wall = prof["wall_ms"]
        cells = [*prof["buckets"].values(), prof.get("idle_ms")]
        text = ["-" if ms is None else f"{ms:.0f} ({100 * ms / wall:.0f}%)" for ms in cells]
        label = f"{row['suite']} {row['kind']} {row['policy']}" + (
            " compiled" if row.get("compiled") else ""
        )
        lines.append(f"| {label} | {wall:.0f} | " + " | ".join(text) + " |")
    return "\n".join(lines)
