"""End-to-end training on CPU: loss goes down, checkpoints resume exactly, distillation
narrows the student-teacher gap, NaNs stop cleanly, and the CLI keeps ranks apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stafinetune.config import compose_job_config
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def _job(data_root: Path, *overrides: str):
    base = [
        f"data.root={data_root}",
        "data.num_clips=16",
        "data.num_workers=0",
        "logging=none",
        "logging.progress=false",
        "train.log_every=1",
        "train.val_every=0",
        "train.warmup_steps=2",
        "train.device=cpu",
    ]
    return compose_job_config([*base, *overrides])


def test_training_reduces_loss_and_writes_everything(data_root: Path, tmp_path: Path):
    # plain flow matching from random weights (no teacher): the loss must fall
    job = _job(
        data_root, "model=wan_tiny", "distill=none", "train.steps=40", "train.lr=2e-3",
        "logging=wandb", "logging.mode=offline", "train.ckpt_every=20", "train.val_every=40",
    )  # fmt: skip
    result = Trainer(job, tmp_path).fit()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)
    val0, val_end = result.val_history[0], result.val_history[-1]
    assert val_end["val/flow_loss"] < 0.9 * val0["val/flow_loss"]
    # checkpoints: final one kept, written atomically (no .tmp left)
    assert result.last_checkpoint == tmp_path / "checkpoints" / "step_00000040"
    assert (result.last_checkpoint / "model.safetensors").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    # every step's metrics in metrics.jsonl and in the wandb offline run
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss/total" in r]
    assert steps == list(range(1, 41))
    shares = [r["perf/attn_time_share"] for r in rows if "perf/attn_time_share" in r]
    assert len(shares) == 40 and all(0 < s < 1 for s in shares)
    assert all(r["perf/tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows if "loss/total" in r)
    wandb_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and b"loss/total" in wandb_files[0].read_bytes()
    # validation videos: decodable mp4 files, one per sample, at step 0 and at the end
    videos = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert videos == [f"step_{s:08d}_{k}.mp4" for s in (0, 40) for k in (0, 1)]
    import decord

    clip = decord.VideoReader(str(tmp_path / "samples" / videos[-1]))
    assert len(clip) == 17 and clip[0].shape == (128, 128, 3)  # student only: no teacher
    # the export is a plain diffusers folder that loads back into the same weights
    exported = build_model(
        ModelConfig(path=str(result.export_dir / "transformer")),
        AttentionConfig(strategy_path=str(result.export_dir / "mask_strategy.json")),
    )
    saved = load_file(str(result.last_checkpoint / "model.safetensors"))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, saved[name]), name


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    model, ema = (load_file(str(path / f"{n}.safetensors")) for n in ("model", "ema"))
    optimizer = ckpt.load_tree(path / "optimizer")["state"]
    moments = {f"opt.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()}
    return {**model, **{f"ema.{k}": v for k, v in ema.items()}, **moments}


@pytest.mark.parametrize(
    "model",
    [(), ("model=hunyuanvideo15_tiny", "distill.allow_random_teacher=true")],
    ids=["default", "hunyuanvideo15"],
)
def test_resume_is_exact(data_root: Path, tmp_path: Path, model: tuple[str, ...]):
    # distillation (teacher + student) with EMA and accumulation: every piece of state matters
    overrides = (
        *model,
        "train.steps=6",
        "train.ckpt_every=0",
        "train.ema_decay=0.9",
        "train.grad_accum=2",
        "train.export=false",
    )
    straight = Trainer(_job(data_root, *overrides), tmp_path / "straight").fit()
    first = Trainer(_job(data_root, *overrides), tmp_path / "resumed").fit(until_step=3)
    assert first.step == 3 and first.last_checkpoint.name == "step_00000003"
    second = Trainer(_job(data_root, *overrides), tmp_path / "resumed").fit()
    assert second.step == 6
    assert second.losses == straight.losses[3:]  # same batches, noise and sigmas after resume
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_distillation_narrows_student_teacher_gap(data_root: Path, tmp_path: Path):
    # the default: STA student distilled from the shipped dense teacher
    job = _job(
        data_root, "train.steps=40", "train.lr=1e-4", "train.warmup_steps=5", "train.export=false",
        "train.val_every=40",
    )
    trainer = Trainer(job, tmp_path)
    assert trainer.teacher is not None and not any(
        p.requires_grad for p in trainer.teacher.parameters()
    )
    result = trainer.fit()
    start, end = result.val_history[0], result.val_history[-1]
    assert start["val/student_teacher_mse"] > 0  # the STA window really changes the output
    assert end["val/student_teacher_mse"] < 0.6 * start["val/student_teacher_mse"]
    assert end["val/attn_mse"] < start["val/attn_mse"]
    # generated videos from identical noise: student and teacher side by side, gap reported
    assert 0 < end["val/sample_gap_mse"] < start["val/sample_gap_mse"]
    import decord

    clip = decord.VideoReader(str(tmp_path / "samples" / "step_00000040_0.mp4"))
    assert clip[0].shape == (128, 256, 3)


def test_nonfinite_loss_stops_with_last_good_checkpoint(data_root: Path, tmp_path: Path):
    trainer = Trainer(_job(data_root, "train.steps=5", "train.export=false"), tmp_path)
    real_losses = trainer.distill.losses

    def poisoned(*args, **kwargs):
        terms = real_losses(*args, **kwargs)
        if trainer.step == 2 and trainer.student.training:  # the third training step
            terms["total"] = terms["total"] * float("nan")
        return terms

    trainer.distill.losses = poisoned
    with pytest.raises(NonFiniteLossError, match="step 3.*last good state is saved"):
        trainer.fit()
    good = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert good.name == "step_00000002"
    saved = load_file(str(good / "model.safetensors"))
    for name, value in trainer.student.state_dict().items():
        assert torch.equal(value, saved[name]), name


def _cli(tmp_path: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        "stafinetune.commands.train",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.root={data_root}",
        "data.num_clips=16",
        "data.num_workers=0",
        "train.steps=4",
        "train.val_every=0",
        "train.device=cpu",
        *extra,
    ]


def test_cli_run_prints_where_everything_went(data_root: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [sys.executable, "-m", *_cli(tmp_path, data_root, "logging.mode=offline")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for line in ("run directory", "checkpoint", "wandb run", "exported student"):
        assert line in proc.stdout
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "rank0" / "config.yaml").is_file()
    assert (run / "train_rank0.log").is_file()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_torchrun_ranks_keep_separate_outputs(data_root: Path, tmp_path: Path):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", *_cli(tmp_path, data_root, "logging=none", "train.batch_size=2")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    for rank in (0, 1):
        assert (run / ".hydra" / f"rank{rank}" / "config.yaml").is_file()
        assert (run / f"train_rank{rank}.log").is_file()
        assert (run / "checkpoints" / "step_00000004" / f"rank_{rank:05d}.json").is_file()
    assert proc.stdout.count("run directory") == 1  # only rank 0 reports


def test_teacher_without_pretrained_weights_copies_the_student(data_root: Path, tmp_path: Path):
    overrides = ("model=wan_tiny", "distill.allow_random_teacher=true", "train.steps=1")
    trainer = Trainer(_job(data_root, *overrides, "train.export=false"), tmp_path)
    student = trainer.student.state_dict()
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, student[name]), name
    assert (
        trainer.teacher.attention_cfg.mode == "full" and trainer.student.attention_cfg.mode == "sta"
    )


def test_attention_only_finetune_leaves_other_weights_untouched(data_root: Path, tmp_path: Path):
    trainer = Trainer(
        _job(data_root, "train.trainable=attention", "train.steps=2", "train.export=false"),
        tmp_path,
    )
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.fit()
    after = trainer.student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn1." in k or ".attn2." in k for k in changed), sorted(changed)[:5]
    assert any(".ffn." in k for k in before) and not any(".ffn." in k for k in changed)
