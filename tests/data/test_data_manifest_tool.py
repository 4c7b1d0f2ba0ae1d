"""``python -m stafinetune.data.manifest``: folder of videos + .txt captions -> a manifest
preprocessing accepts."""

from __future__ import annotations

import json

from data_media import good_mp4

from stafinetune.data import DataConfig, prepare_data
from stafinetune.data.manifest import build_manifest


def test_manifest_from_folder_with_sidecar_captions(tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    good_mp4(videos / "a.mp4")
    good_mp4(videos / "sub" / "b.mp4")
    (videos / "a.txt").write_text("a bar slides right\n")
    (videos / "notes.md").write_text("not a video")
    n, missing = build_manifest(videos, tmp_path / "m.jsonl")
    assert (n, missing) == (2, 1)
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [
        {"path": "a.mp4", "caption": "a bar slides right"},
        {"path": "sub/b.mp4", "caption": ""},
    ]
    cfg = DataConfig(source="folder", manifest=str(tmp_path / "m.jsonl"), video_dir=str(videos),
                     root=str(tmp_path / "r"), num_frames=9, height=64, width=64)  # fmt: skip
    info = json.loads((prepare_data(cfg, verbose=False) / "cache.json").read_text())
    assert info["kept"] == 1 and info["skipped"] == {"missing_caption": 1}
