"""Where the Gluon kernels' time goes: time copies of them with one part taken out.

A lab probe, not part of the product: it edits the kernels' source as text, so its edits
follow the kernels by hand (it stops, naming the edit, when one no longer applies).

Hardware counters (ncu) say which pipe is busy, not what a part of the kernel costs; and
not every device machine lets ncu read them. So this script measures the share of each part
of the Gluon forward (``sta_kernels.kernels.gluon_fwd``) and backward (``gluon_bwd``) by
removing it:
each ablation is a few exact text edits of the kernel's source (the script stops if an edit
no longer applies), loaded as its own module and timed against the unmodified kernel in the
same run, rounds interleaved. Ablated kernels compute wrong outputs by design; only their
time is meaningful.

Forward (HunyuanVideo's default: three consumer warpgroups, ``_consumer_seq``):

- ``no_kv_loads``: the producer loads k and v for the first ring pass only and then just
  arrives on the ready barriers (the consumers reread stale buffers): the cost of streaming
  k and v from L2 (77 GB per HunyuanVideo (3,3,3) forward with three consumers).
- ``no_qk``: no score matmul (scores made from the row, the column and the block index
  instead: about a hundred ALU instructions per block).
- ``no_pv``: no PV matmul, nor its wait (p is still summed into the row sums).
- ``no_exp2``: the block's exponentials replaced by their arguments (no ``MUFU.EX2``).
- ``no_row_max``: a constant running max (no max reduction over the scores).
- ``no_rescale``: the accumulator never multiplied by the rescale factor.

Backward (video key blocks, with the stats pass that precedes them):

- ``bwd_no_qdo_loads``: q, do and the stats row loaded for the first ring pass only.
- ``bwd_no_exp2``: p^T's exponentials replaced by their arguments.
- ``bwd_no_dq_reduce``: dq staged in shared memory but never added into the fp32 buffer.

    python notes/probes/gluon_ablation.py                    # on a Hopper GPU
    python notes/probes/gluon_ablation.py --compile-only     # sm_90 builds, no GPU needed

Writes ``gluon_ablation.{json,md}`` under ``--out`` (default ``$OUT`` or
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT / "benchmarks")]

from bench_util import describe_environment, environment, write_results  # noqa: E402

# the kernels' sources; their modules are imported only when needed (triton reads
# TRITON_INTERPRET when it decorates them, and the CPU tests set it late)
KERNEL_FILES = {kernel: ROOT / "kernels" / "sta_kernels" / "kernels" / f"{stem}.py"
                for kernel, stem in (("fwd", "gluon_fwd"), ("bwd", "gluon_bwd"))}


def _first_pass_only(x: str) -> tuple[str, str]:
    """The producer's TMA load of ``x`` (k or v) kept for the first ring pass only; later
    blocks just arrive on the ready barrier (the call's continuation lines may keep their
    indentation inside its parentheses)."""
    call = f"            _load_block(j, video_trips, {x}_desc,"
    return call, (f"            if j >= STAGES:\n"
                  f"                mbarrier.arrive({x}_ready.index(stage), count=1)\n"
                  f"            else:\n    {call}")


# anchors in the three-consumer loop (``_consumer_seq``: HunyuanVideo's 6-frame tiles)
_SCORES = """\
            s_tok = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok,))  # (M, N) raw scores
"""
_PV = """\
            o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            mbarrier.arrive(v_empty.index(v_stage), count=1)
"""
_RESCALE = """\
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            v_stage = j % V_STAGES
"""
_BWD_STATS_AND_LOADS = [
    ("            mbarrier.expect(bar, NBYTES)\n            if j < video_trips:\n",
     "            blk = j * 0\n            if j >= STAGES:\n"
     "                mbarrier.arrive(bar, count=1)\n            elif j < video_trips:\n"
     "                mbarrier.expect(bar, NBYTES)\n"),
    ("            else:\n                row = num_video + (j - video_trips) * (TH * TW)\n",
     "            else:\n                mbarrier.expect(bar, NBYTES)\n"
     "                row = num_video + (j - video_trips) * (TH * TW)\n"),
    ("            tma_load(st_desc, [st_row0 + blk, 0], bar, st_bufs.index(stage))\n",
     "            if j < STAGES:\n"
     "                tma_load(st_desc, [st_row0 + blk, 0], bar, st_bufs.index(stage))\n"),
]
# name: (kernel, [(old, new), ...]): exact edits of the kernel's source (gluon_fwd.py for
# "fwd", gluon_bwd.py for "bwd"), each applied once
ABLATIONS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "no_kv_loads": ("fwd", [_first_pass_only("k"), _first_pass_only("v")]),
    "no_qk": ("fwd", [(_SCORES, """\
            rows = gl.arange(0, M, layout=gl.SliceLayout(1, s_layout)).to(gl.float32)
            s = (zero_s + gl.expand_dims(rows, 1) * 0.001
                 + gl.expand_dims((cols + j).to(gl.float32), 0) * 0.01)
