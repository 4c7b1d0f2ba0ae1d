"""Every parallel mode against one process (or DDP), under torchrun on CPU with gloo.

A wrong all-to-all or a gradient off by the sp size is silent otherwise: these runs compare
logged losses, gradient norms, the validation gap and exported weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parallel_testing import (
    TORCHRUN,
    assert_close,
    losses,
    metrics,
    run_training,
    training_defaults,
    val_gap,
)
from safetensors.torch import load_file

from stafinetune.config import compose_job_config
from stafinetune.data import prepare_data
from stafinetune.training.trainer import Trainer

HERE = Path(__file__).parent
STEPS = ("train.steps=3", "train.export=true")


def _grad_norms(rows: list[dict]) -> list[float]:
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def _export(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "transformer" / "diffusion_pytorch_model.safetensors"))


def _torchrun_script(script: str, *args: str, ext_dir: Path, timeout: int = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext_dir)}
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node=2", str(HERE / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ulysses_matches_one_process_for_both_adapters(extensions_dir: Path):
    # forward, summed gradients and the sp-reduced attention MSE, with a padded last shard
    report = _torchrun_script("sp_check.py", ext_dir=extensions_dir)
    assert set(report) == {
        f"{f}/{m}"
        for f in ("wan_tiny", "hunyuan_tiny", "hunyuanvideo15_tiny")
        for m in ("full", "sta")
    } | {"wan_i2v_tiny/sta", "hunyuanvideo15_i2v_tiny/sta", "wan22_tiny_ti2v/sta",
         "wan22_tiny_experts/sta"}
    for case, errors in report.items():
        assert errors["output"] < 1e-5, case
        assert errors["grad"] < 1e-4, case
        assert errors.get("attn_mse", 0.0) < 1e-5, case


def test_sequence_parallel_training_matches_one_process(tmp_path, data_root, extensions_dir):
    one = run_training(tmp_path / "one", data_root, extensions_dir, *STEPS)
    sp2 = run_training(
        tmp_path / "sp2", data_root, extensions_dir, *STEPS, "parallel.sp=2", nproc=2
    )
    assert_close(losses(sp2), losses(one), 2e-3)
    assert_close(_grad_norms(sp2), _grad_norms(one), 2e-3)  # gradients not off by the sp size
    assert abs(val_gap(sp2, 0) - val_gap(one, 0)) <= 1e-3 * val_gap(one, 0)
    a, b = _export(tmp_path / "one"), _export(tmp_path / "sp2")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# Wan 2.2 TI2V's first-frame mode, distilled with sparse windows on a 3 x 3 x 5 token canvas:
# 45 tokens, so the last sp shard and its per-token timesteps are padded
TI2V = ("experiment=ti2v_i2v_tiny", "distill=sta", "distill.allow_random_teacher=true",
        "data.num_frames=9", "data.height=48", "data.width=80", "attention.window=[2,1,2]",
        "train.steps=2", "train.export=true")  # fmt: skip


def test_ti2v_training_under_sequence_parallelism_matches_one_process(
    tmp_path, data_root, extensions_dir
):
    # sp=2 under torchrun, one process in this one (the same overrides)
    sp2 = run_training(tmp_path / "sp2", data_root, extensions_dir, *TI2V, "parallel.sp=2", nproc=2)
    job = compose_job_config([*training_defaults(data_root), *TI2V])
    prepare_data(job.data, verbose=False)  # cached by the sp=2 run: no encoding here
    Trainer(job, tmp_path / "one").fit()
    one = metrics(tmp_path / "one")
    assert len(losses(one)) == 2 and min(losses(one)) > 0  # the sparse student trains
    assert_close(losses(sp2), losses(one), 2e-3)
    assert_close(_grad_norms(sp2), _grad_norms(one), 2e-3)
    for step in (0, 2):  # validation samples condition on the first frame under sp too
        assert abs(val_gap(sp2, step) - val_gap(one, step)) <= 1e-3 * val_gap(one, step)
    a, b = _export(tmp_path / "one"), _export(tmp_path / "sp2")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_root, extensions_dir) -> Path:
    run = tmp_path_factory.mktemp("ddp")
    run_training(run, data_root, extensions_dir, *STEPS, "parallel=ddp", nproc=2)
    return run


@pytest.mark.parametrize(
    "overrides",
    [("parallel=fsdp2",), ("parallel=zero2",), ("parallel=zero3", "parallel.teacher=shard")],
    ids=["fsdp2", "zero2", "zero3-sharded-teacher"],
)
def test_sharding_matches_ddp(overrides, ddp_run, tmp_path, data_root, extensions_dir):
    rows = run_training(tmp_path / "run", data_root, extensions_dir, *STEPS, *overrides, nproc=2)
    ref = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert_close(losses(rows), losses(ref), 2e-3)
    assert_close(_grad_norms(rows), _grad_norms(ref), 2e-3)
    assert abs(val_gap(rows, 3) - val_gap(ref, 3)) <= 1e-3 * val_gap(ref, 3)
    # export gathers the sharded student into one diffusers folder with the same weights
    a, b = _export(ddp_run), _export(tmp_path / "run")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


# the adapter's parity is in its losses, gradients and exports: no validation runs
LORA = ("train.trainable=lora", "train.lora_rank=4", "train.lora_merge_export=true",
        "train.val_every=0")  # fmt: skip
LORA_FILES = ("pytorch_lora_weights.safetensors", "transformer/diffusion_pytorch_model.safetensors")


def _same_lora_exports(a: Path, b: Path) -> None:
    for name in LORA_FILES:
        x, y = load_file(str(a / "export" / name)), load_file(str(b / "export" / name))
        assert x.keys() == y.keys() and len(x) > 0, name
        assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-4, name


@pytest.fixture(scope="module")
def lora_ddp_run(tmp_path_factory, data_root, extensions_dir) -> Path:
    run = tmp_path_factory.mktemp("lora-ddp")
    run_training(run, data_root, extensions_dir, *STEPS, *LORA, nproc=2)
    return run


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_lora_under_sharding_matches_ddp(
    strategy, lora_ddp_run, tmp_path, data_root, extensions_dir
):
    # the adapter trains and exports alike under every engine: FSDP2 shards the adapter (the
    # export reads the gathered weights), DeepSpeed drops empty optimizer groups (none built)
    rows = run_training(tmp_path / strategy, data_root, extensions_dir, *STEPS, *LORA,
                        f"parallel={strategy}", nproc=2)  # fmt: skip
    ref = [json.loads(line) for line in (lora_ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert_close(losses(rows), losses(ref), 2e-3)
    assert_close(_grad_norms(rows), _grad_norms(ref), 2e-3)
    _same_lora_exports(lora_ddp_run, tmp_path / strategy)


def test_lora_under_sequence_parallelism_matches_one_process(tmp_path, data_root, extensions_dir):
    one = run_training(tmp_path / "one", data_root, extensions_dir, *STEPS, *LORA)
    sp2 = run_training(tmp_path / "sp2", data_root, extensions_dir, *STEPS, *LORA,
                       "parallel.sp=2", nproc=2)  # fmt: skip
    assert_close(losses(sp2), losses(one), 2e-3)
    assert_close(_grad_norms(sp2), _grad_norms(one), 2e-3)
    _same_lora_exports(tmp_path / "one", tmp_path / "sp2")


def test_checkpoints_resume_exactly_under_every_mode(tmp_path, data_root, extensions_dir):
    # 4 steps straight == 2 steps + resume + 2, with EMA and gradient accumulation; DDP's
    # resume is the single process's (tests/trainer), the sharded engines' differ
    modes = ["fsdp2:1", "zero3:1", "zero2:2", "fsdp2:2"]
    report = _torchrun_script(
        "resume_check.py", str(data_root), str(tmp_path), *modes, ext_dir=extensions_dir
    )
    for mode in modes:
        assert report[mode] == {"losses": True, "weights": True, "step": 4}, (mode, report)


def test_fsdp2_and_zero3_run_in_one_process(tmp_path, data_root, extensions_dir):
    # world size 1 still goes through the sharding engines (a process group of one)
    steps = ("train.steps=2", "train.export=false", "train.val_every=0")
    ref = run_training(tmp_path / "plain", data_root, extensions_dir, *steps)
    for strategy in ("fsdp2", "zero3"):
        rows = run_training(tmp_path / strategy, data_root, extensions_dir, *steps,
                            f"parallel={strategy}")  # fmt: skip
        assert_close(losses(rows), losses(ref), 2e-3)


def test_sp_must_divide_processes_and_heads(tmp_path, data_root, extensions_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [f"hydra.run.dir={tmp_path}", f"data.root={data_root}", "data.num_clips=16",
            "train.device=cpu", "logging=none"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "stafinetune.commands.train", *base, "parallel.sp=2"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "parallel.sp=2 must divide the number of launched processes (1)" in proc.stderr


def test_search_under_sequence_parallelism_matches_one_process(tmp_path, data_root, extensions_dir):
    # each rank scores its own heads on the whole sequence; the gathered tables select the same
    args = ["search.budget=0.3", "search.steps=2", "search.num_samples=2", "logging=none",
            f"data.root={data_root}", "data.num_clips=16", "data.num_workers=0", "device=cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, prefix in (("one", [sys.executable, "-m"]),
                         ("sp2", [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m"])):  # fmt: skip
        extra = ["parallel.sp=2"] if name == "sp2" else []
        proc = subprocess.run(
            [*prefix, "stafinetune", "search", f"hydra.run.dir={tmp_path / name}", *args, *extra],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, sp2 = (
        json.loads((tmp_path / n / "mask_strategy.json").read_text()) for n in ("one", "sp2")
    )
    assert one["windows"] == sp2["windows"] and one["train_windows"] == sp2["train_windows"]
    errors = [json.loads((tmp_path / n / "search_errors.json").read_text()) for n in ("one", "sp2")]
    a, b = (torch.tensor(e["rel_l2"], dtype=torch.float64) for e in errors)
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-7, equal_nan=True)
