"""The GPU speed benchmarks run their code paths on tiny CPU models (``--smoke``): every row
measured (no recorded error), JSON and markdown written. Timings here mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name = Path(script).stem
    assert (out / f"{name}.md").read_text().count("|") > 10
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
def test_train_step_smoke(tmp_path):
    result = _run("train_step.py", "--suites", "hunyuan720,compile,wan14b720", "--kinds",
                  "dense,distill,dmd2,lora,lora_bf16", "--policies", "selective", "--profile",
                  "--critic-ratio", "1", "--offload", "none,single_gpu", out=tmp_path)  # fmt: skip
    rows = result["rows"]
    assert [(r["suite"], r["kind"], r["compiled"], r["offload"]) for r in rows] == [
        ("hunyuan720", "dense", False, "none"),
        ("hunyuan720", "distill", False, "none"),
        ("hunyuan720", "dmd2", False, "none"),
        *[("hunyuan720", kind, False, offload)  # after the rest: their models leave first
          for kind in ("lora", "lora_bf16") for offload in ("none", "single_gpu")],
        ("compile", "distill", False, "none"),
        ("compile", "distill", True, "none"),
        *[("wan14b720", kind, False, offload)  # the LoRA-only suite's models on the host
          for kind in ("lora", "lora_bf16") for offload in ("none", "single_gpu")],
    ]
    assert all("error" not in r and r["step_ms"] > 0 for r in rows), rows
    assert rows[1]["attn_share"] > 0 and rows[8]["attn_share"] is None  # not timed compiled
    table = (tmp_path / "train_step.md").read_text()
    assert "the distillation step runs at" in table and "Where one step's time goes" in table
    assert "lora_bf16 with offload=single_gpu takes" in table
    assert "LoRA with the base in bf16 (offload=single_gpu) takes" in table
    assert all(r["profile"]["buckets"]["matmul"] > 0 for r in rows)


@pytest.mark.slow
def test_dispatch_table_and_sampling_smoke(tmp_path):
    from stafinetune.models.dispatch import CostTable

    table = _run("dispatch_table.py", out=tmp_path)
    assert all("error" not in r for r in table["rows"]), table["rows"]
    parsed = CostTable.load(tmp_path / "dispatch_table.json")
    assert len(parsed.entries) == 2 and all(e.sta[-1].density == 1.0 for e in parsed.entries)
    costs = str(tmp_path / "dispatch_table.json")
    result = _run("sampling.py", "--suites", "wan720", "--cost-table", costs, out=tmp_path)
    rows = result["rows"]
    assert [r["row"] for r in rows] == [
        "dense", "STA 3x1x3", "strategy", "strategy + cost table", "dense + guidance (batch 2)",
        *(f"few-step student, {n} STA 3x1x3 steps" for n in (1, 2, 4)),
    ]  # fmt: skip
    assert all("error" not in r and r["schedule_s"] > 0 for r in rows), rows
    assert 0 < rows[2]["covering_heads"] < 1
    # a student's schedule is n STA steps of one forward; the baseline 50 guided dense steps
    guided, sta = rows[4], rows[1]
    assert guided["schedule_s"] == pytest.approx(50 * guided["step_ms"] / 1e3)
    for n, row in zip((1, 2, 4), rows[5:], strict=True):
        assert row["schedule_s"] == pytest.approx(n * sta["step_ms"] / 1e3)
        assert row["x_dense_guided"] == pytest.approx(guided["schedule_s"] / row["schedule_s"])
