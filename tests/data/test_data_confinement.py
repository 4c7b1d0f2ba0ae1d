"""Manifest and dataset paths stay inside the data folder: ``../``, absolute paths elsewhere
and ``~`` are not read but listed in bad_inputs.jsonl, unless data.allow_outside_paths."""

from __future__ import annotations

import json
import os

import pytest
from data_media import good_mp4

from stafinetune.data import DataConfig, prepare_data
from stafinetune.data.sources import OUTSIDE, DatasetSource, ManifestSource

ESCAPES = ["../secret.mp4", "/etc/passwd", "~/clip.mp4", "clips/../../secret.mp4"]


@pytest.fixture()
def folder(tmp_path):
    """``tmp_path/data`` with ``clips/good.mp4`` and a manifest naming it and every escape;
    ``tmp_path/secret.mp4`` sits beside the data folder."""
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    good_mp4(data / "clips" / "good.mp4")
    good_mp4(tmp_path / "secret.mp4")
    os.symlink(tmp_path / "secret.mp4", data / "clips" / "linked.mp4")  # the user's own link
    rows = [{"path": p, "caption": "a clip"} for p in ["clips/good.mp4", "clips/./linked.mp4",
                                                       *ESCAPES]]  # fmt: skip
    (data / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_manifest_paths_that_leave_the_data_folder_carry_a_problem(folder):
    records = ManifestSource(folder / "m.jsonl")
    assert [r.problem for r in records][:2] == [None, None]
    for record, path in zip(list(records)[2:], ESCAPES, strict=True):
        assert record.problem[0] == OUTSIDE and path in record.problem[1]
        assert "data.allow_outside_paths=true" in record.problem[1]
    assert all(r.problem is None for r in ManifestSource(folder / "m.jsonl", allow_outside=True))


def test_preprocessing_lists_them_and_never_decodes_them(folder, tmp_path):
    cfg = DataConfig(source="folder", manifest=str(folder / "m.jsonl"), root=str(tmp_path / "r"),
                     num_frames=9, height=64, width=64, num_workers=0)  # fmt: skip
    info = json.loads((prepare_data(cfg, verbose=False) / "cache.json").read_text())
    assert info["kept"] == 2 and info["skipped"] == {OUTSIDE: len(ESCAPES)}
    report = [json.loads(line) for line in
              (prepare_data(cfg, verbose=False) / "bad_inputs.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in report) == sorted(ESCAPES)
    assert {r["reason"] for r in report} == {OUTSIDE}
    # allowed, they are read: /etc/passwd reaches the decoder (and is refused there)
    allowed = DataConfig(**{**cfg.__dict__, "allow_outside_paths": True})
    info = json.loads((prepare_data(allowed, verbose=False) / "cache.json").read_text())
    assert OUTSIDE not in info["skipped"] and info["skipped"]["unreadable"] >= 1


def test_dataset_paths_are_confined_to_the_dataset_folder(tmp_path):
    import datasets

    (tmp_path / "ds_videos").mkdir()
    good_mp4(tmp_path / "ds_videos" / "a.mp4")
    datasets.Dataset.from_dict(
        {"video": ["../ds_videos/a.mp4", "/etc/passwd"], "caption": ["x", "y"]}
    ).save_to_disk(str(tmp_path / "ds"))
    source = DatasetSource(tmp_path / "ds")
    assert [source[i].problem[0] for i in range(2)] == [OUTSIDE, OUTSIDE]
    assert source[1].path == "/etc/passwd"
    assert DatasetSource(tmp_path / "ds", allow_outside=True)[0].problem is None
