"""Each launch script, with its launcher replaced by a stub: the command it would run, where
it finds the launcher, and how a rank's one-line error ends a torchrun launch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
BASH = shutil.which("bash") or "/bin/bash"
STUBS = ("torchrun", "deepspeed", "accelerate", "srun", "scontrol", "python3")
# what each launch script needs to find (launch/lib.sh's stafinetune_tool)
TOOLS = {"torchrun.sh": "torchrun", "deepspeed.sh": "deepspeed", "accelerate.sh": "accelerate",
         "build_teacher.sh": "python3", "slurm.sbatch": "torchrun"}  # fmt: skip
_ENVIRONMENTS = ("VENV", "VIRTUAL_ENV", "CONDA_PREFIX", "STAFINETUNE_REPO")


def _write_stubs(bin_dir: Path, body: str = 'printf "%s\\n" "$(basename "$0")" "$@"') -> None:
    """Stubs of every tool that print their name and arguments, one per line."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in STUBS:
        text = "echo 2" if name == "python3" else body
        if name == "scontrol":
            text = "echo node0; echo node1"
        stub = bin_dir / name
        stub.write_text(f"#!/usr/bin/env bash\n{text}\n")
        stub.chmod(0o755)


@pytest.fixture()
def launch(tmp_path: Path) -> Path:
    """A copy of launch/ in a repository without a .venv, so only the stubs can be found."""
    shutil.copytree(LAUNCH, tmp_path / "repo" / "launch")
    return tmp_path / "repo" / "launch"


@pytest.fixture()
def stub_path(tmp_path: Path) -> dict[str, str]:
    """PATH with stubs that print their name and arguments, one per line; no environment
    active."""
    _write_stubs(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "RUN_DIR": "/runs/x"}
    for key in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", *_ENVIRONMENTS):
        env.pop(key, None)
    return env


