"""data/make_manifest.py: folder of videos + .txt captions -> a manifest preprocessing accepts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from data_media import good_mp4

from stafinetune.data import DataConfig, prepare_data

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "make_manifest.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_manifest", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifest_from_folder_with_sidecar_captions(tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    good_mp4(videos / "a.mp4")
    good_mp4(videos / "sub" / "b.mp4")
    (videos / "a.txt").write_text("a bar slides right\n")
    (videos / "notes.md").write_text("not a video")
    n, missing = load_tool().build_manifest(videos, tmp_path / "m.jsonl")
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
