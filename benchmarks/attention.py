"""Benchmark the STA backends on a GPU: triton vs flex STA vs dense SDPA (flash, cuDNN).

One run checks the triton kernels against the reference on fresh random bf16 inputs with
awkward geometry (partial tiles, per-head windows, padded text), then times, with
``triton.testing.do_bench`` (median), forward and backward of

    triton STA   (B, S, H, D) raster-ordered inputs, tile order handled in-kernel
    flex STA     compiled flex_attention on tile-ordered (B, H, S, D) inputs (kernel only;
                 the raster -> tile gather it needs is timed on its own row)
    SDPA dense   flash and cuDNN backends, (B, H, S, D)
    triton[fp8]  the FP8 forward (``sliding_tile_attention(..., fp8=True)``: k/v
                 quantisation included, no backward), where it applies (full tiles on a
                 Hopper GPU), with its output's relative error against the bf16 forward's;
                 triton[fp8_2c] the same with two consumer warpgroups, where the default
                 takes three

and prints a table (ms, effective TFLOP/s counting only attended tiles, speedups over cuDNN
dense and over flex), writes JSON (device, versions, date), the markdown table and
``attention.png``, time against window density (``plot_attention.py``, which also redraws
it from a saved JSON without a GPU).

    NCCL_NVLS_ENABLE=0 PYTHONPATH=kernels python benchmarks/attention.py --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import triton
from plot_attention import plot_attention
from triton.testing import do_bench

from sta_kernels import density, sliding_tile_attention
from sta_kernels.flex import _flex_fn, build_sta_block_mask, tile_order
from sta_kernels.kernels.gluon_common import default_consumers
from sta_kernels.ops import (
    KernelConfig,
    fp8_unsupported,
    kernel_resources,
    sta_triton_backward,
    sta_triton_forward,
)
from sta_kernels.reference import sta_dense_mask


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    canvas: tuple[int, int, int]
    tile: tuple[int, int, int]
    heads: int
    head_dim: int
    windows: tuple[tuple[int, int, int], ...]


SHAPES = {
    # HunyuanVideo 720p, 117 frames: 30x48x80 latent tokens, 24 heads of 128
    "hunyuan": Shape("hunyuan-720p", 1, (30, 48, 80), (6, 8, 8), 24, 128,
                     ((3, 3, 3), (3, 3, 5), (5, 6, 10))),
    # Wan 2.1 14B 480p, 81 frames: 21x30x52 latent tokens (partial tiles on every axis), 40 heads
    "wan": Shape("wan-480p", 1, (21, 30, 52), (6, 8, 8), 40, 128, ((3, 3, 3), (4, 4, 7))),
}

# The default before TMA loads and the fused dq (v5, notes/NOTES.md); every variant
# below is a change from it, as measured in its sweep.
V5 = KernelConfig(fwd_tma=False, dq_tma=False, fused_dq=False, fused_dq_tma=False,
                  fwd_gluon=False, bwd_gluon=False)

VARIANTS = {
    # what a call without a config runs: default_config(device, partial tiles or not)
    "default": None,
    "full_fused": KernelConfig(),
    "v5": V5,
    "fwd_n64": replace(V5, fwd_block_n=64),
    "dkdv_s2": replace(V5, bwd_stages=2),
    "dkdv_m32": replace(V5, bwd_block_m=32),
    "dkdv_w16": replace(V5, bwd_warps=16),
    "dkdv_n64w4": replace(V5, bwd_block_n=64, bwd_warps=4),
    "dkdv_n64m128": replace(V5, bwd_block_n=64, bwd_block_m=128),
    "dkdv_n64w4s2": replace(V5, bwd_block_n=64, bwd_warps=4, bwd_stages=2),
    "dq_w16": replace(V5, dq_warps=16),
    # 4-warp blocks small enough for 2 CTAs per SM, deeper dq pipelines
    "dq_m64n64w4s2": replace(V5, dq_block_m=64, dq_block_n=64, dq_warps=4),
    "dq_m64w4s2": replace(V5, dq_block_m=64, dq_warps=4),
    "dq_n64s3": replace(V5, dq_block_n=64, dq_stages=3),
    "dq_n64s4": replace(V5, dq_block_n=64, dq_stages=4),
    "dkdv_s4": replace(V5, bwd_stages=4),
    "dkdv_n64m32w4s3": replace(V5, bwd_block_n=64, bwd_block_m=32, bwd_warps=4),
    # dk/dv's second score matmul issued before the first's exp2 (EARLY_DP)
    "dkdv_edp": replace(V5, bwd_early_dp=True),
    "dkdv_edp_s4": replace(V5, bwd_early_dp=True, bwd_stages=4),
    "dkdv_edp_n64w4s2": replace(V5, bwd_early_dp=True, bwd_block_n=64,
                                bwd_warps=4, bwd_stages=2),
    # v4 = the default before dk/dv EARLY_DP
    "v4": replace(V5, bwd_early_dp=False),
    # TMA (tensor-descriptor) loads of k/v in the forward and dq kernels
    "fwd_tma": replace(V5, fwd_tma=True),
    "dq_tma": replace(V5, dq_tma=True),
    "tma_fd": replace(V5, fwd_tma=True, dq_tma=True),
    # dq added by the dk/dv kernel with fp32 atomics (5 matmuls instead of 7)
    "fused": replace(V5, fwd_tma=True, fused_dq=True),
    "fused_m32": replace(V5, fwd_tma=True, fused_dq=True, bwd_block_m=32),
    "fused_s2": replace(V5, fwd_tma=True, fused_dq=True, bwd_stages=2),
    "fused_m32_s4": replace(V5, fwd_tma=True, fused_dq=True, bwd_block_m=32,
                            bwd_stages=4),
    "fused_n64w4": replace(V5, fwd_tma=True, fused_dq=True, bwd_block_n=64,
                           bwd_warps=4, bwd_stages=2),
    # dq reduce-added through a TMA descriptor (no per-element atomics or their addresses)
    "fused_rtma": replace(V5, fwd_tma=True, fused_dq=True, fused_dq_tma=True),
    "fused_rtma_s2": replace(V5, fwd_tma=True, fused_dq=True, fused_dq_tma=True,
                             bwd_stages=2),
    "fused_rtma_noedp": replace(V5, fwd_tma=True, fused_dq=True,
                                fused_dq_tma=True, bwd_early_dp=False),
    "fused_rtma_m32": replace(V5, fwd_tma=True, fused_dq=True, fused_dq_tma=True,
                              bwd_block_m=32),
    # partial tiles: v9 = per-token index math and pointer gathers at partial tiles (the
    # default before hoisted addressing and TMA reached them)
    "v9": KernelConfig(frames_partial=False),
    "p_dkdv_s2": KernelConfig(bwd_stages=2),
    "p_dkdv_s4": KernelConfig(bwd_stages=4),
    "p_two_kernel": KernelConfig(fused_dq=False),
    "p_fused_ptr": KernelConfig(fused_dq_tma=False),
    "p_fused_ptr_s2": KernelConfig(fused_dq_tma=False, bwd_stages=2),
    "p_two_dkdv_s2": KernelConfig(fused_dq=False, bwd_stages=2),
    "p_two_s2_dq_s3": KernelConfig(fused_dq=False, bwd_stages=2, dq_block_n=64, dq_stages=3),
    # the forward's video queries by the warp-specialised Gluon kernel at full tiles; v10 =
    # the triton forward everywhere (the default before it)
    "v10": KernelConfig(fwd_gluon=False, bwd_gluon=False),
    "gluon_s3": KernelConfig(fwd_gluon_consumers=2, fwd_gluon_stages=3),
    # the backward's video key blocks by the warp-specialised Gluon kernel (gluon_bwd);
    # v11 = the triton backward everywhere (the default before it)
    "v11": KernelConfig(bwd_gluon=False),
    "gluon_bwd_s3": KernelConfig(bwd_gluon_stages=3),
    # the Gluon forward with three consumer warpgroups (query blocks of 3 frames) where the
    # tile's frames divide by 3; gluon_2c = two consumers (the default before it)
    "gluon_2c": KernelConfig(fwd_gluon_consumers=2),
    # ... and three consumers with 2 k buffers instead of 3 (the v ring has 2 either way)
    "gluon_3c_s2": KernelConfig(fwd_gluon_stages=2),
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def lowp_reference(q, k, v, mask, scale):
    """flash-attn style low-precision reference: bf16 matmuls, fp32 softmax."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has, 0.0), -1) * has
    return (p.to(q.dtype) @ vh).transpose(1, 2)


