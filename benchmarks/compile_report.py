"""Registers, spills and shared memory of the Triton STA kernels, compiled without a GPU.

Device time is scarce; register pressure is not a timing question. This script runs the real
host code of ``sta_kernels.ops.sta_triton_forward`` / ``sta_triton_backward`` on meta tensors,
records every
kernel launch it would make (the arguments, constexprs, warps and stages), compiles each one
for an sm_90 target the way the launcher would specialise it (pointers and integer
arguments divisible by 16 marked so, integers equal to 1 made constants) and reads the
registers, spills and shared memory of the cubin (``cuobjdump`` bundled with triton):

    PYTHONPATH=kernels python benchmarks/compile_report.py --shape hunyuan --variants default,v9

``--gluon`` adds the Gluon forward and backward (``gluon_report``); their launch register count is the
kernels' ``maxnreg``, the partitions then reallocate registers among themselves.

Numbers match the device only for the triton version the device runs. With triton 3.6 they
equal what ``kernel_resources()`` reported on the H200 (2026-12-02) for every kernel of the
HunyuanVideo and Wan rows checked: e.g. Wan 480p dk/dv 255 registers, 20 spills, 131584
bytes of shared memory (default), 36 spills (v9), 34 (full_fused).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

try:  # Gluon kernels compile from their own AST source (triton >= 3.5)
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:  # pragma: no cover - older triton: gluon_report is unavailable
    GluonASTSource = None

from sta_kernels import ops
from sta_kernels.kernels import triton_sta as ts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import SHAPES as BENCH_SHAPES  # noqa: E402
from attention import VARIANTS  # noqa: E402

# (canvas, tile, heads, head_dim): the shapes of benchmarks/attention.py and two small ones
SHAPES = {
    **{name: (s.canvas, s.tile, s.heads, s.head_dim) for name, s in BENCH_SHAPES.items()},
    "tiny": ((6, 16, 16), (6, 8, 8), 2, 64),
    "tiny_partial": ((5, 12, 20), (6, 8, 8), 2, 64),
}
KERNELS = ("_sta_fwd_kernel", "_sta_dq_kernel", "_sta_dkdv_kernel", "_sta_delta_kernel",
           "_scale_cast_kernel")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
         torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv"}


@dataclass
class Launch:
    """One recorded launch: the kernel and what the host code passed it."""

    name: str
    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` records instead of launching."""

    def __init__(self, name: str, kernel, log: list[Launch]) -> None:
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(Launch(self.name, self.kernel, args, kwargs))

        return launch


@contextmanager
def recording(log: list[Launch]):
    """Replace the module's kernels with recorders for the duration of the block."""
    saved = {name: getattr(ts, name) for name in KERNELS}
    try:
        for name, kernel in saved.items():
            setattr(ts, name, _Recorder(name, kernel, log))
        yield
    finally:
        for name, kernel in saved.items():
            setattr(ts, name, kernel)


def record_launches(shape: str, config: ops.KernelConfig | None, partial: bool | None = None
                    ) -> list[Launch]:
    """The launches of one forward and one backward at ``shape`` on meta tensors.

    ``config`` None is what a call without a config gets on CUDA
    (``default_config(cuda, partial tiles)``).
    """
    canvas, tile, heads, head_dim = SHAPES[shape]
    seq = canvas[0] * canvas[1] * canvas[2]
    if config is None:
        geo = ts.LaunchGeometry(seq, canvas, tile)
        config = ops.default_config(torch.device("cuda"), geo.partial)
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k, v, o, do = (torch.empty(1, seq, heads, head_dim, **meta) for _ in range(5))
    lse = torch.empty(1, heads, seq, device="meta", dtype=torch.float32)
    windows = torch.full((heads, 3), 3, device="meta", dtype=torch.int32)
    text_len = torch.zeros(1, device="meta", dtype=torch.int32)
    scale = head_dim**-0.5
    log: list[Launch] = []
    with recording(log):
        ops.sta_triton_forward(q, k, v, windows, text_len, canvas, tile, scale, config)
        ops.sta_triton_backward(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale,
                                config)
    return log


