"""score_video / score_folder: the report's shape, JSON safety, and per-file errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from metrics_media import moving_shape, static

from stafinetune.data.synthetic import caption_for, write_mp4
from stafinetune.metrics import METRIC_TABLE, score_folder, score_video
from stafinetune.metrics.fidelity import PSNR_CAP_DB, VMAF_AVAILABLE

VBENCH = {"temporal_flickering", "dynamic_degree", "motion_smoothness", "subject_consistency",
          "background_consistency"}  # fmt: skip
FIDELITY = {"psnr", "ssim", "ms_ssim"} | ({"vmaf"} if VMAF_AVAILABLE else set())
MOTION = {"motion_direction_error_deg", "motion_speed_error", "motion_speed_error_rel"}


def test_score_video_keys_and_json_safety():
    video, motion = moving_shape(3, "up", size=64, frames=9)
    plain = score_video(video)
    assert set(plain) == VBENCH | {"feature_source"}
    assert plain["feature_source"] == "subject=pixel_proxy background=pixel_proxy"
    full = score_video(video, reference=video, caption=caption_for("dark blue", [motion]))
    assert set(full) == VBENCH | FIDELITY | MOTION | {"feature_source"}
    assert full["psnr"] == PSNR_CAP_DB and full["ssim"] == 1.0  # identical: inf -> the cap
    assert full["motion_direction_error_deg"] < 1.0
    json.dumps(full, allow_nan=False)
    assert set(METRIC_TABLE) == VBENCH | FIDELITY | MOTION | {"vmaf"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """good.mp4 (with caption and reference), still.mp4, broken.mp4, and a too-small reference."""
    root = tmp_path_factory.mktemp("score")
    videos, refs = root / "videos", root / "refs"
    videos.mkdir()
    refs.mkdir()
    good, motion = moving_shape(2, "left", size=64, frames=9)
    write_mp4(videos / "good.mp4", good, fps=8)
    write_mp4(refs / "good.mp4", good, fps=8)
    write_mp4(videos / "still.mp4", static(good), fps=8)
    write_mp4(refs / "still.mp4", static(good)[:, :32], fps=8)  # wrong size
    (videos / "broken.mp4").write_bytes(b"\x00\x01 not an mp4 " * 50)
    (videos / "notes.txt").write_text("not a video: ignored")
    captions = {"good.mp4": caption_for("dark blue", [motion]), "still.mp4": "a cat"}
    return videos, refs, captions


def test_score_folder_scores_good_files_and_names_bad_ones(folder):
    videos, refs, captions = folder
    report = score_folder(videos, reference_dir=refs, captions=captions, progress=False)
    assert set(report) == {"videos", "mean"}
    assert sorted(report["videos"]) == ["broken.mp4", "good.mp4", "still.mp4"]
    good = report["videos"]["good.mp4"]
    assert set(good) == VBENCH | FIDELITY | MOTION | {"feature_source"}
    assert good["psnr"] > 35 and good["motion_direction_error_deg"] < 5.0
    broken = report["videos"]["broken.mp4"]
    assert set(broken) == {"error"} and "VideoReadError" in broken["error"]
    assert str(videos / "broken.mp4") in broken["error"]
    still = report["videos"]["still.mp4"]["error"]
    assert "still.mp4" in still and "(9, 64, 64, 3)" in still and "(9, 32, 64, 3)" in still
    # Means are over the scored files only (here: good.mp4 alone).
    assert report["mean"]["psnr"] == pytest.approx(good["psnr"])
    assert report["mean"]["feature_source"] == good["feature_source"]
    json.dumps(report, allow_nan=False)


def test_score_folder_with_weights_and_without_references(folder, weights_root):
    videos, _, _ = folder
    report = score_folder(
        videos, dino_path=weights_root / "dino_vit", clip_path=weights_root / "clip_full",
        progress=False,
    )  # fmt: skip
    still = report["videos"]["still.mp4"]
    assert set(still) == VBENCH | {"feature_source"}
    assert still["feature_source"] == "subject=dino:vit background=clip:clip"
    assert still["temporal_flickering"] == 1.0 and still["dynamic_degree"] == 0.0
    assert still["subject_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert "error" in report["videos"]["broken.mp4"]
    assert report["mean"]["temporal_flickering"] == pytest.approx(
        np.mean([report["videos"][n]["temporal_flickering"] for n in ("good.mp4", "still.mp4")])
    )


def test_empty_or_missing_folder_is_named(tmp_path):
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no .mp4"):
        score_folder(tmp_path, progress=False)
    with pytest.raises(ValueError, match="nowhere"):
        score_folder(tmp_path / "nowhere", progress=False)
