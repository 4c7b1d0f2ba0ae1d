"""User errors end the commands with one line and exit code 2, no traceback; bugs keep theirs.

The commands run in-process (``main()`` with ``sys.argv``), which is what the console
scripts do, without paying a Python start-up per case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_testing import run_command

from stafinetune.commands import preprocess, train


def _bad_manifest(tmp_path: Path) -> Path:
    """A manifest whose only clip does not exist: every record is skipped."""
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"path": "missing.mp4", "caption": "a clip"}) + "\n")
    return manifest


def _user_errors(tmp_path: Path) -> list[tuple[list[str], str]]:
    cases = [
        (["model.path=/nonexistent/model"], "error: model.path='/nonexistent/model' holds no"),
        (
            ["data=folder", "data.manifest=/nonexistent/clips.jsonl"],
            "error: data.manifest: no such",
        ),
        (
            ["train.trainable=nothing_matches"],
            "error: train.trainable='nothing_matches' matches no",
        ),
        (
            ["data=folder", f"data.manifest={_bad_manifest(tmp_path)}"],
            "error: data: the prepared data holds no usable sample",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append((["train.device=cuda"], "error: train.device=cuda but no CUDA device"))
    return cases


def test_user_errors_are_one_line_with_exit_code_2(tmp_path, base, capsys, monkeypatch):
    monkeypatch.delenv("STAFINETUNE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for k, (overrides, message) in enumerate(_user_errors(tmp_path)):
        args = [*base, f"hydra.run.dir={tmp_path / f'run{k}'}", *overrides]
        code, _, err = run_command(train.main, *args, capsys=capsys)
        assert code == 2, (overrides, err)
        assert "Traceback" not in err, err
        # the data pipeline's progress bar may come first
        lines = [line for line in err.splitlines() if line.strip() and "[data]" not in line]
        assert len(lines) == 1 and lines[0].startswith(message), (message, err)
        # the rank's log file holds the message too
        assert message in (tmp_path / f"run{k}" / "train_rank0.log").read_text()


def test_debug_switch_shows_the_traceback(tmp_path, base, capsys, monkeypatch):
    monkeypatch.setenv("STAFINETUNE_DEBUG", "1")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, _, err = run_command(train.main, *base, "train.trainable=nothing_matches", capsys=capsys)
    assert code == 1 and "Traceback" in err and "UserError" in err


def test_a_bug_keeps_its_traceback(tmp_path, base, capsys, monkeypatch):
    monkeypatch.delenv("STAFINETUNE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(train, "Trainer", broken)
    code, _, err = run_command(train.main, *base, capsys=capsys)
    assert code == 1 and "Traceback" in err and "an internal bug" in err
    assert "ValueError: an internal bug" in (tmp_path / "run" / "train_rank0.log").read_text()


def test_hydra_composition_errors_exit_2(tmp_path, base, capsys):
    code, _, err = run_command(train.main, *base, "train.steps=many", capsys=capsys)
    assert code == 2 and "train.steps" in err


def test_preprocess_config_errors_are_one_line(tmp_path, base, capsys):
    # a geometry the model cannot patch is refused before anything is encoded
    code, _, err = run_command(preprocess.main, *base, "data.height=136", capsys=capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: data bucket [17, 136, 128]") and "cannot patch" in err
    assert not (tmp_path / "data").exists()


def test_preprocess_refuses_an_empty_manifest(tmp_path, base, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [*base, "data=folder", f"data.manifest={empty}"]
    code, _, err = run_command(preprocess.main, *args, capsys=capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"data.manifest={empty} holds no records" in err
    # a manifest whose every record is bad: exit 2 too, pointing at the report
    args = [*base, "data=folder", f"data.manifest={_bad_manifest(tmp_path)}"]
    code, _, err = run_command(preprocess.main, *args, capsys=capsys)
    assert code == 2 and "kept 0 of 1 records" in err and "bad_inputs.jsonl" in err


def test_unknown_keys_in_structured_groups_name_the_key(tmp_path, base, capsys):
    from stafinetune.config import compose_job_config

    with pytest.raises(ValueError, match=r"unknown config key train\.stepz.*train\.steps\?"):
        compose_job_config(["+train.stepz=10"])
    with pytest.raises(ValueError, match=r"unknown config key data\.extra"):
        compose_job_config(["+data.extra=1"])
    # free-form dicts still take new keys
    job = compose_job_config(
        ["model=wan_tiny", "distill=none", "+model.config_overrides.num_layers=4"]
    )
    assert job.model.config_overrides == {"num_layers": 4}
    code, _, err = run_command(train.main, *base, "+train.stepz=10", capsys=capsys)
    assert code == 2 and err.startswith("config error: unknown config key train.stepz"), err


def test_distillation_refuses_a_random_teacher_unless_allowed():
    from stafinetune.config import compose_job_config

    message = r"model.path.*distill.teacher_path.*random.*distill.allow_random_teacher=true"
    with pytest.raises(ValueError, match=message):
        compose_job_config(["model=hunyuan_tiny"])
    assert compose_job_config(["model=hunyuan_tiny", "distill.allow_random_teacher=true"])
    assert compose_job_config(["model=hunyuan_tiny", "distill=none"])  # no teacher needed
    assert compose_job_config(["model=wan_tiny", "distill.teacher_path=/weights/teacher"])


def test_flex_backend_cannot_train_on_the_cpu(tmp_path):
    from stafinetune.build import check_attention_backend
    from stafinetune.config import compose_job_config
    from stafinetune.errors import UserError
    from stafinetune.models import AttentionConfig
    from stafinetune.training.trainer import Trainer

    flex = AttentionConfig(backend="flex")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="attention.backend=flex cannot train on the CPU"):
        check_attention_backend(flex, cpu, training=True)
    check_attention_backend(flex, cpu, training=False)  # inference runs (no backward)
    check_attention_backend(AttentionConfig(mode="full", backend="flex"), cpu, training=True)
    job = compose_job_config(
        [f"data.root={tmp_path / 'data'}", "attention.backend=flex", "train.device=cpu"]
    )
    with pytest.raises(UserError, match="attention.backend=flex"):
        Trainer(job, tmp_path / "run")
    assert not (tmp_path / "data").exists()  # refused before any data work


def test_rank_log_holds_the_header_summary_and_hydra_files_follow_the_run_dir(
    tmp_path, base, capsys
):
    # run_dir= names another folder than Hydra's: the rank's Hydra files move there
    run, hydra_dir = tmp_path / "shared", tmp_path / "hydra_own"
    args = [*base, f"hydra.run.dir={hydra_dir}", f"run_dir={run}", "train.steps=1"]
    code, out, err = run_command(train.main, *args, capsys=capsys)
    assert code == 0, err
    assert "student " in out and "run directory" in out
    log = (run / "train_rank0.log").read_text()
    assert "student " in log and f"run directory     {run}" in log
    assert (run / ".hydra" / "rank0" / "config.yaml").is_file()
    assert not hydra_dir.exists()


def test_a_nan_stop_is_one_line_naming_the_checkpoint(tmp_path, base, capsys, monkeypatch):
    from stafinetune.training.distill import DistillStep

    real = DistillStep.losses

    def poisoned(self, module, model, *args, **kwargs):
        terms = real(self, module, model, *args, **kwargs)
        if model.training:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(DistillStep, "losses", poisoned)
    code, _, err = run_command(train.main, *base, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip() and "[data]" not in line]
    assert code == 2 and len(lines) == 1, err
    assert "non-finite loss at step 1" in lines[0] and "step_00000000" in lines[0]


def test_training_checks_the_data_geometry_before_encoding(tmp_path):
    from stafinetune.config import compose_job_config
    from stafinetune.errors import UserError
    from stafinetune.training.trainer import Trainer

    job = compose_job_config([f"data.root={tmp_path / 'data'}", "data.height=136",
                              "train.device=cpu", "logging=none"])  # fmt: skip
    with pytest.raises(UserError, match=r"data bucket \[17, 136, 128\].*cannot patch"):
        Trainer(job, tmp_path / "run")
    assert not (tmp_path / "data").exists()


def test_the_deepspeed_launchers_local_rank_argument_reaches_no_hydra_error(base, capsys):
    # the launcher appends --local_rank=N; Hydra would reject it as an unknown argument
    code, _, err = run_command(train.main, "--local_rank=0", *base, "train.steps=0", capsys=capsys)
    assert code == 2 and err.startswith("config error: train.steps must be >= 1"), err