def _launch(launch: Path, script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(launch / script), *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def _run(launch: Path, script: str, *args: str, env: dict[str, str]) -> list[str]:
    proc = _launch(launch, script, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _without_log_dir(argv: list[str]) -> list[str]:
    """torchrun's argv without the ``--log-dir DIR`` that torchrun.sh passes first (a fresh
    temporary folder, removed when the launch ends)."""
    assert argv[1] == "--log-dir" and "stafinetune-torchrun." in argv[2], argv
    assert not Path(argv[2]).exists()
    return [argv[0], *argv[3:]]


def test_torchrun_single_node(launch, stub_path):
    argv = _run(launch, "torchrun.sh", "4", "parallel=fsdp2", "train.steps=10", env=stub_path)
    assert _without_log_dir(argv) == [
        "torchrun", "--standalone", "--nproc-per-node", "4", "-m", "stafinetune", "train",
        "hydra.run.dir=/runs/x", "parallel=fsdp2", "train.steps=10"]  # fmt: skip


def test_torchrun_without_a_count_uses_the_gpus_and_keeps_the_first_override(launch, stub_path):
    argv = _run(launch, "torchrun.sh", "parallel.sp=2", "hydra.run.dir=/mine", env=stub_path)
    # the stub python3 reports 2 GPUs; the user's run dir replaces the default one
    assert _without_log_dir(argv) == [
        "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "stafinetune", "train",
        "parallel.sp=2", "hydra.run.dir=/mine"]  # fmt: skip


def test_torchrun_multi_node(launch, stub_path):
    env = {**stub_path, "NNODES": "4", "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    argv = _without_log_dir(_run(launch, "torchrun.sh", "8", "parallel=zero3", env=env))
    assert argv[:10] == ["torchrun", "--nnodes", "4", "--node-rank", "1", "--master-addr",
                         "node0", "--master-port", "29500", "--nproc-per-node"]  # fmt: skip
    assert argv[-2:] == ["hydra.run.dir=/runs/x", "parallel=zero3"]


def test_deepspeed_with_a_hostfile(launch, stub_path, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    argv = _run(launch, "deepspeed.sh", str(hostfile), "parallel=zero3", env=stub_path)
    assert argv == ["deepspeed", "--hostfile", str(hostfile), "--module", "stafinetune", "train",
                    "hydra.run.dir=/runs/x", "parallel=zero3"]  # fmt: skip


def test_accelerate_with_config_and_options(launch, stub_path):
    config = str(LAUNCH / "accelerate" / "multi_node.yaml")
    argv = _run(launch, "accelerate.sh", config, "--machine_rank", "1", "parallel=fsdp2", env=stub_path)
    assert argv == ["accelerate", "launch", "--config_file", config, "--machine_rank", "1",
                    "--module", "stafinetune", "train", "hydra.run.dir=/runs/x",
                    "parallel=fsdp2"]  # fmt: skip


def test_slurm_runs_one_torchrun_per_node(launch, stub_path):
    env = {
        **stub_path,
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
    }
    argv = _run(launch, "slurm.sbatch", "parallel=fsdp2", env=env)
    assert argv[0] == "srun" and Path(argv[1]).name == "torchrun"
    assert "--rdzv-endpoint" in argv and argv[argv.index("--rdzv-endpoint") + 1] == "node0:29500"
    assert argv[-2:] == ["hydra.run.dir=/runs/x", "parallel=fsdp2"]


def test_deepspeed_launcher_argument_is_consumed():
    from stafinetune.commands.cli import strip_launcher_args

    os.environ.pop("LOCAL_RANK", None)
    assert strip_launcher_args(["--local_rank=3", "train.steps=2"]) == ["train.steps=2"]
    assert os.environ.pop("LOCAL_RANK") == "3"
    assert strip_launcher_args(["train.steps=2", "--local_rank", "1"]) == ["train.steps=2"]
    assert os.environ.pop("LOCAL_RANK") == "1"


# --------------------------------------------------------------------- where the launcher is
def _which_stub(folder: Path) -> None:
    """Stubs in ``folder`` that print their own path (which one the script picked)."""
    _write_stubs(folder, body='echo "$0"')


def test_the_launcher_comes_from_venv_then_the_repository_then_path(launch, stub_path, tmp_path):
    _which_stub(tmp_path / "repo" / ".venv" / "bin")
    _which_stub(tmp_path / "venv" / "bin")
    repo_torchrun = str(tmp_path / "repo" / ".venv" / "bin" / "torchrun")
    # no environment active: the repository's .venv beats PATH
    assert _run(launch, "torchrun.sh", "1", env=stub_path) == [repo_torchrun]
    # VENV names the environment
    env = {**stub_path, "VENV": str(tmp_path / "venv")}
    assert _run(launch, "torchrun.sh", "1", env=env) == [str(tmp_path / "venv/bin/torchrun")]
    # an activated environment's tools come first on PATH
    env = {**stub_path, "VIRTUAL_ENV": str(tmp_path / "elsewhere")}
    assert _without_log_dir(_run(launch, "torchrun.sh", "1", env=env))[0] == "torchrun"
    # a VENV without the tool is an error naming it, not a silent fallback
    env = {**stub_path, "VENV": str(tmp_path / "empty")}
    proc = _launch(launch, "torchrun.sh", "1", env=env)
    assert proc.returncode == 127 and proc.stderr.strip().splitlines() == [
        f"stafinetune: torchrun not found in VENV={tmp_path / 'empty'}: install stafinetune "
        f"there ($VENV/bin/pip install -e {tmp_path / 'repo'}) or unset VENV"
    ]


# what the scripts run besides the launchers (a PATH of only these has no launcher at all)
SHELL_TOOLS = ("dirname", "date", "mktemp", "rm", "find", "sort", "xargs", "awk", "cat", "cp",
               "mkdir", "basename")  # fmt: skip


@pytest.mark.parametrize("script", sorted(TOOLS))
def test_a_missing_launcher_is_one_line_saying_what_to_do(launch, script, tmp_path):
    core = tmp_path / "core"
    core.mkdir()
    for tool in SHELL_TOOLS:
        (core / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(core), "SLURM_JOB_NODELIST": "n0", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "1"}  # fmt: skip
    for key in _ENVIRONMENTS:
        env.pop(key, None)
    args = {"deepspeed.sh": ["hostfile"], "accelerate.sh": ["config.yaml"]}.get(script, [])
    proc = _launch(launch, script, *args, env=env)
    assert proc.returncode == 127, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"stafinetune: {TOOLS[script]} not found: activate the environment")
    assert f"set VENV=/path/to/venv, or create {tmp_path / 'repo' / '.venv'}" in line


# --------------------------------------------------------------------- a rank's one-line error
def _failing_torchrun(bin_dir: Path, *lines: str) -> None:
    """A torchrun stub that fails as torchrun does when ranks exit: each given rank line is
    left where stafinetune leaves it (beside the rank's error file under --log-dir)."""
    writes = "".join(
        f'mkdir -p "$2/r/attempt_0/{k}"; echo "{line}" > "$2/r/attempt_0/{k}/stafinetune_error.txt"\n'
        for k, line in enumerate(lines)
    )
    stub = bin_dir / "torchrun"
    stub.write_text("#!/usr/bin/env bash\n" + writes + 'echo "ChildFailedError: ..." >&2\nexit 1\n')
    stub.chmod(0o755)


def test_a_ranks_one_line_error_ends_the_launch_with_exit_code_2(launch, stub_path, tmp_path):
    line = "config error: train.steps must be >= 1, got 0"
    _failing_torchrun(tmp_path / "bin", line, line)  # both ranks, once in the output
    proc = _launch(launch, "torchrun.sh", "2", "train.steps=0", env=stub_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-2:] == ["ChildFailedError: ...", line]
    # a failure that left no line (a crash) keeps torchrun's exit code
    _failing_torchrun(tmp_path / "bin")
    assert _launch(launch, "torchrun.sh", "2", env=stub_path).returncode == 1


def test_real_torchrun_ends_with_the_ranks_line(tmp_path):
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(LAUNCH / "torchrun.sh"), "2", f"hydra.run.dir={tmp_path / 'run'}",
         "train.device=cpu", "train.steps=0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "config error: train.steps must be >= 1, got 0"
    assert not (tmp_path / "run").exists()  # every rank rejected: the script pruned the folder


def test_sigterm_reaches_torchrun_which_passes_it_to_the_ranks(launch, stub_path, tmp_path):
    log = tmp_path / "torchrun.log"
    stub = tmp_path / "bin" / "torchrun"
    stub.write_text(f"#!/usr/bin/env bash\ntrap 'echo TERM >> {log}; exit 143' TERM\n"
                    f"echo started >> {log}\nwhile true; do sleep 0.1; done\n")  # fmt: skip
    proc = subprocess.Popen([BASH, str(launch / "torchrun.sh"), "1"], env=stub_path, text=True,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (log.is_file() and "started" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # to the script only, as a scheduler may
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert log.read_text().splitlines() == ["started", "TERM"]
    assert proc.returncode == 143  # torchrun's status: the run did not finish
