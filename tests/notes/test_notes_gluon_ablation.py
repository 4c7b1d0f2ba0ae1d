"""notes/probes/gluon_ablation.py, the lab probe that times copies of the Gluon kernels with
one part taken out: its bookkeeping on CPU. Whether its text edits still apply to the
kernels is the probe's own business (it stops, naming the edit, when one does not): no test
here reads the kernels' source. Nothing here imports the kernel modules (triton reads
TRITON_INTERPRET when a module is first imported, and tests/kernels sets it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "notes" / "probes"))
import gluon_ablation as ga  # noqa: E402


def test_importing_the_probe_imports_no_kernel_module():
    """Kernel modules decorated before tests/kernels sets TRITON_INTERPRET would run
    compiled, not interpreted, in the rest of the session."""
    code = ("import sys; sys.path.insert(0, 'notes/probes'); import gluon_ablation; "
            "print(sorted(m for m in sys.modules if m.startswith('sta_kernels.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_stale_edit_stops_the_probe(monkeypatch):
    monkeypatch.setitem(ga.ABLATIONS, "stale", ("bwd", [("no such line\n", "")]))
    with pytest.raises(RuntimeError, match="ablation stale: an edit's anchor occurs 0 times"):
        ga.ablated_source("stale")


def test_unknown_ablation_is_named():
    with pytest.raises(SystemExit, match=r"unknown ablations \['no_such'\]"):
        ga.main(["--ablations", "no_exp2,no_such", "--compile-only"])


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