def check_correctness(device: torch.device) -> list[dict]:
    """Triton vs fp64 reference, next to the bf16 low-precision reference's own error."""
    cases = [
        dict(batch=2, canvas=(7, 13, 20), tile=(6, 8, 8), heads=3, head_dim=128,
             window=[[3, 3, 3], [1, 2, 1], [9, 9, 9]], text=[0, 77], slots=80),
        dict(batch=1, canvas=(12, 16, 16), tile=(6, 8, 8), heads=2, head_dim=64,
             window=[[1, 1, 1], [2, 2, 2]], text=[0], slots=0),
        dict(batch=2, canvas=(5, 9, 11), tile=(2, 3, 5), heads=2, head_dim=64,
             window=[[2, 3, 1], [1, 1, 4]], text=[13, 1], slots=13),
    ]
    rows = []
    for case in cases:
        canvas, tile = case["canvas"], case["tile"]
        seq = math.prod(canvas) + case["slots"]
        shape = (case["batch"], seq, case["heads"], case["head_dim"])
        q, k, v, do = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(4))
        window = torch.tensor(case["window"])
        text = torch.tensor(case["text"])
        kw = dict(canvas=canvas, tile=tile, window=window, text_len=text)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = sliding_tile_attention(*leaves, backend="triton", **kw)
        grads = torch.autograd.grad(o, leaves, do)
        ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = sliding_tile_attention(*ref_leaves, backend="reference", **kw)
        ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
        mask = sta_dense_mask(canvas, tile, window, text, seq).to(device)
        low_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        low = lowp_reference(*low_leaves, mask, case["head_dim"] ** -0.5)
        low_grads = torch.autograd.grad(low, low_leaves, do)
        row = {"case": f"{canvas} tile {tile} D={case['head_dim']} text {case['text']}"}
        for name, a, b, r in zip(("o", "dq", "dk", "dv"), (o, *grads), (low, *low_grads),
                                 (ref, *ref_grads), strict=True):
            row[name] = (rel_err(a, r), rel_err(b, r))
            if not torch.isfinite(a).all():
                row[name] = (float("nan"), rel_err(b, r))
        rows.append(row)
    return rows


