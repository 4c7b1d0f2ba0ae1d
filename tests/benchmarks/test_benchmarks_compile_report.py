"""benchmarks/compile_report.py records the launches the host code makes (the Triton kernels'
and the Gluon forward's, backward's and FP8 forward's) and compiles them for sm_90 without a GPU (in a subprocess:
TRITON_INTERPRET must be unset for compiling)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError:
    print("SKIP no nvidia backend in this triton")
    raise SystemExit(0)
import compile_report as cr

out = {}
for shape in ("tiny", "tiny_partial"):
    launches = cr.record_launches(shape, None)
    out[shape] = [(l.name, l.kwargs.get("num_stages")) for l in launches]
fwd = cr.record_launches("tiny", None)[0]
out["fwd"] = cr.compile_report(fwd)
from sta_kernels.kernels import gluon_common
if gluon_common.AVAILABLE:
    # D=64 with and without text slots; D=128 (HunyuanVideo): three consumers at the
    # default ring (3 k buffers, 2 v) and at 2 k buffers, two consumers at 2 and 3
    out["gluon"] = [cr.gluon_report("tiny", text=True), cr.gluon_report("tiny", 2),
                    cr.gluon_report("hunyuan", text=True),
                    cr.gluon_report("hunyuan", stages=2),
                    cr.gluon_report("hunyuan", stages=2, text=True, consumers=2),
                    cr.gluon_report("hunyuan", stages=3, consumers=2)]
    out["gluon_bwd"] = cr.gluon_report("hunyuan", stages=2, text=True, kernel="bwd")
    from triton.backends.nvidia.compiler import CUDAOptions
    out["sched4reg"] = "sched4reg" in CUDAOptions.__dataclass_fields__
    out["gluon_fp8"] = [cr.gluon_report("hunyuan", stages=2, text=True, kernel="fp8"),
                        cr.gluon_report("hunyuan", stages=3, text=True, kernel="fp8",
                                        consumers=2)]
print(json.dumps(out))
"""
SMEM_PER_BLOCK = 232448  # the most shared memory one block of an sm_90 SM may take


