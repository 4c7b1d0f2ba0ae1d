"""Atomic checkpoint writes, keep-last-k, resume resolution and pickle-free state files."""

import json
import random

import numpy as np
import pytest
import torch

from stafinetune.parallel import ParallelDims, World
from stafinetune.training import checkpoint as ckpt
from stafinetune.training import resume


def _dims(world_size: int = 1) -> ParallelDims:
    return ParallelDims(
        World(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    )


class _Box:
    """A trivial stateful part: a tensor, a tree and a rank-local value."""

    def __init__(self, step: int) -> None:
        self.w = {"w": torch.full((2,), float(step))}
        self.tree = {
            "step": step,
            "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}],
            "state": {0: {"m": torch.ones(3)}},
        }
        self.rank = {"rng": ckpt.rng_state(), "loader": {"pos": step}}

    def state(self) -> ckpt.TrainState:
        s = ckpt.TrainState()
        s.weights["model"] = (lambda: self.w, lambda v: setattr(self, "w", v))
        s.trees["trainer"] = (lambda: self.tree, lambda v: setattr(self, "tree", v))
        s.rank["rng"] = (lambda: self.rank["rng"], lambda v: self.rank.__setitem__("rng", v))
        s.rank["loader"] = (
            lambda: self.rank["loader"],
            lambda v: self.rank.__setitem__("loader", v),
        )
        return s


def _save(tmp_path, step, keep_last=2):
    manager = ckpt.CheckpointManager(tmp_path, _dims(), every=10, keep_last=keep_last)
    return manager.save(step, _Box(step).state())


def test_roundtrip_and_keep_last(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_00000020", "step_00000030"]
    box = _Box(0)
    manager = ckpt.CheckpointManager(tmp_path, _dims(), every=10, keep_last=2)
    assert manager.load(ckpt.latest_checkpoint(tmp_path), box.state()) == 30
    assert torch.equal(box.w["w"], torch.full((2,), 30.0))
    assert box.rank["loader"] == {"pos": 30}
    # tuples, int dict keys and tensors inside trees survive the JSON + safetensors round trip
    assert box.tree["groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(box.tree["state"][0]["m"], torch.ones(3))
    # nothing in a checkpoint is a pickle
    files = {p.suffix for p in ckpt.latest_checkpoint(tmp_path).iterdir()}
    assert files == {".json", ".safetensors"}


def test_incomplete_write_is_ignored(tmp_path):
    _save(tmp_path, 10)
    # a crash mid-write leaves a .tmp folder, or a folder without meta.json: neither counts
    (tmp_path / "step_00000020.tmp").mkdir()
    (tmp_path / "step_00000030").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000010"
    _save(tmp_path, 20)  # a later save replaces the stale temporary folder
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000020"
    assert not (tmp_path / "step_00000020.tmp").exists()


def test_rng_state_restores_exactly_through_a_state_file(tmp_path):
    state = ckpt.rng_state()
    ckpt.save_tree(tmp_path / "rng", state)
    a = (torch.randn(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load_tree(tmp_path / "rng"))
    b = (torch.randn(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resume_resolution(tmp_path):
    assert resume.resolve_resume("auto", tmp_path / "checkpoints", True) is None
    path = _save(tmp_path / "checkpoints", 5)
    assert resume.resolve_resume("auto", tmp_path / "checkpoints", True) == path
    assert resume.resolve_resume(str(tmp_path), tmp_path / "elsewhere", True) == path
    assert resume.resolve_resume("never", tmp_path / "checkpoints", True) is None
    with pytest.raises(FileNotFoundError, match="train.resume"):
        resume.resolve_resume(str(tmp_path / "nothing"), tmp_path, True)


def test_world_size_mismatch_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 1
    manager = ckpt.CheckpointManager(tmp_path, _dims(2), every=1, keep_last=2)
    with pytest.raises(ValueError, match="same world size"):
        manager.load(path, _Box(0).state())


def test_cadence():
    manager = ckpt.CheckpointManager(None, _dims(), every=10, keep_last=2)
    assert [s for s in range(1, 26) if manager.should_save(s, last=25)] == [10, 20, 25]
    never = ckpt.CheckpointManager(None, _dims(), every=0, keep_last=2)
    assert [s for s in range(1, 26) if never.should_save(s, last=25)] == [25]
