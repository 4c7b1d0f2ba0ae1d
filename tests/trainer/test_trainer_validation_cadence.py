"""When the trainer validates (``train.val_every``; 0: never) and that rank 0 shows each
validation's progress when ``logging.progress`` is on."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

from stafinetune.config import JobConfig
from stafinetune.training import validation
from stafinetune.training.trainer import Trainer


def _val_steps(run) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "val/flow_loss" in row]


def test_val_every_0_never_validates(tiny_job: Callable[..., JobConfig], tmp_path):
    job = tiny_job("train.steps=2", "train.val_every=0", "train.sample_steps=1", "distill=none")
    result = Trainer(job, tmp_path / "run").fit()
    assert result.step == 2 and result.val_history == []
    assert _val_steps(tmp_path / "run") == [] and not (tmp_path / "run" / "samples").exists()


def test_validation_runs_at_the_start_every_n_steps_and_at_the_end(
    tiny_job: Callable[..., JobConfig], tmp_path
):
    job = tiny_job("train.steps=3", "train.val_every=2", "train.sample_steps=0", "distill=none")
    result = Trainer(job, tmp_path / "run").fit()
    assert [row["step"] for row in result.val_history] == [0, 2, 3]
    assert _val_steps(tmp_path / "run") == [0, 2, 3]


def test_validation_shows_its_progress_on_rank_0(tiny_job: Callable[..., JobConfig], tmp_path,
                                                 capsys, monkeypatch):  # fmt: skip
    # a slow machine's bar redraws rarely: the last update must still be drawn before it closes
    monkeypatch.setattr(validation, "tqdm", functools.partial(validation.tqdm, mininterval=1e3))
    overrides = ("train.steps=1", "train.val_every=1", "train.sample_steps=2", "distill=none")
    Trainer(tiny_job(*overrides, "logging.progress=true"), tmp_path / "on").fit()
    err = capsys.readouterr().err
    assert "validate step 0" in err and "validate step 1" in err
    # the bar ends full: its total counts the gap's batches, the sampling steps, the scoring
    assert re.search(r"validate step 0: 100%\S* *\S* (\d+)/\1 ", err), err
    Trainer(tiny_job(*overrides, "logging.progress=false"), tmp_path / "off").fit()
    assert "validate step" not in capsys.readouterr().err
