"""Atomic checkpoint writes, keep-last-k and resume resolution."""

import json

import pytest
import torch

from stafinetune import checkpoint as ckpt


def _save(tmp_path, step, keep_last=2):
    return ckpt.save_checkpoint(
        tmp_path,
        step,
        rank=0,
        world_size=1,
        model_state={"w": torch.full((2,), float(step))},
        ema_state=None,
        optimizer_state={"state": {}, "param_groups": []},
        trainer_state={"step": step},
        rank_state={"rng": ckpt.rng_state(), "loader": {"pos": step}},
        keep_last=keep_last,
    )


def test_roundtrip_and_keep_last(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000020", "step_00000030"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), rank=0, world_size=1)
    assert state["step"] == 30 and torch.equal(state["model"]["w"], torch.full((2,), 30.0))
    assert state["rank"]["loader"] == {"pos": 30} and state["ema"] is None


def test_incomplete_write_is_ignored(tmp_path):
    _save(tmp_path, 10)
    # a crash mid-write leaves a .tmp folder, or a folder without meta.json: neither counts
    (tmp_path / "step_00000020.tmp").mkdir()
    (tmp_path / "step_00000030").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000010"
    _save(tmp_path, 20)  # a later save replaces the stale temporary folder
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000020"
    assert not (tmp_path / "step_00000020.tmp").exists()


def test_rng_state_restores_exactly():
    state = ckpt.rng_state()
    a = torch.randn(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.randn(3), a)


def test_resume_resolution(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path / "checkpoints", True) is None
    path = _save(tmp_path / "checkpoints", 5)
    assert ckpt.resolve_resume("auto", tmp_path / "checkpoints", True) == path
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere", True) == path
    assert ckpt.resolve_resume("never", tmp_path / "checkpoints", True) is None
    with pytest.raises(FileNotFoundError, match="train.resume"):
        ckpt.resolve_resume(str(tmp_path / "nothing"), tmp_path, True)


def test_world_size_mismatch_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 1
    with pytest.raises(ValueError, match="same world size"):
        ckpt.load_checkpoint(path, rank=0, world_size=2)
