"""Checkpoint contents are verified, not only their sizes: a SHA-256 per file recorded while
writing, safetensors headers checked field by field, and a malformed ``meta.json`` reported.
A damaged newest checkpoint makes ``train.resume=auto`` fall back to the newest one that
verifies, with a warning naming the file."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from stafinetune.parallel import ParallelDims, World
from stafinetune.safety import safetensors_problem
from stafinetune.training import checkpoint as ckpt
from stafinetune.training import resume


def _manager(ckpt_dir: Path) -> ckpt.CheckpointManager:
    dims = ParallelDims(World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    return ckpt.CheckpointManager(ckpt_dir, dims, every=10, keep_last=3)


def _state(step: int) -> ckpt.TrainState:
    state = ckpt.TrainState()
    weights = {"w": torch.full((64,), float(step)), "b": torch.arange(8, dtype=torch.int64)}
    state.weights["model"] = (lambda: weights, weights.update)
    state.trees["trainer"] = (lambda: {"step": step, "t": torch.ones(2)}, lambda tree: None)
    state.rank["loader"] = (lambda: {"pos": step}, lambda tree: None)
    return state


def _two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    manager = _manager(tmp_path)
    return manager.save(10, _state(10)), manager.save(20, _state(20))


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_written_safetensors_are_the_librarys_bytes_and_hashed_as_written(tmp_path):
    tensors = {
        "w": torch.randn(3, 4).t(),  # not contiguous
        "b": torch.randn(5).bfloat16(),
        "i": torch.arange(3),
        "m": torch.tensor([True, False]),
        "s": torch.tensor(1.5),
        "e": torch.zeros(0, 2),
    }
    path = tmp_path / "x.safetensors"
    digest = ckpt.write_safetensors(tensors, path)
    data = path.read_bytes()
    assert data == save({k: v.contiguous() for k, v in tensors.items()})
    assert digest == hashlib.sha256(data).hexdigest()
    assert safetensors_problem(path) is None
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())


def test_meta_records_a_digest_of_every_file_it_wrote(tmp_path):
    path = _manager(tmp_path).save(10, _state(10))
    meta = json.loads((path / "meta.json").read_text())
    expected = {"model.safetensors", "trainer.json", "trainer.safetensors", "rank_00000.json",
                "rank_00000.safetensors"}  # fmt: skip
    assert set(meta["sha256"]) == expected
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    assert meta["format"] == ckpt.FORMAT_VERSION == 2  # an addition older readers ignore


def test_flipped_bytes_of_the_same_size_fall_back_to_the_older_checkpoint(tmp_path, caplog):
    older, newest = _two_checkpoints(tmp_path)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the header and the size still agree
    weights.write_bytes(bytes(data))
    assert safetensors_problem(weights) is None
    assert "model.safetensors" in ckpt.verify_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="stafinetune.training.resume"):
        assert resume.resolve_resume("auto", tmp_path, True) == older
    assert "step_00000020" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(ValueError, match=r"step_00000020 is damaged: model.safetensors"):
        resume.resolve_resume(str(newest), tmp_path, True)


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlaps"),
        ({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, 8, "needs"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "gap"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "bad shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "bad data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "header needs"),
        ({"__metadata__": {"a": 1}}, 0, "__metadata__"),
        ([1, 2], 0, "not a JSON object"),
    ],
)  # fmt: skip
def test_forged_headers_are_found_before_loading(tmp_path, header, data, problem):
    path = tmp_path / "model.safetensors"
    _write_raw(path, header, bytes(data))
    found = safetensors_problem(path)
    assert found is not None and found.startswith("model.safetensors") and problem in found


def test_a_forged_header_in_the_newest_checkpoint_falls_back(tmp_path):
    older, newest = _two_checkpoints(tmp_path)
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    # the same size, a dtype the library does not know: load_file would raise its own error
    weights.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"X32"', 1))
    assert weights.stat().st_size == len(data)
    assert "unknown dtype" in ckpt.verify_checkpoint(newest)
    assert resume.resolve_resume("auto", tmp_path, True) == older
    # loaded without verification, the damage is a ValueError naming the file
    with pytest.raises(ValueError, match=r"model.safetensors.*unknown dtype"):
        _manager(tmp_path).load(newest, _state(0))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda meta: meta.update(files=list(meta["files"])), "files must map file names"),
        (lambda meta: meta.update(sha256={"../meta.json": "0"}), "outside the checkpoint"),
        (lambda meta: meta.update(step="ten"), "step must be an integer"),
        (lambda meta: meta.clear() or meta.update(x=[]), "step must be an integer"),
    ],
)
def test_a_malformed_meta_json_is_reported(tmp_path, edit, problem):
    older, newest = _two_checkpoints(tmp_path)
    meta = json.loads((newest / "meta.json").read_text())
    edit(meta)
    (newest / "meta.json").write_text(json.dumps(meta))
    assert problem in ckpt.verify_checkpoint(newest)
    assert resume.resolve_resume("auto", tmp_path, True) == older
    with pytest.raises(ValueError, match=problem):
        _manager(tmp_path).load(newest, _state(0))


def test_a_meta_json_that_is_not_an_object_is_reported(tmp_path):
    older, newest = _two_checkpoints(tmp_path)
    (newest / "meta.json").write_text("[1, 2, 3]")
    assert ckpt.verify_checkpoint(newest) == "meta.json is not a JSON object"
    assert resume.resolve_resume("auto", tmp_path, True) == older


def test_checkpoints_without_digests_still_verify_and_load(tmp_path):
    path = _manager(tmp_path).save(10, _state(10))
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]  # as written before digests were recorded
    (path / "meta.json").write_text(json.dumps(meta))
    assert ckpt.verify_checkpoint(path) is None
    assert resume.resolve_resume("auto", tmp_path, True) == path
    assert _manager(tmp_path).load(path, _state(0)) == 10
    # the sizes and headers are still checked
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-4])
    assert "model.safetensors" in ckpt.verify_checkpoint(path)