@functools.cache
def _report() -> tuple[int, str, str]:
    """(return code, stdout, stderr) of SCRIPT, run once for both tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT / "kernels"), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def _run() -> dict:
    code, stdout, stderr = _report()
    if stdout.startswith("SKIP"):
        pytest.skip(stdout.strip())
    assert code == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_compile_report_records_the_default_schedules_and_compiles():
    """Full tiles: forward, delta, fused dk/dv/dq, cast; partial tiles: forward, dq kernel,
    dk/dv with 2 stages (``PARTIAL_TILES``). The forward compiles to a real sm_90 kernel."""
    out = _run()
    assert [n for n, _ in out["tiny"]] == [
        "_sta_fwd_kernel", "_sta_delta_kernel", "_sta_dkdv_kernel", "_scale_cast_kernel"]
    assert [n for n, _ in out["tiny_partial"]] == [
        "_sta_fwd_kernel", "_sta_dq_kernel", "_sta_dkdv_kernel"]
    assert dict(out["tiny_partial"])["_sta_dkdv_kernel"] == 2
    fwd = out["fwd"]
    assert 0 < fwd["registers"] <= 255 and fwd["shared_bytes"] > 0
    assert fwd["spills"] >= 0 and fwd["num_warps"] == 8


def test_compile_report_builds_the_gluon_forward_without_spills():
    """The Gluon forward's launches (D 64 and 128, with and without text slots, 2 and 3
    k buffers, two and three consumers) build for sm_90: warp-specialised (register
    reallocation between the partitions), wgmma matmuls (per consumer the score matmul's
    D / 16 and the PV matmul's 8, written twice by the two-consumer loop, whose first score
    and last PV matmuls sit outside it), shared memory in budget, and no spilled
    accumulators. Two consumers
    (q in registers, 240 per thread) spill nothing with the device's triton 3.6 and two
    scalar words at HunyuanVideo with text under 3.9; three (q in shared memory, 160 per
    thread) spill nothing with 3.6 and 8 or 14 words at HunyuanVideo under 3.9 (a spilled
    score or accumulator tile would be 64 words per thread)."""
    out = _run()
    if "gluon" not in out:
        pytest.skip("the Gluon forward needs triton >= 3.6")
    assert len(out["gluon"]) == 6
    consumers = [3 if variant["maxnreg"] == 128 else 2 for variant in out["gluon"]]
    assert consumers == [3, 3, 3, 3, 2, 2]  # None picks three where the frames divide by 3
    # D 64: 3 x (4 + 8); D 128: 3 x (8 + 8), 2 x 2 x (8 + 8)
    assert [variant["wgmma"] for variant in out["gluon"]] == [36, 36, 48, 48, 64, 64]
    assert [variant["stages"] for variant in out["gluon"]] == [3, 2, 3, 2, 2, 3]
    for variant, count in zip(out["gluon"], consumers, strict=True):
        assert variant["spills"] <= (2 if count == 2 else 16), variant
        assert 0 < variant["shared_bytes"] <= SMEM_PER_BLOCK, variant
        assert variant["setmaxnreg"] > 0, variant


def test_compile_report_builds_the_gluon_backward():
    """The Gluon backward (HunyuanVideo, with text slots) builds for sm_90: warp-specialised,
    the 32 wgmmas of each consumer (s^T and dp^T 8 each, dv and dk 4, dq 8), one TMA reduce
    of dq per consumer for video and for text query blocks, shared memory in budget, and
    only a few spilled words (scalars: 18 with triton 3.6; spilled accumulators would be
    hundreds). Where triton has the ``sched4reg`` option (3.9) the launch passes it, and the
    spills drop to 6 (46 without it)."""
    out = _run()
    if "gluon_bwd" not in out:
        pytest.skip("the Gluon kernels need triton >= 3.6")
    bwd = out["gluon_bwd"]
    assert bwd["kernel"] == "_sta_bwd_ws_kernel"
    assert bwd["wgmma"] == 64 and bwd["tma_reduce"] == 4 and bwd["setmaxnreg"] > 0, bwd
    assert 0 < bwd["shared_bytes"] <= SMEM_PER_BLOCK, bwd
    assert bwd.get("sched4reg", False) == out["sched4reg"], bwd
    assert bwd["spills"] <= (8 if out["sched4reg"] else 24), bwd


def test_compile_report_builds_the_fp8_forward():
    """The FP8 forward (HunyuanVideo, with text slots) builds for sm_90, with three consumer
    warpgroups (the default at 6-frame tiles) and with two: warp-specialised, e4m3 wgmmas
    in k32 steps (the score and PV matmuls 4 each: 8 per consumer in the sequential loop of
    three; 16 per consumer of two, in the first block, the loop and the last PV), p handed
    to the PV matmul without shuffles between threads (no more shfl.idx than the bf16
    forward, which has no such conversion; a plain layout conversion of e4m3 p adds dozens),
    shared memory in budget, few spilled words (none with triton 3.6; with 3.9, 20 for two
    consumers and 26 for three: spilled accumulators would be hundreds)."""
    out = _run()
    if "gluon_fp8" not in out:
        pytest.skip("the Gluon kernels need triton >= 3.6")
    bf16 = out["gluon"][4]
    for fp8, wgmma in zip(out["gluon_fp8"], (24, 32), strict=True):
        assert fp8["kernel"] == "_sta_fwd_fp8_kernel"
        assert fp8["wgmma"] == wgmma and fp8["setmaxnreg"] > 0, fp8
        assert fp8["shfl_idx"] <= bf16["shfl_idx"], (fp8, bf16)
        assert 0 < fp8["shared_bytes"] <= SMEM_PER_BLOCK, fp8
        assert fp8["spills"] <= 32, fp8
