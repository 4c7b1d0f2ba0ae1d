"""``captions=`` of ``stafinetune-eval``: a JSONL manifest, or the ``samples.json`` of a
sample run (its prompt per file); anything else is one line naming the file, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_testing import run_command, write_clips

from stafinetune.metrics.score import load_captions

PROMPT = "a red circle moving right at 4 pixels per frame on a dark blue background"


def _samples_json(path: Path) -> Path:
    """What stafinetune-sample writes: settings plus one row per video."""
    rows = [{"index": 0, "prompt": PROMPT, "seed": 0, "file": "fast.mp4", "latency_s": 0.1},
            {"index": 1, "prompt": PROMPT, "seed": 1, "file": "still.mp4"}]  # fmt: skip
    path.write_text(json.dumps({"weights": "base model", "steps": 20, "samples": rows}, indent=2))
    return path


def test_samples_json_gives_the_prompt_of_each_file(tmp_path):
    captions = load_captions(_samples_json(tmp_path / "samples.json"))
    assert captions == {"fast.mp4": PROMPT, "still.mp4": PROMPT}
    # a one-line manifest is still a manifest
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(json.dumps({"path": "clips/fast.mp4", "caption": PROMPT}) + "\n")
    assert load_captions(manifest) == {"fast.mp4": PROMPT}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"samples": [{"file": 3}]}', "'samples' must be a list of rows with a file and a prompt"),
        ('{"path": "a.mp4", "caption": "x"}\n{\n', "line 2 is not a JSON object"),
        ('["a.mp4"]\n', "line 1 has no path"),
        ('{"path": "a.mp4"}\n', "line 1 has neither a caption nor a motion"),
        ('{"path": "a.mp4", "motion": {"shapes": [{}]}}\n', "line 1 has a malformed motion"),
    ],
)
def test_other_files_are_refused_by_name(tmp_path, text, problem):
    path = tmp_path / "captions.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}.*{problem}"):
        load_captions(path)


def test_eval_scores_with_a_sample_runs_samples_json(tmp_path):
    clips = tmp_path / "videos"
    write_clips(clips)
    samples = _samples_json(tmp_path / "samples.json")
    proc = run_command("stafinetune.commands.eval", f"videos={clips}", f"captions={samples}",
                       f"hydra.run.dir={tmp_path / 'out'}")  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    fast, still = report["videos"]["fast.mp4"], report["videos"]["still.mp4"]
    assert fast["motion_speed_error"] < still["motion_speed_error"]  # the prompt's motion
    # a file that is neither a manifest nor a samples.json: one line, exit code 2
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "prompts": []\n}\n')
    proc = run_command("stafinetune.commands.eval", f"videos={clips}", f"captions={bad}",
                       f"hydra.run.dir={tmp_path / 'out2'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: captions={bad} line 1 is not a JSON object: give a JSONL manifest (path, "
        "caption) or the samples.json of a stafinetune-sample run"
    ]