def _specialise(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as triton's launcher would derive them."""
    kernel = launch.kernel
    # as in triton's launcher: keyword arguments that name no kernel parameter are compile
    # options (num_warps, num_stages, maxnreg, sched4reg, ...)
    options = {"num_warps": 4, "num_stages": 3}
    options.update({k: v for k, v in launch.kwargs.items() if k not in kernel.arg_names})
    given = dict(zip(kernel.arg_names, launch.args, strict=False))  # the rest: kwargs
    given.update({k: v for k, v in launch.kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    declared = {p.num for p in kernel.params if p.is_constexpr}
    for index, name in enumerate(kernel.arg_names):
        value = given[name]
        if index in declared or (isinstance(value, int) and not isinstance(value, bool)
                            and value == 1):
            signature[name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, ts.TensorDescriptor):
            block = ", ".join(str(b) for b in value.block_shape)
            signature[name] = f"tensordesc<{TYPES[value.base.dtype]}[{block}]>"
        elif type(value).__name__ == "TensorDescriptor":  # Gluon's: its layout is in the type
            signature[name] = mangle_type(value)
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot specialise argument {name}={value!r}")
    return signature, constexprs, attrs, options


def cubin_report(cubin: bytes) -> dict[str, int]:
    """Registers, spills and stack/local memory per thread of a cubin, from the
    ``cuobjdump`` bundled with triton (the cubin triton's own ptxas assembled)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    stack = int(usage.group(2))
    # the driver's LOCAL_SIZE_BYTES / 4 is what triton reports as n_spills
    return {"registers": int(usage.group(1)), "spills": (stack + int(usage.group(3))) // 4,
            "stack_bytes": stack, "local_bytes": int(usage.group(3))}


def compile_report(launch: Launch, capability: int = 90) -> dict:
    """Compile one recorded launch for ``capability`` and report its resources."""
    signature, constexprs, attrs, options = _specialise(launch)
    gluon = getattr(launch.kernel, "is_gluon", lambda: False)()
    source = (GluonASTSource if gluon else ASTSource)(launch.kernel, signature,
                                                      constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"kernel": launch.name, **options, "shared_bytes": compiled.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "setmaxnreg": ptx.count("setmaxnreg"),
            "tma_reduce": ptx.count("cp.reduce.async.bulk.tensor"),
            "shfl_idx": ptx.count("shfl.sync.idx"),
            **cubin_report(compiled.asm["cubin"])}


def gluon_report(shape: str, stages: int | None = None, text: bool = False,
                 capability: int = 90, kernel: str = "fwd",
                 consumers: int | None = None, module=None) -> dict:
    """Compile a Gluon kernel as it launches at ``shape`` (with 64 text slots when
    ``text``) and report its resources: the forward (``sta_kernels.kernels.gluon_fwd``,
    ``kernel`` "fwd"), the backward (``gluon_bwd``, "bwd") or the FP8 forward
    (``gluon_fp8``, "fp8"), with ``stages`` ring buffers (None: the forward's default,
    ``gluon_fwd.ring_stages``; 2 for the others); ``consumers`` is the bf16 or FP8
    forward's consumer warpgroups (``KernelConfig.fwd_gluon_consumers``,
    ``fwd_fp8_consumers``; None: the default for the shape's tile); ``module`` replaces the
    module of ``kernel`` (an edited copy of it, as ``notes/probes/gluon_ablation.py``
    makes).

    The host code calls them for CUDA tensors only, so a launch is recorded from the
    module's ``_launch`` on CPU tensors (never written: ``torch.empty`` allocates lazily;
    the backward's triton stats kernel is recorded, not run).
    """
    from sta_kernels.kernels import gluon_bwd as gb
    from sta_kernels.kernels import gluon_common as gc
    from sta_kernels.kernels import gluon_fp8 as gf
    from sta_kernels.kernels import gluon_fwd as gs

    if not gc.AVAILABLE:
        raise RuntimeError(f"the Gluon kernels need triton >= 3.6, this is {triton.__version__}")
    canvas, tile, heads, head_dim = SHAPES[shape]
    seq = canvas[0] * canvas[1] * canvas[2] + (64 if text else 0)
    q, k, v, o, do, dk, dv = (torch.empty(1, seq, heads, head_dim, dtype=torch.bfloat16)
                              for _ in range(7))
    lse, delta = torch.empty(1, heads, seq), torch.empty(1, heads, seq)
    windows = torch.full((heads, 3), 3, dtype=torch.int32)
    text_len = torch.zeros(1, dtype=torch.int32)
    scale = head_dim**-0.5
    if kernel != "fwd" and stages is None:
        stages = 2
    if module is not None:
        gs, gb, gf = (module if kernel == name else m
                      for name, m in (("fwd", gs), ("bwd", gb), ("fp8", gf)))
    module, names = {"fwd": (gs, ["_sta_fwd_ws_kernel"]),
                     "bwd": (gb, ["_frame_stats_kernel", "_sta_bwd_ws_kernel"]),
                     "fp8": (gf, ["_sta_fwd_fp8_kernel"])}[kernel]
    log: list[Launch] = []
    saved = {name: getattr(module, name) for name in names}
    for name, fn in saved.items():
        setattr(module, name, _Recorder(name, fn, log))
    try:
        if kernel == "fwd":
            consumers = gc.check_consumers(tile, consumers, "gluon_report")
            stages, v_stages = gs.ring_stages(consumers, stages)
            gs._launch(q, k, v, o, lse, windows, text_len, canvas, tile, scale, stages,
                       consumers, v_stages)
        elif kernel == "fp8":
            video, blocks = gf.packed_blocks(canvas, tile, seq)
            f8, rows = torch.float8_e4m3fn, gf.BLOCK
            fp8_ops = gf.Fp8Operands(
                torch.empty(1, heads, blocks * rows, head_dim, dtype=f8),
                torch.empty(1, heads, blocks),
                torch.empty(1, heads, head_dim, blocks * rows, dtype=f8),
                torch.empty(1, heads, blocks), torch.empty(1, heads), video, blocks)
            gf._launch(q, fp8_ops, o, windows, text_len, canvas, tile, scale, stages,
                       gc.check_consumers(tile, consumers, "gluon_report"))
        else:
            dq_acc = torch.empty(1, seq, heads, head_dim)
            gb._launch(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale, delta,
                       dq_acc, dk, dv, stages)
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    return {**compile_report(log[-1], capability), "stages": stages, "text": text}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="hunyuan", choices=sorted(SHAPES))
    parser.add_argument("--variants", default="default",
                        help="comma list of benchmarks/attention.py VARIANTS names")
    parser.add_argument("--kernels", default="fwd,dq,dkdv",
                        help="which kernels to compile (fwd, dq, dkdv, delta, cast)")
    parser.add_argument("--gluon", action="store_true",
                        help="also compile the Gluon forward and backward (2 and 3 stages, "
                             "with text)")
    args = parser.parse_args(argv)

    wanted = {f"_sta_{k}_kernel" if k != "cast" else "_scale_cast_kernel"
              for k in args.kernels.split(",")}
    print(f"triton {triton.__version__}, sm_90, shape {args.shape} {SHAPES[args.shape]}")
    print("| variant | kernel | warps | stages | registers | spills | shared bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.variants.split(","):
        for launch in record_launches(args.shape, VARIANTS[name]):
            if launch.name not in wanted:
                continue
            r = compile_report(launch)
            print(f"| {name} | {launch.name} | {r['num_warps']} | {r['num_stages']} | "
                  f"{r['registers']} | {r['spills']} | "
                  f"{r['shared_bytes']} |", flush=True)
    if args.gluon:
        for kernel in ("fwd", "bwd", "fp8") if SHAPES[args.shape][3] == 128 else ("fwd",):
            for stages in (2, 3):
                r = gluon_report(args.shape, stages=stages, text=True, kernel=kernel)
                print(f"| gluon {kernel} s{stages} | {r['kernel']} | 4+4+1 | - | "
                      f"{r['registers']} at launch | {r['spills']} | {r['shared_bytes']} |",
                      flush=True)


if __name__ == "__main__":
    main()
