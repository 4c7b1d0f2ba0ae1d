"""slurm.sbatch asks for a warning signal before the time limit, passes it to the ranks as
SIGTERM (they checkpoint and stop) and requeues the job."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def _stubs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bodies = {
        # a job step that runs until it is told to stop
        "srun": f'trap \'echo "srun TERM" >> {log}; exit 0\' TERM\necho "srun started" >> {log}\n'
        "while true; do sleep 0.1; done",
        "scontrol": f'if [[ $1 == show ]]; then echo node0; else echo "scontrol $*" >> {log}; fi',
        "torchrun": "exit 0",  # found by the script; the srun stub never runs it
    }
    for name, body in bodies.items():
        stub = bin_dir / name
        stub.write_text(f"#!/usr/bin/env bash\n{body}\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": "/runs/x",
           "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "77"}  # fmt: skip
    return env, log


def _run_until_started(env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (log.is_file() and "srun started" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def _warn(proc: subprocess.Popen) -> tuple[int, str]:
    """Send the time-limit warning to the batch script; (exit code, stderr)."""
    try:
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err
    finally:
        try:  # the stubs of a failed run must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_time_limit_warning_checkpoints_and_requeues(tmp_path):
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    env, log = _stubs(tmp_path)
    code, err = _warn(_run_until_started(env, log))
    assert code == 0, err
    assert log.read_text().splitlines() == ["srun started", "srun TERM", "scontrol requeue 77"]


def test_requeue_can_be_turned_off(tmp_path):
    env, log = _stubs(tmp_path)
    _warn(_run_until_started({**env, "STAFINETUNE_REQUEUE": "0"}, log))
    assert log.read_text().splitlines() == ["srun started", "srun TERM"]
