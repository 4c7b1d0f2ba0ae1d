"""Each launch script, with its launcher replaced by a stub on PATH: the command it would run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
STUBS = ("torchrun", "deepspeed", "accelerate", "srun", "scontrol", "python3")


@pytest.fixture()
def stub_path(tmp_path: Path) -> dict[str, str]:
    """PATH with stubs that print their name and arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBS:
        body = "echo 2" if name == "python3" else 'printf "%s\\n" "$(basename "$0")" "$@"'
        if name == "scontrol":
            body = "echo node0; echo node1"
        stub = bin_dir / name
        stub.write_text(f"#!/usr/bin/env bash\n{body}\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUN_DIR": "/runs/x"}
    for key in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(script: str, *args: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_torchrun_single_node(stub_path):
    argv = _run("torchrun.sh", "4", "parallel=fsdp2", "train.steps=10", env=stub_path)
    assert argv == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m", "stafinetune", "train",
                    "hydra.run.dir=/runs/x", "parallel=fsdp2", "train.steps=10"]  # fmt: skip


def test_torchrun_without_a_count_uses_the_gpus_and_keeps_the_first_override(stub_path):
    argv = _run("torchrun.sh", "parallel.sp=2", "hydra.run.dir=/mine", env=stub_path)
    # the stub python3 reports 2 GPUs; the user's run dir replaces the default one
    assert argv == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "stafinetune", "train",
                    "parallel.sp=2", "hydra.run.dir=/mine"]  # fmt: skip


def test_torchrun_multi_node(stub_path):
    env = {**stub_path, "NNODES": "4", "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    argv = _run("torchrun.sh", "8", "parallel=zero3", env=env)
    assert argv[:10] == ["torchrun", "--nnodes", "4", "--node-rank", "1", "--master-addr",
                         "node0", "--master-port", "29500", "--nproc-per-node"]  # fmt: skip
    assert argv[-2:] == ["hydra.run.dir=/runs/x", "parallel=zero3"]


def test_deepspeed_with_a_hostfile(stub_path, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    argv = _run("deepspeed.sh", str(hostfile), "parallel=zero3", env=stub_path)
    assert argv == ["deepspeed", "--hostfile", str(hostfile), "--module", "stafinetune", "train",
                    "hydra.run.dir=/runs/x", "parallel=zero3"]  # fmt: skip


def test_accelerate_with_config_and_options(stub_path):
    config = str(LAUNCH / "accelerate" / "multi_node.yaml")
    argv = _run("accelerate.sh", config, "--machine_rank", "1", "parallel=fsdp2", env=stub_path)
    assert argv == ["accelerate", "launch", "--config_file", config, "--machine_rank", "1",
                    "--module", "stafinetune", "train", "hydra.run.dir=/runs/x",
                    "parallel=fsdp2"]  # fmt: skip


def test_slurm_runs_one_torchrun_per_node(stub_path):
    env = {
        **stub_path,
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
    }
    argv = _run("slurm.sbatch", "parallel=fsdp2", env=env)
    assert argv[:2] == ["srun", "torchrun"]
    assert "--rdzv-endpoint" in argv and argv[argv.index("--rdzv-endpoint") + 1] == "node0:29500"
    assert argv[-2:] == ["hydra.run.dir=/runs/x", "parallel=fsdp2"]


def test_deepspeed_launcher_argument_is_consumed():
    from stafinetune.commands.cli import strip_launcher_args

    os.environ.pop("LOCAL_RANK", None)
    assert strip_launcher_args(["--local_rank=3", "train.steps=2"]) == ["train.steps=2"]
    assert os.environ.pop("LOCAL_RANK") == "3"
    assert strip_launcher_args(["train.steps=2", "--local_rank", "1"]) == ["train.steps=2"]
    assert os.environ.pop("LOCAL_RANK") == "1"
