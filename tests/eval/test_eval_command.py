"""``python -m stafinetune.commands.eval videos=DIR``: metrics.json's shape, bad files, empty folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_testing import VBENCH, run_command, write_clips

from stafinetune.commands.eval import EvalJobConfig, check_inputs
from stafinetune.errors import UserError


def test_scores_a_folder_into_metrics_json_of_the_fixed_shape(tmp_path: Path):
    clips = tmp_path / "clips"
    write_clips(clips)
    out = tmp_path / "out"
    # the folder as its own reference: every fidelity metric at its maximum
    proc = run_command("stafinetune.commands.eval", f"videos={clips}", f"reference={clips}",
                       f"hydra.run.dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) == {"videos", "mean"}
    assert set(report["videos"]) == {"fast.mp4", "still.mp4"}
    for scores in report["videos"].values():
        assert set(VBENCH) <= set(scores)
        assert all(0.0 <= scores[m] <= 1.0 for m in VBENCH)
        assert scores["psnr"] == 100.0 and scores["ssim"] == pytest.approx(1.0, abs=1e-12)
    fast, still = report["videos"]["fast.mp4"], report["videos"]["still.mp4"]
    assert fast["dynamic_degree"] == 1.0 and still["dynamic_degree"] == 0.0
    assert still["temporal_flickering"] > fast["temporal_flickering"]
    for metric in VBENCH:
        assert report["mean"][metric] == pytest.approx((fast[metric] + still[metric]) / 2)
    assert "scored 2 of 2 videos" in proc.stdout


def test_an_unreadable_video_is_reported_by_name_and_the_rest_scored(tmp_path: Path):
    clips = tmp_path / "clips"
    write_clips(clips)
    (clips / "still.mp4").unlink()
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    out = tmp_path / "out"
    proc = run_command("stafinetune.commands.eval", f"videos={clips}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.mp4" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert "broken.mp4" in report["videos"]["broken.mp4"]["error"]
    fast = report["videos"]["fast.mp4"]
    assert set(VBENCH) <= set(fast)
    assert all(report["mean"][m] == fast[m] for m in VBENCH)  # the bad file is left out
    assert "scored 1 of 2 videos" in proc.stdout


def test_an_empty_folder_fails_with_one_line_and_exit_code_2(tmp_path: Path):
    videos = tmp_path / "empty"
    videos.mkdir()
    (videos / "notes.txt").write_text("no videos here")
    proc = run_command("stafinetune.commands.eval", f"videos={videos}", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: videos={videos} holds no .mp4 files"]
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_missing_inputs_are_named_before_any_work(tmp_path: Path):
    job = EvalJobConfig(videos=str(tmp_path / "missing"))
    with pytest.raises(UserError, match=r"^videos=.*missing: no such folder$"):
        check_inputs(job)
    (tmp_path / "v").mkdir()
    write_clips(tmp_path / "v")
    for name in ("reference", "dino_path", "clip_path"):
        job = EvalJobConfig(videos=str(tmp_path / "v"), **{name: str(tmp_path / "nope")})
        with pytest.raises(UserError, match=rf"^{name}=.*nope: no such folder$"):
            check_inputs(job)
    job = EvalJobConfig(videos=str(tmp_path / "v"), captions=str(tmp_path / "m.jsonl"))
    with pytest.raises(UserError, match=r"^captions=.*m.jsonl: no such file$"):
        check_inputs(job)
    with pytest.raises(ValueError, match="mode=score needs videos"):
        EvalJobConfig(mode="score")
