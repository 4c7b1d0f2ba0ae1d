"""Compile the triton kernels to Triton IR for an sm_90 target, without a GPU.

The interpreter that runs the kernel tests on CPU is lenient where the compiler is not
(e.g. a variable typed int32 in one branch of an ``if`` and int64 in the other). Lowering
the kernels' AST to TTIR needs no device, so it runs here, in a subprocess where
TRITON_INTERPRET is unset, for every constexpr switch the host code can set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sta_kernels.kernels.triton_sta as ts

try:
    from triton.backends.nvidia.compiler import CUDABackend
except ImportError:
    print("SKIP no nvidia backend in this triton")
    raise SystemExit(0)

target = GPUTarget("cuda", 90, 32)
backend = CUDABackend(target)
options = backend.parse_options({})
# kernel: (pointer arguments, TMA descriptor arguments and the rows of their box)
kernels = {
    ts._sta_fwd_kernel: ({"Q", "K", "V", "Out"}, {"KD", "VD"}, 128),
    ts._sta_dq_kernel: ({"Q", "K", "V", "Out", "DO", "DQ"}, {"KD", "VD"}, 128),
    ts._sta_dkdv_kernel: ({"Q", "K", "V", "DO", "DK", "DV"}, set(), 64),
}
for kernel, (tensors, descriptors, rows) in kernels.items():
    for even, wide, hoist, tma in itertools.product((True, False), repeat=4):
        if tma and not hoist:
            continue
        consts = dict(TT=6, TH=8, TW=8, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=128, Q_SUBS=6,
                      K_SUBS=3, EVEN=even, DOT_F32=False, WIDE=wide, HOIST=hoist, TMA=tma)
        # the dk/dv kernel: its score matmul order, lowered both ways across the loop; its
        # fused dq by pointer atomics, or by TMA reduce-add (its only descriptor)
        consts.update(EARLY_DP=even, FUSED_DQ=(wide != even) or tma, DQ_TMA=tma)
        consts = {name: value for name, value in consts.items() if name in kernel.arg_names}
        signature = {}
        for name in kernel.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name == "DQAD" and tma:
                signature[name] = "tensordesc<fp32[1, 1, 8, 8, 128]>"
            elif name == "DQAD":
                signature[name] = "*fp32"
            elif name in descriptors and tma:
                signature[name] = f"tensordesc<bf16[1, {rows // 64}, 8, 8, 128]>"
            elif name in tensors or name in descriptors:
                signature[name] = "*bf16"
            elif name in ("LSE", "DELTA", "DQA"):
                signature[name] = "*fp32"
            elif name in ("WIN", "TEXT_LEN"):
                signature[name] = "*i32"
            elif name.startswith("scale"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        constexprs = {(kernel.arg_names.index(k),): v for k, v in consts.items()}
        src = ASTSource(kernel, signature, constexprs=constexprs)
        context = triton._C.libtriton.ir.context()
        triton._C.libtriton.ir.load_dialects(context)
        src.make_ir(target, options, backend.get_codegen_implementation(options),
                    backend.get_module_map(), context)
        print("OK", kernel.__name__, even, wide, hoist, tma)
"""


def test_kernels_lower_to_ttir_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernels_dir = Path(__file__).resolve().parents[2] / "kernels"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(kernels_dir), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # per kernel: (even, wide) x hoist off/on x TMA (only when hoisted)
    assert proc.stdout.count("OK") == 3 * 12, proc.stdout
