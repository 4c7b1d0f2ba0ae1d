"""benchmarks/gluon_ablation.py: every ablation's edits apply to the current Gluon forward,
each removes what it names, a stale edit stops the script, and the ablated kernels build for
sm_90 (in a subprocess: TRITON_INTERPRET must be unset for compiling). Timing them needs a
Hopper GPU. Nothing here imports the kernel modules: tests/kernels sets TRITON_INTERPRET
when it is collected, after this file, and triton reads it when a module is imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gluon_ablation as ga  # noqa: E402

# what each ablation must take out of the kernel's source
REMOVED = {
    "no_kv_loads": None,  # the loads stay, behind `if j < STAGES`
    "no_qk": "s_tok = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)",
    "no_pv": "o_tok = warpgroup_mma(p_op, v, acc, is_async=True)\n"
             "            acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))\n"
             "            mbarrier.arrive(v_empty.index(v_stage)",
    "no_exp2": "p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))",
    "no_row_max": "m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)",
    "no_rescale": "acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)\n"
                  "            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)\n"
                  "            v_stage = j % V_STAGES",
    "bwd_no_qdo_loads": None,  # the loads stay, for the first ring pass
    "bwd_no_exp2": "p = gl.exp2(s * scale_log2 - gl.expand_dims(lse, 0))",
    "bwd_no_dq_reduce": "_tma_add(dq_desc,",
}
FIRST_PASS = {  # what the load ablations add instead
    "no_kv_loads": ["mbarrier.arrive(k_ready.index(stage), count=1)",
                    "mbarrier.arrive(v_ready.index(stage), count=1)"],
    "bwd_no_qdo_loads": ["mbarrier.arrive(bar, count=1)", "if j < STAGES:"],
}


@pytest.mark.parametrize("name", list(ga.ABLATIONS))
def test_each_ablation_applies_once_and_removes_its_part(name):
    original = ga.KERNEL_FILES[ga.ABLATIONS[name][0]].read_text()
    source = ga.ablated_source(name)
    compile(source, f"_ablation_{name}.py", "exec")
    assert source != original
    if REMOVED[name] is not None:
        assert REMOVED[name] in original and REMOVED[name] not in source
    else:
        for added in FIRST_PASS[name]:
            assert added not in original and source.count(added) == 1, added


def test_importing_the_script_imports_no_kernel_module():
    """Kernel modules decorated before tests/kernels sets TRITON_INTERPRET would run
    compiled, not interpreted, in the rest of the session."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gluon_ablation; "
            "print(sorted(m for m in sys.modules if m.startswith('sta_kernels.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_stale_edit_stops_the_script(monkeypatch):
    monkeypatch.setitem(ga.ABLATIONS, "stale", ("bwd", [("no such line\n", "")]))
    with pytest.raises(RuntimeError, match="ablation stale: an edit's anchor occurs 0 times in .*gluon_bwd.py"):
        ga.ablated_source("stale")


def test_unknown_ablation_is_named():
    with pytest.raises(SystemExit, match=r"unknown ablations \['no_such'\]"):
        ga.main(["--ablations", "no_exp2,no_such", "--compile-only"])


def test_ablated_kernels_build_for_sm90():
    """The unmodified kernels and every ablation compile for sm_90 (HunyuanVideo, 2
    stages) with the kernels' register budgets: 128 at launch for the three-consumer
    forward, 168 for the backward."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = ("import triton.backends.nvidia.compiler, sys; sys.path.insert(0, 'kernels'); "
             "from sta_kernels import gluon_sta; sys.exit(0 if gluon_sta.AVAILABLE else 3)")
    if subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT,
                      capture_output=True).returncode != 0:
        pytest.skip("needs triton >= 3.6 with its nvidia backend")
    proc = subprocess.run([sys.executable, "benchmarks/gluon_ablation.py", "--compile-only"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^([\w ]+): (\d+) registers at launch", proc.stdout, re.M))
    assert set(rows) == {"default fwd", "default bwd", *ga.ABLATIONS}, proc.stdout
    for name, registers in rows.items():
        kernel = name.split()[1] if name.startswith("default") else ga.ABLATIONS[name][0]
        assert registers == {"fwd": "128", "bwd": "168"}[kernel], proc.stdout


def test_report_groups_ablations_by_kernel_and_window(monkeypatch, tmp_path):
    """The timing path's bookkeeping (the timings themselves need a Hopper GPU): each
    kernel's ablations are timed beside its own unmodified kernel, per window, and the
    report gives each one's time removed against that kernel's median."""
    calls = []

    def fake_times(kernel, modules, window, rounds, reps):
        calls.append((kernel, sorted(modules), window, rounds))
        base = {"fwd": 24.0, "bwd": 70.0}[kernel] * (1 + (window[2] == 5))
        return {name: [base - i - 0.5, base - i, base - i + 9] for i, name in
                enumerate(sorted(modules, key=lambda n: n != "default"))}

    monkeypatch.setattr(ga, "time_variants", fake_times)
    monkeypatch.setattr(ga, "kernel_module", lambda kernel: ga)
    monkeypatch.setattr(ga, "load_ablated", lambda name, folder: name)
    monkeypatch.setattr(ga, "environment", lambda device: {
        "device": "H200", "torch": "2.11", "triton": "3.6", "date": "2026-12-02T00:00:00"})
    monkeypatch.setattr(ga.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ga.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(ga, "AVAILABLE", True, raising=False)
    ga.main(["--ablations", "no_exp2,bwd_no_dq_reduce", "--windows", "3,3,3;3,3,5",
             "--rounds", "3", "--out", str(tmp_path)])
    assert calls == [("fwd", ["default", "no_exp2"], (3, 3, 3), 3),
                     ("fwd", ["default", "no_exp2"], (3, 3, 5), 3),
                     ("bwd", ["bwd_no_dq_reduce", "default"], (3, 3, 3), 3),
                     ("bwd", ["bwd_no_dq_reduce", "default"], (3, 3, 5), 3)]
    results = json.loads((tmp_path / "gluon_ablation.json").read_text())["results"]
    by_key = {(r["kernel"], tuple(r["window"]), r["variant"]): r for r in results}
    assert by_key[("fwd", (3, 3, 3), "default")]["ms"] == 24.0
    assert by_key[("fwd", (3, 3, 3), "no_exp2")]["saved_ms"] == 1.0
    assert by_key[("bwd", (3, 3, 5), "bwd_no_dq_reduce")]["ms"] == 139.0
    assert by_key[("bwd", (3, 3, 5), "bwd_no_dq_reduce")]["saved_share"] == 1.0 / 140.0
    assert "| bwd | (3, 3, 5) | bwd_no_dq_reduce | 139.00 | +1.00 (+0.7%) |" in (
        tmp_path / "gluon_ablation.md").read_text()