""")]),
    "no_pv": ("fwd", [(_PV, """\
            mbarrier.arrive(v_empty.index(v_stage), count=1)
""")]),
    "no_exp2": ("fwd", [("        p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))\n",
                         "        p = s * scale_log2 - gl.expand_dims(m_new, 1)\n")]),
    "no_row_max": ("fwd", [("        m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)\n",
                            "        m_new = gl.maximum(m_i, 8.0)\n")]),
    "no_rescale": ("fwd", [(_RESCALE, _RESCALE.split("\n", 1)[1])]),
    "bwd_no_qdo_loads": ("bwd", _BWD_STATS_AND_LOADS),
    "bwd_no_exp2": ("bwd", [
        ("            p = gl.exp2(s * scale_log2 - gl.expand_dims(lse, 0))\n",
         "            p = s * scale_log2 - gl.expand_dims(lse, 0)\n")]),
    "bwd_no_dq_reduce": ("bwd", [
        ("                _tma_add(dq_desc, [b, qt, qh, qw, col + C * HALF], dq_buf)\n",
         "                pass\n"),
        ("                _tma_add(dqr_desc, [b, num_video + (j - video_trips) * M, col + C * HALF],"
         "\n                         as_box(dq_buf, dqr_desc))\n", "                pass\n")]),
}


def kernel_module(kernel: str) -> ModuleType:
    """The unmodified module of ``kernel``: "fwd" (``gluon_fwd``) or "bwd" (``gluon_bwd``)."""
    return importlib.import_module(f"sta_kernels.kernels.{KERNEL_FILES[kernel].stem}")


def ablated_source(name: str) -> str:
    """The kernel's source with ablation ``name``'s edits applied (each exactly once)."""
    kernel, edits = ABLATIONS[name]
    path = KERNEL_FILES[kernel]
    source = path.read_text()
    for old, new in edits:
        found = source.count(old)
        if found != 1:
            raise RuntimeError(f"ablation {name}: an edit's anchor occurs {found} times in "
                               f"{path} (expected once); update ABLATIONS:\n{old}")
        source = source.replace(old, new)
    return source


def load_ablated(name: str, folder: Path) -> ModuleType:
    """Ablation ``name`` as a module of the ``sta_kernels.kernels`` package (its relative
    imports resolve there), from a file in ``folder`` (triton reads the kernels' source from
    it: keep it until they compile)."""
    path = folder / f"_ablation_{name}.py"
    path.write_text(ablated_source(name))
    spec = importlib.util.spec_from_file_location(f"sta_kernels.kernels._ablation_{name}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compile_only(names: list[str], folder: Path) -> list[dict]:
    """Build the unmodified kernels and the ablated copies for sm_90 (HunyuanVideo, 2
    stages) and report their registers, spills and shared memory."""
    import compile_report as cr

    kernels = sorted({ABLATIONS[n][0] for n in names})
    rows = [{"variant": f"default {k}", **cr.gluon_report("hunyuan", kernel=k)}
            for k in kernels]
    for name in names:
        kernel = ABLATIONS[name][0]
        rows.append({"variant": name, **cr.gluon_report(
            "hunyuan", kernel=kernel, module=load_ablated(name, folder))})
    return rows


def _inputs(window: tuple[int, int, int]) -> dict:
    """HunyuanVideo 720p inputs on the GPU (random, seeded), with o and lse from the
    unmodified forward for the backward."""
    gluon_fwd = kernel_module("fwd")
    canvas, tile, heads, head_dim = (30, 48, 80), (6, 8, 8), 24, 128
    seq = canvas[0] * canvas[1] * canvas[2]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                               generator=gen) for _ in range(4))
    x = dict(q=q, k=k, v=v, do=do, o=torch.empty_like(q), canvas=canvas, tile=tile,
             scale=head_dim**-0.5, lse=torch.empty(1, heads, seq, device="cuda"),
             windows=torch.tensor([window] * heads, device="cuda", dtype=torch.int32),
             text_len=torch.zeros(1, device="cuda", dtype=torch.int32))
    gluon_fwd.sta_gluon_video_forward(x["q"], k, v, x["o"], x["lse"], x["windows"],
                                      x["text_len"], canvas, tile, x["scale"])
    x.update(delta=torch.empty_like(x["lse"]), dq_acc=torch.zeros(q.shape, device="cuda"),
             dk=torch.empty_like(q), dv=torch.empty_like(q))
    return x


def _call(kernel: str, module: ModuleType, x: dict):
    """One launch of ``module``'s video-block kernel: the forward's video queries, or the
    backward's video key blocks (its stats pass included; dq accumulates across calls)."""
    if kernel == "fwd":
        return lambda: module.sta_gluon_video_forward(
            x["q"], x["k"], x["v"], x["o"], x["lse"], x["windows"], x["text_len"], x["canvas"],
            x["tile"], x["scale"])
    return lambda: module.sta_gluon_backward(
        x["do"], x["q"], x["k"], x["v"], x["o"], x["lse"], x["windows"], x["text_len"],
        x["canvas"], x["tile"], x["scale"], x["delta"], x["dq_acc"], x["dk"], x["dv"])


