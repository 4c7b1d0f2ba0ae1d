"""Resume follows the config and the run-directory rules (``stafinetune.training.resume``)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from stafinetune.config import compose_job_config
from stafinetune.errors import UserError
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.resume import config_changes, cut_logs
from stafinetune.training.trainer import Trainer


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def _job(data_root: Path, *overrides: str):
    base = [
        f"data.root={data_root}", "data.num_clips=8", "data.num_workers=0",
        "data.decode_workers=0", "logging=none", "logging.progress=false", "train.log_every=1",
        "train.val_every=0", "train.sample_steps=0", "train.warmup_steps=0",
        "train.schedule=constant", "train.batch_size=2", "train.steps=6", "train.export=false",
        "train.device=cpu", "train.lr=1e-3",
    ]  # fmt: skip
    return compose_job_config([*base, *overrides])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_changed_lr_applies_on_resume_and_is_listed(data_root, tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(_job(data_root), run).fit(until_step=2)
    with caplog.at_level(logging.WARNING, logger="stafinetune.training.trainer"):
        trainer = Trainer(_job(data_root, "train.lr=1e-4", "train.steps=8"), run)
    assert trainer.step == 2
    assert "train.lr: 0.001 -> 0.0001" in caplog.text and "train.steps: 6 -> 8" in caplog.text
    assert trainer.engine.lr == pytest.approx(1e-4)
    assert all(g["lr"] == pytest.approx(1e-4) for g in trainer.engine.optimizer.param_groups)
    trainer.fit(until_step=3)
    assert _rows(run)[-1]["lr"] == pytest.approx(1e-4)  # the metrics show the new value


def test_settings_that_change_the_model_or_data_stop_the_resume(data_root, tmp_path):
    run = tmp_path / "run"
    Trainer(_job(data_root), run).fit(until_step=1)
    for overrides, named in (
        (["attention.window=[3,3,5]"], "attention.window: [3, 3, 3] -> [3, 3, 5]"),
        (["model=wan_tiny", "distill=none"], "model.path"),
        (["train.batch_size=4"], "train.batch_size: 2 -> 4"),
        (["data.height=64"], "data.height: 128 -> 64"),
    ):
        with pytest.raises(UserError, match="cannot resume from") as err:
            Trainer(_job(data_root, *overrides), run)
        assert named in str(err.value) and "hydra.run.dir" in str(err.value)
    # a checkpoint written before meta.json held the config: the run's config.yaml decides
    from omegaconf import OmegaConf

    path = ckpt.latest_checkpoint(run / "checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    OmegaConf.save(OmegaConf.create(meta.pop("config")), run / "config.yaml")
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"attention.window.*config.yaml"):
        Trainer(_job(data_root, "attention.window=[1,1,1]"), run)


def test_resume_never_refuses_a_used_run_directory(data_root, tmp_path):
    run = tmp_path / "run"
    Trainer(_job(data_root), run).fit(until_step=1)
    with pytest.raises(UserError, match=r"train.resume=never but .* already holds a run"):
        Trainer(_job(data_root, "train.resume=never"), run)
    # a fresh directory is fine
    assert Trainer(_job(data_root, "train.resume=never"), tmp_path / "new").step == 0


def test_resume_from_another_run(data_root, tmp_path):
    first = tmp_path / "first"
    Trainer(_job(data_root), first).fit(until_step=2)
    resume = (f"train.resume={first}", "train.ckpt_every=1")
    second = tmp_path / "second"
    trainer = Trainer(_job(data_root, *resume), second)
    assert trainer.step == 2
    trainer.fit(until_step=4)
    # re-running the same command (a requeued job) continues the second run itself
    assert Trainer(_job(data_root, *resume), second).step == 4
    # another run's checkpoint is refused in a directory that holds a run
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(_job(data_root, f"train.resume={first}/checkpoints/step_00000002"), second)
    # going back to an older checkpoint of this run while newer ones exist is refused
    with pytest.raises(UserError, match=r"goes back to step 3.*step_00000004"):
        Trainer(_job(data_root, f"train.resume={second}/checkpoints/step_00000003"), second)


def test_metrics_are_cut_back_to_the_resumed_step(data_root, tmp_path):
    run = tmp_path / "run"
    Trainer(_job(data_root, "train.ckpt_every=2"), run).fit(until_step=3)
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # the crash came before it
    Trainer(_job(data_root, "train.ckpt_every=2"), run).fit(until_step=4)
    steps = [r["step"] for r in _rows(run) if "loss/total" in r]
    assert steps == [1, 2, 3, 4]


def test_cut_logs_keeps_whole_rows_up_to_the_step(tmp_path):
    rows = [{"step": s, "loss": 1.0} for s in (0, 1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'  # cut by a crash
    (tmp_path / "metrics.jsonl").write_text(text)
    cut_logs(tmp_path, 2)
    assert [
        json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [0, 1, 2]
    cut_logs(tmp_path, None)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_config_changes_classify_keys():
    saved = {"train": {"lr": 1e-3, "resume": "auto", "ema_decay": None}, "model": {"flavor": "a"}}
    current = {"train": {"lr": 1e-4, "resume": "never", "ema_decay": 0.9}, "model": {"flavor": "a"}}
    assert [c.key for c in config_changes(saved, current)] == ["train.ema_decay", "train.lr"]


def test_a_resumed_run_continues_its_wandb_run(data_root, tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"
    job = _job(data_root, "logging=wandb", "logging.mode=offline", "logging.progress=false")
    first = Trainer(job, run).fit(until_step=1)
    second = Trainer(job, run).fit(until_step=2)

    def run_id(folder: Path) -> str:  # offline-run-<date>_<time>-<id>[-<n> within one second]
        return re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", folder.name).group(1)

    assert run_id(first.tracker_dir) == run_id(second.tracker_dir)
    assert first.tracker_dir != second.tracker_dir
    # a fresh run in another directory gets its own id
    third = Trainer(job, tmp_path / "other").fit(until_step=1)
    assert run_id(third.tracker_dir) != run_id(first.tracker_dir)
