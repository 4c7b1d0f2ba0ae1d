"""Every class of bad input is skipped, counted and listed; the run and the good clips survive."""

from __future__ import annotations

import json

import pytest
from data_media import empty, garbage, good_mp4, grayscale_mov, huge_mp4, truncated_mp4

from stafinetune.data import DataConfig, build_train_loader, prepare_data
from stafinetune.data.video import BadVideo, VideoRecord, load_clip


def cfg_for(tmp_path, **kw) -> DataConfig:
    # the media live in their own folder, outside the manifest's
    values = dict(source="folder", manifest=str(tmp_path / "m.jsonl"), root=str(tmp_path / "root"),
                  num_frames=9, height=64, width=64, num_workers=0, shard_size=4,
                  allow_outside_paths=True)  # fmt: skip
    values.update(kw)
    return DataConfig(**values)


def reason_of(record: VideoRecord, cfg: DataConfig) -> str:
    with pytest.raises(BadVideo) as info:
        load_clip(record, cfg)
    return info.value.reason


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "good": good_mp4(d / "good.mp4"),
        "truncated": truncated_mp4(d / "truncated.mp4", d / "full.mp4"),
        "garbage": garbage(d / "garbage.mp4"),
        "empty": empty(d / "empty.mp4"),
        "one_frame": good_mp4(d / "one.mp4", frames=1),
        "gray": grayscale_mov(d / "gray.mov"),
        "wide": good_mp4(d / "wide.mp4", height=16, width=256),
        "tiny": good_mp4(d / "tiny.mp4", height=8, width=8),
        "huge": huge_mp4(d / "huge.mp4"),
    }


@pytest.mark.parametrize(
    "name, reason",
    [
        ("truncated", "truncated"),
        ("garbage", "unreadable"),
        ("empty", "empty_file"),
        ("one_frame", "too_short"),
        ("gray", "wrong_channels"),
        ("wide", "bad_aspect"),
        ("tiny", "too_small"),
        ("huge", "too_large"),  # refused from the header under the default data.max_pixels
    ],
)
def test_each_bad_file_class_has_its_reason(media, tmp_path, name, reason):
    cfg = cfg_for(tmp_path)
    assert reason_of(VideoRecord(0, "a caption", path=str(media[name])), cfg) == reason


def test_record_level_problems(media, tmp_path):
    cfg = cfg_for(tmp_path)
    good = str(media["good"])
    assert reason_of(VideoRecord(0, "", path=good), cfg) == "missing_caption"
    assert reason_of(VideoRecord(0, "c", path=str(tmp_path / "nope.mp4")), cfg) == "missing_file"
    assert reason_of(VideoRecord(0, "c", path=good, start=2.0, end=1.0), cfg) == "bad_range"
    # 21 frames at 8 fps = 2.6 s; a window of 0.5 s holds only 4 frames, 9 are needed.
    assert reason_of(VideoRecord(0, "c", path=good, start=1.0, end=1.5), cfg) == "too_short"
    # A declared size above the pixel budget is refused before any frame is decoded.
    assert (
        reason_of(VideoRecord(0, "c", path=good), cfg_for(tmp_path, max_pixels=64 * 64))
        == "too_large"
    )
    # The same clip is fine at its native rate but too short when sampled at 2 fps.
    load_clip(VideoRecord(0, "c", path=good), cfg)
    assert reason_of(VideoRecord(0, "c", path=good), cfg_for(tmp_path, fps=2.0)) == "too_short"


def test_prepare_skips_counts_and_reports_bad_inputs(media, tmp_path, capsys):
    lines = [{"path": str(media["good"]), "caption": "a yellow bar moving right"}]
    lines += [{"path": str(media[n]), "caption": f"clip {n}"} for n in
              ("truncated", "garbage", "empty", "one_frame", "gray", "wide", "tiny")]  # fmt: skip
    lines += [
        {"path": str(media["good"]), "caption": ""},
        {"path": str(tmp_path / "missing.mp4"), "caption": "gone"},
        {"path": str(media["good"]), "caption": "second good copy", "start": 0.25},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:5]) + "\n{not json\n"
    text += "\n".join(json.dumps(x) for x in lines[5:]) + "\n"
    (tmp_path / "m.jsonl").write_text(text)
    cfg = cfg_for(tmp_path)
    cache_dir = prepare_data(cfg)
    info = json.loads((cache_dir / "cache.json").read_text())
    assert info["records"] == 12 and info["kept"] == 2
    assert info["skipped"] == {
        "bad_aspect": 1, "bad_manifest": 1, "empty_file": 1, "missing_caption": 1,
        "missing_file": 1, "too_short": 1, "too_small": 1, "truncated": 1, "unreadable": 1,
        "wrong_channels": 1,
    }  # fmt: skip
    report = [json.loads(x) for x in (cache_dir / "bad_inputs.jsonl").read_text().splitlines()]
    assert len(report) == 10 and {r["reason"] for r in report} == set(info["skipped"])
    assert all(r["label"] and "index" in r for r in report)
    out = capsys.readouterr().out
    assert "kept 2 of 12 records, skipped 10" in out and "bad_inputs.jsonl" in out
    loader = build_train_loader(cfg, batch_size=1, seed=0)
    captions = {b["caption"][0] for b, _ in zip(loader, range(4), strict=False)}
    assert captions == {"a yellow bar moving right", "second good copy"}


def test_all_records_bad_gives_a_clear_loader_error(media, tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": str(media["garbage"]), "caption": "x"}) + "\n"
    )
    cfg = cfg_for(tmp_path)
    prepare_data(cfg, verbose=False)
    with pytest.raises(ValueError, match="no usable sample"):
        build_train_loader(cfg, batch_size=1, seed=0)
