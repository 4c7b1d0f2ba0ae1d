"""Compare mode of ``stafinetune-eval`` on the tiny default: same seeds, fidelity, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from stafinetune.commands import eval as eval_command
from stafinetune.config import conf_dir, to_job_config
from stafinetune.errors import UserError

PROMPTS = ["a red circle moving right at 4 pixels per frame on a dark blue background",
           "a yellow triangle moving down at 2 pixels per frame on a grey background"]  # fmt: skip


def _compose(*overrides: str) -> eval_command.EvalJobConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_job_config(compose(config_name="eval", overrides=list(overrides)))


def test_compare_dense_and_sta_on_the_tiny_default(tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    job = _compose(f"sample.prompts={prompts}", "sample.steps=3", "logging.progress=false",
                   "sample.device=cpu", "attention.dense_first_steps=1")  # fmt: skip
    assert [m.name for m in job.compare.models] == ["dense", "sta"]
    eval_command.run(job, tmp_path / "out")
    out = tmp_path / "out"
    report = json.loads((out / "compare.json").read_text())
    dense, sta = report["models"]["dense"], report["models"]["sta"]
    assert report["reference"] == "dense" and report["seeds"] == [0, 1]
    # the dense model against itself: every fidelity metric at its maximum, no latent gap
    assert dense["mean"]["psnr"] == 100.0 and dense["mean"]["latent_gap"] == 0.0
    assert dense["mean"]["ssim"] == pytest.approx(1.0) and dense["speedup"] == 1.0
    assert dense["settings"]["video_density"] == 1.0
    # STA (window 3x3x3 tiles on 5x4x4) attends a third of the pairs on 2 of the 3 steps (the
    # first is dense) and drifts from dense
    assert sta["settings"]["video_density"] == pytest.approx((1 + 2 * 0.3375) / 3)
    assert 0 < sta["mean"]["latent_gap"] and sta["mean"]["psnr"] < 100.0
    for model in (dense, sta):
        assert len(model["videos"]) == 2
        assert not model["errors"] and 0 < model["attention_share"] < 1
        assert "motion_direction_error_deg" in model["mean"]  # the prompts state a motion
    assert sorted(p.name for p in (out / "sta" / "videos").iterdir()) == sorted(dense["videos"])
    assert "pixel proxy: dino_path is not set" in report["notes"]["subject_consistency"]
    table = (out / "compare.md").read_text()
    assert "| dense | base model | dense | 100.0% |" in table and "| sta |" in table
    assert (out / "compare.png").stat().st_size > 0


def test_compare_settings_fail_at_start_up_naming_the_field():
    with pytest.raises(ValueError, match="compare.reference='teacher' is not one of"):
        _compose("compare.reference=teacher")
    with pytest.raises(ValueError, match=r"compare.models names must be unique"):
        _compose("compare.models=[{name: a, mode: full}, {name: a}]", "compare.reference=a")
    job = _compose("compare.models=[{name: base, mode: full}, {name: ft, checkpoint: /x}]",
                   "compare.reference=base")  # fmt: skip
    assert job.compare.models[1].mode == "sta" and job.compare.models[1].checkpoint == "/x"
    with pytest.raises(UserError, match=r"^compare.models\[1\].checkpoint=/x: no such dir"):
        eval_command.check_inputs(job)  # before any model is sampled
