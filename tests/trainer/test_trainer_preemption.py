"""SIGTERM (preemption) checkpoints and stops cleanly; checkpoints can also come every N minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stafinetune.config import compose_job_config
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.trainer import Trainer

BASE = [
    "data.num_clips=8", "data.num_workers=0", "data.decode_workers=0", "logging=none",
    "logging.progress=false", "train.log_every=1", "train.val_every=0", "train.sample_steps=0",
    "train.batch_size=2", "train.export=false", "train.device=cpu",
]  # fmt: skip


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", f"data.root={tmp_path / 'data'}", *BASE,
            "train.steps=100000", "train.ckpt_every=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stafinetune.commands.train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("loss/total") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    saved = ckpt.latest_checkpoint(run / "checkpoints")
    assert saved is not None and ckpt.verify_checkpoint(saved) is None
    step = int(saved.name.split("_")[1])
    assert f"stopped by SIGTERM at step {step}" in err and str(saved) in err
    assert not list((run / "checkpoints").glob("*.tmp"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in rows) == step  # nothing logged past the checkpoint


def test_checkpoints_every_few_minutes(tmp_path: Path):
    job = compose_job_config(
        [
            f"data.root={tmp_path / 'data'}",
            *BASE,
            "train.steps=3",
            "train.ckpt_every=0",
            "train.keep_last=5",
            "train.ckpt_minutes=1e-9",
        ]  # fmt: skip
    )
    Trainer(job, tmp_path / "run").fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step_00000001", "step_00000002", "step_00000003"]
    with pytest.raises(ValueError, match="train.ckpt_minutes"):
        compose_job_config(["train.ckpt_minutes=-1"])
