"""Helpers of the parallel tests: a torchrun runner and metric comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def training_defaults(data_root: Path) -> list[str]:
    """The small default of the training runs: 16 clips in ``data_root``, batch 2 on the CPU,
    every step logged, validation at step 0 and the last step only."""
    return [
        f"data.root={data_root}", "data.num_clips=16", "data.num_workers=0", "train.device=cpu",
        "train.batch_size=2", "train.log_every=1", "train.val_every=1000",
        "train.sample_steps=2", "logging=none", "logging.progress=false",
    ]  # fmt: skip


def run_training(
    run_dir: Path,
    data_root: Path,
    ext_dir: Path,
    *overrides: str,
    nproc: int = 1,
    timeout: int = 900,
) -> list[dict]:
    """``python -m stafinetune.commands.train`` (under torchrun when ``nproc > 1``) on
    ``training_defaults``; returns the rows of its metrics.jsonl."""
    base = [f"hydra.run.dir={run_dir}", *training_defaults(data_root)]
    prefix = [sys.executable, "-m"] if nproc == 1 else [TORCHRUN, "--standalone",
                                                       f"--nproc-per-node={nproc}", "-m"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    proc = subprocess.run(
        [*prefix, "stafinetune.commands.train", *base, *overrides],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return metrics(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(rows: list[dict]) -> list[float]:
    return [r["loss/total"] for r in rows if "loss/total" in r]


def val_gap(rows: list[dict], step: int) -> float:
    return next(
        r["val/student_teacher_mse"]
        for r in rows
        if r["step"] == step and "val/student_teacher_mse" in r
    )


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= rel * max(abs(x), abs(y), 1e-12), (a, b)
