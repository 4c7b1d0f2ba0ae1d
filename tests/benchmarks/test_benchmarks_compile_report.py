"""benchmarks/compile_report.py records the launches the host code makes and compiles them
for sm_90 without a GPU (in a subprocess: TRITON_INTERPRET must be unset for compiling)."""

from __future__ import annotations

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
print(json.dumps(out))
"""


def test_compile_report_records_the_default_schedules_and_compiles():
    """Full tiles: forward, delta, fused dk/dv/dq, cast; partial tiles: forward, dq kernel,
    dk/dv with 2 stages (``PARTIAL_TILES``). The forward compiles to a real sm_90 kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT / "kernels"), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [n for n, _ in out["tiny"]] == [
        "_sta_fwd_kernel", "_sta_delta_kernel", "_sta_dkdv_kernel", "_scale_cast_kernel"]
    assert [n for n, _ in out["tiny_partial"]] == [
        "_sta_fwd_kernel", "_sta_dq_kernel", "_sta_dkdv_kernel"]
    assert dict(out["tiny_partial"])["_sta_dkdv_kernel"] == 2
    fwd = out["fwd"]
    assert 0 < fwd["registers"] <= 255 and fwd["shared_bytes"] > 0
    assert fwd["spills"] >= 0 and fwd["num_warps"] == 8
