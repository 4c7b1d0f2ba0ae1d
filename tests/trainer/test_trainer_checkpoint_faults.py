"""Checkpoints under faults: damaged files are skipped on resume, failed writes leave nothing
behind and say why, and an unusable checkpoint folder is found at start-up."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from stafinetune.errors import UserError
from stafinetune.parallel import ParallelDims, World
from stafinetune.training import checkpoint as ckpt
from stafinetune.training import resume


def _dims() -> ParallelDims:
    return ParallelDims(World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def _state(step: int) -> ckpt.TrainState:
    state = ckpt.TrainState()
    weights = {"w": torch.full((256,), float(step))}
    state.weights["model"] = (lambda: weights, weights.update)
    state.trees["trainer"] = (lambda: {"step": step}, lambda tree: None)
    state.rank["loader"] = (lambda: {"pos": step}, lambda tree: None)
    return state


def _manager(ckpt_dir: Path, **kwargs) -> ckpt.CheckpointManager:
    return ckpt.CheckpointManager(ckpt_dir, _dims(), every=10, keep_last=3, **kwargs)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_auto_resume_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    manager = _manager(tmp_path)
    older = manager.save(10, _state(10))
    newest = manager.save(20, _state(20))
    _truncate(newest / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="stafinetune.training.checkpoint"):
        assert resume.resolve_resume("auto", tmp_path, True) == older
    assert "step_00000020" in caplog.text and "model.safetensors" in caplog.text
    assert manager.load(older, _state(0)) == 10
    # asked for by name, a damaged checkpoint is an error naming the file
    with pytest.raises(ValueError, match=r"step_00000020.*model.safetensors"):
        resume.resolve_resume(str(newest), tmp_path, True)
    # a run whose every checkpoint is damaged does not silently start again
    _truncate(older / "rank_00000.json", keep=0.3)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resume.resolve_resume("auto", tmp_path, True)


def test_damage_is_found_without_the_recorded_sizes(tmp_path):
    # checkpoints written before sizes were recorded: the safetensors header is checked
    path = _manager(tmp_path).save(10, _state(10))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["files"]["model.safetensors"] == (path / "model.safetensors").stat().st_size
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.verify_checkpoint(path) is None
    _truncate(path / "model.safetensors", keep=0.9)
    assert "model.safetensors" in ckpt.verify_checkpoint(path)


def test_meta_holds_the_run_config(tmp_path):
    config = {"train": {"lr": 1e-4}, "model": {"flavor": "wan_tiny"}}
    path = _manager(tmp_path, config=config).save(10, _state(10))
    assert json.loads((path / "meta.json").read_text())["config"] == config


@pytest.mark.parametrize(
    "fault",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("unexpected pos 64 vs 192")],
)
def test_a_failed_write_removes_the_partial_folder_and_names_the_path(tmp_path, monkeypatch, fault):
    manager = _manager(tmp_path)
    manager.save(10, _state(10))

    def full_disk(*args, **kwargs):
        raise fault

    monkeypatch.setattr(ckpt, "write_safetensors", full_disk)
    with pytest.raises(UserError, match=r"could not write checkpoint .*step_00000020.*free") as err:
        manager.save(20, _state(20))
    assert str(tmp_path) in str(err.value)
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010"]


def test_a_bug_while_writing_keeps_its_type_but_leaves_no_partial_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(ckpt, "write_safetensors", broken)
    with pytest.raises(KeyError):
        _manager(tmp_path).save(10, _state(10))
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unusable_checkpoint_folder_is_found_at_start_up(tmp_path):
    blocked = tmp_path / "run" / "checkpoints"
    blocked.parent.mkdir()
    blocked.write_text("a file where the folder should be")
    with pytest.raises(UserError, match=rf"cannot write checkpoints to {blocked}"):
        _manager(blocked).check_writable()
    manager = _manager(tmp_path / "ok" / "checkpoints")
    manager.check_writable()
    assert not list(manager.ckpt_dir.iterdir())  # the probe file is gone
    with pytest.raises(UserError, match=r"free .*one checkpoint needs about"):
        manager.check_free_space(10**18)
    manager.check_free_space(1)


def test_the_trainer_checks_its_checkpoint_folder_before_any_data_work(tmp_path):
    from stafinetune.config import compose_job_config
    from stafinetune.training.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the folder should be")
    job = compose_job_config([f"data.root={tmp_path / 'data'}", "train.device=cpu", "logging=none"])
    with pytest.raises(UserError, match="cannot write checkpoints"):
        Trainer(job, run)
    assert not (tmp_path / "data").exists()