def attended_pairs(shape: Shape, window) -> float:
    sv = math.prod(shape.canvas)
    dens = density(shape.canvas, shape.tile, torch.tensor([window])).item()
    return dens * sv * sv


def bench_shape(shape: Shape, device: torch.device, variants: dict, reps: int,
                dense_sdpa: bool = True) -> list[dict]:
    sv = math.prod(shape.canvas)
    b, h, d = shape.batch, shape.heads, shape.head_dim
    scale = d**-0.5
    q, k, v, do = (torch.randn(b, sv, h, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    text = torch.zeros(b, dtype=torch.int64)
    results = []

    def timed(fn) -> float:
        return do_bench(fn, warmup=50, rep=reps, return_mode="median")

    def time_fwd_bwd(fn, inputs, grad) -> tuple[float, float]:
        leaves = [x.clone().requires_grad_() for x in inputs]
        fwd = timed(lambda: fn(*leaves))
        out = fn(*leaves)
        bwd = timed(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
        return fwd, bwd

    # dense SDPA, once per shape: (B, H, S, D)
    qh, kh, vh, doh = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
    dense = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION))[:2 if dense_sdpa else 0]:
        try:
            with sdpa_kernel(backend):
                fwd, bwd = time_fwd_bwd(torch.nn.functional.scaled_dot_product_attention,
                                        (qh, kh, vh), doh)
            dense[name] = (fwd, bwd)
        except RuntimeError as err:  # a backend may be unavailable for this build
            print(f"sdpa {name} unavailable: {err}", file=sys.stderr)
    flops_dense = 4.0 * b * h * d * sv * sv
    for name, (fwd, bwd) in dense.items():
        results.append(dict(shape=shape.name, window="dense", impl=f"sdpa-{name}", fwd_ms=fwd,
                            bwd_ms=bwd, fwd_tflops=flops_dense / fwd / 1e9,
                            bwd_tflops=2.5 * flops_dense / bwd / 1e9))

    perm = tile_order(shape.canvas, shape.tile).to(device)
    gather_ms = timed(lambda: [x.index_select(1, perm) for x in (q, k, v)])
    results.append(dict(shape=shape.name, window="-", impl="flex gather q,k,v (raster->tile)",
                        fwd_ms=gather_ms, bwd_ms=float("nan")))
    qt, kt, vt, dot = (x.index_select(1, perm).transpose(1, 2).contiguous() for x in (q, k, v, do))
    flex = _flex_fn(device)
    for wi, window in enumerate(shape.windows):
        wtab = torch.tensor([window] * h)
        flops = 4.0 * b * h * d * attended_pairs(shape, window)
        bm = build_sta_block_mask(shape.canvas, shape.tile, wtab, text, sv, device)
        f_fwd, f_bwd = time_fwd_bwd(partial(flex, block_mask=bm, scale=scale), (qt, kt, vt), dot)
        row = dict(shape=shape.name, window=str(window), impl="flex", fwd_ms=f_fwd, bwd_ms=f_bwd)
        results.append(row)
        wdev = wtab.to(device, torch.int32)
        tdev = text.to(device, torch.int32)
        names = variants if wi == 0 else {"default": variants["default"]}
        base_grads = None
        for vname, cfg in names.items():
            try:
                o, lse = sta_triton_forward(q, k, v, wdev, tdev, shape.canvas, shape.tile,
                                            scale, cfg)
                grads = sta_triton_backward(do, q, k, v, o, lse, wdev, tdev, shape.canvas,
                                            shape.tile, scale, cfg)
                torch.cuda.synchronize()
            except Exception as err:  # a variant that does not compile or launch
                print(f"{shape.name} {window} triton[{vname}] FAILED: {err!r}"[:2000], flush=True)
                results.append(dict(shape=shape.name, window=str(window),
                                    impl=f"triton[{vname}] failed", fwd_ms=float("nan"),
                                    bwd_ms=float("nan")))
                continue
            # a variant's gradients against the first (default) config's, same inputs
            if base_grads is None:
                base_grads, base_o, vs_default = grads, o, {}
            else:
                vs_default = {n: rel_err(a, r) for n, a, r in
                              zip(("dq", "dk", "dv"), grads, base_grads, strict=True)}
            del grads
            t_fwd = timed(partial(sta_triton_forward, q, k, v, wdev, tdev, shape.canvas,
                                  shape.tile, scale, cfg))
            t_bwd = timed(partial(sta_triton_backward, do, q, k, v, o, lse, wdev, tdev,
                                  shape.canvas, shape.tile, scale, cfg))
            split = {}
            if len(names) > 1:  # tuning run: time the two backward kernels alone too
                delta = torch.empty(b, h, sv, device=device, dtype=torch.float32)
                for part in ("dq", "dkdv"):
                    split[part] = timed(partial(
                        sta_triton_backward, do, q, k, v, o, lse, wdev, tdev, shape.canvas,
                        shape.tile, scale, cfg, kernels=(part,), delta=delta))
            results.append(dict(shape=shape.name, window=str(window), impl=f"triton[{vname}]",
                                fwd_ms=t_fwd, bwd_ms=t_bwd, bwd_split_ms=split,
                                grad_rel_err_vs_default=vs_default))
            print(f"{shape.name} {window} triton[{vname}] fwd {t_fwd:.2f} ms bwd {t_bwd:.2f} ms "
                  f"{ {n: round(t, 2) for n, t in split.items()} } "
                  f"vs default { {n: f'{e:.1e}' for n, e in vs_default.items()} } "
                  f"(flex {f_fwd:.2f} / {f_bwd:.2f}) {kernel_resources()}", flush=True)
        if base_grads is not None and fp8_unsupported(q, shape.canvas, shape.tile) is None:
            # the default, and two consumer warpgroups where the default takes three
            fp8_configs = {"fp8": None}
            if default_consumers(shape.tile) == 3:
                fp8_configs["fp8_2c"] = KernelConfig(fwd_fp8_consumers=2)
            for fname, fcfg in fp8_configs.items():
                fp8 = partial(sta_triton_forward, q, k, v, wdev, tdev, shape.canvas,
                              shape.tile, scale, fcfg, fp8=True)
                err = rel_err(fp8()[0], base_o)
                t_fp8 = timed(fp8)
                results.append(dict(shape=shape.name, window=str(window),
                                    impl=f"triton[{fname}] (forward only)", fwd_ms=t_fp8,
                                    bwd_ms=float("nan"), fwd_rel_err_vs_bf16=err))
                print(f"{shape.name} {window} triton[{fname}] fwd {t_fp8:.2f} ms, output vs "
                      f"bf16 {err:.2e}", flush=True)
        for r in results:
            if r["shape"] == shape.name and r["window"] == str(window):
                r["fwd_tflops"] = flops / r["fwd_ms"] / 1e9
                r["bwd_tflops"] = 2.5 * flops / r["bwd_ms"] / 1e9
                r["fwd_vs_flex"] = f_fwd / r["fwd_ms"]
                r["bwd_vs_flex"] = f_bwd / r["bwd_ms"]
                if "cudnn" in dense:
                    r["fwd_vs_cudnn"] = dense["cudnn"][0] / r["fwd_ms"]
                    r["bwd_vs_cudnn"] = dense["cudnn"][1] / r["bwd_ms"]
                r["density"] = attended_pairs(shape, window) / sv / sv
    return results


def fmt(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: list[dict]) -> str:
    head = ("| shape | window | impl | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | "
            "fwd x cuDNN | bwd x cuDNN | fwd x flex | bwd x flex |")
    lines = [head, "|" + " --- |" * 11]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['window']} | {r['impl']} | {fmt(r['fwd_ms'])} | "
            f"{fmt(r.get('bwd_ms'))} | {fmt(r.get('fwd_tflops'), '.0f')} | "
            f"{fmt(r.get('bwd_tflops'), '.0f')} | {fmt(r.get('fwd_vs_cudnn'))} | "
            f"{fmt(r.get('bwd_vs_cudnn'))} | {fmt(r.get('fwd_vs_flex'))} | "
            f"{fmt(r.get('bwd_vs_flex'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="hunyuan,wan")
    parser.add_argument("--variants", default="default",
                        help=f"comma list of triton configs to time at the first window: {list(VARIANTS)}")
    parser.add_argument("--reps", type=int, default=500, help="do_bench rep time per timing, ms")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense SDPA rows")
    parser.add_argument("--windows", type=int, default=0,
                        help="time only the first N windows of each shape (0: all)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA device")
    device = torch.device("cuda")
    meta = dict(
        device=torch.cuda.get_device_name(device), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    checks = [] if args.no_check else check_correctness(device)
    for row in checks:
        print(row["case"], " ".join(f"{n}={row[n][0]:.2e}(bf16 ref {row[n][1]:.2e})"
                                    for n in ("o", "dq", "dk", "dv")))
    variants = {n: VARIANTS[n] for n in args.variants.split(",")}
    if "default" not in variants:
        variants = {"default": None, **variants}
    results = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if args.windows:
            shape = replace(shape, windows=shape.windows[:args.windows])
        results += bench_shape(shape, device, variants, args.reps, not args.no_dense)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    md = table(results)
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(dict(meta=meta, checks=checks, results=results,
                       variants={n: asdict(c) if c else "default_config(device, partial)"
                                 for n, c in variants.items()}), f, indent=1)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                f"{meta['date']}; bf16, B=1, D=128, text_len=0; median of do_bench.\n\n{md}\n")
    out_json = os.path.join(args.out, "attention.json")
    plot_attention(out_json, os.path.join(args.out, "attention.png"))
    print(json.dumps(meta))
    print(md)


if __name__ == "__main__":
    main()