def time_variants(kernel: str, modules: dict[str, ModuleType], window: tuple[int, int, int],
                  rounds: int, reps: int) -> dict[str, list[float]]:
    """do_bench medians (ms) of each module's ``kernel`` at HunyuanVideo 720p, ``rounds``
    rounds of every module in turn."""
    from triton.testing import do_bench

    x = _inputs(window)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(rounds):
        for name, module in modules.items():
            times[name].append(do_bench(_call(kernel, module, x), warmup=25, rep=reps,
                                        return_mode="median"))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help="comma list of: " + ", ".join(ABLATIONS))
    parser.add_argument("--windows", default="3,3,3;3,3,5",
                        help="semicolon list of (t,h,w) windows in tiles")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=300, help="do_bench rep time, ms")
    parser.add_argument("--compile-only", action="store_true",
                        help="build for sm_90 and report resources (no GPU)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)

    names = [n for n in args.ablations.split(",") if n]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"unknown ablations {unknown}; known: {', '.join(ABLATIONS)}")
    if not kernel_module("fwd").AVAILABLE:
        raise SystemExit("the Gluon kernels need triton >= 3.6")
    with tempfile.TemporaryDirectory() as tmp:
        if args.compile_only:
            for row in compile_only(names, Path(tmp)):
                print(f"{row['variant']}: {row['registers']} registers at launch, "
                      f"{row['spills']} spilled words, {row['shared_bytes']} B shared")
            return
        if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
            raise SystemExit("timing the Gluon kernels needs a Hopper GPU (or --compile-only)")
        env = environment(torch.device("cuda"))
        results = []
        for kernel in ("fwd", "bwd"):
            chosen = [n for n in names if ABLATIONS[n][0] == kernel]
            if not chosen:
                continue
            modules = {"default": kernel_module(kernel),
                       **{n: load_ablated(n, Path(tmp)) for n in chosen}}
            for text in args.windows.split(";"):
                window = tuple(int(w) for w in text.split(","))
                times = time_variants(kernel, modules, window, args.rounds, args.reps)
                base = sorted(times["default"])[len(times["default"]) // 2]
                for name, runs in times.items():
                    ms = sorted(runs)[len(runs) // 2]
                    results.append({"kernel": kernel, "window": list(window), "variant": name,
                                    "ms": ms, "runs": runs, "saved_ms": base - ms,
                                    "saved_share": (base - ms) / base})
    rows = [f"| {r['kernel']} | {tuple(r['window'])} | {r['variant']} | {r['ms']:.2f} | "
            f"{r['saved_ms']:+.2f} ({100 * r['saved_share']:+.1f}%) |" for r in results]
    table = (f"Gluon kernel ablations, HunyuanVideo 720p (canvas 30x48x80, tile 6x8x8, 24 "
             f"heads, D 128, bf16; the kernels' video blocks only, the backward with its stats "
             f"pass); {describe_environment(env)}; median of {args.rounds} interleaved rounds "
             f"of do_bench medians. Ablated kernels compute wrong outputs; only time is "
             f"meaningful.\n\n"
             "| kernel | window | variant | ms | time removed |\n| --- | --- | --- | --- | --- |\n"
             + "\n".join(rows))
    write_results(Path(args.out), "gluon_ablation",
                  {"environment": env, "args": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
