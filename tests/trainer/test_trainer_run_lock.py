"""One live run per run directory: a second start on a locked directory stops with one line
naming the holder (exit code 2) and touches nothing; a holder killed with SIGKILL leaves no
stale lock behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_testing import error_lines, run_command

from stafinetune.commands import train
from stafinetune.training.run_lock import RunDirectoryLocked, RunLock

HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from stafinetune.training.run_lock import RunLock\n"
    "lock = RunLock(Path(sys.argv[1]))\n"
    "lock.acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock, as a running training run's rank 0 does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_is_refused_until_the_holder_dies(tmp_path, base, capsys, monkeypatch):
    monkeypatch.delenv("STAFINETUNE_DEBUG", raising=False)
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        code, out, err = run_command(train.main, *base, capsys=capsys)
        assert code == 2, err
        (line,) = error_lines(err)
        assert line.startswith(f"error: run directory {run} is in use by another run (host ")
        assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in line
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # the kernel dropped the dead holder's lock: the same command now trains
    code, out, err = run_command(train.main, *base, "train.steps=1", capsys=capsys)
    assert code == 0, err
    assert (run / "checkpoints" / "step_00000001").is_dir()
    record = json.loads((run / ".run.lock").read_text())
    assert record["pid"] == os.getpid()  # the last holder, for the next refusal's message


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    first = RunLock(tmp_path)
    with first:
        with pytest.raises(RunDirectoryLocked, match=r"in use by another run \(host .*pid "):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: a new run takes it
        pass
