"""Bad input that used to end in a traceback (Hydra's own reports, a run directory that
cannot be created, a parallel layout that does not fit the launch, a strategy file nested
too deep, damaged weights) ends every command with one line and exit code 2; a config that
is rejected leaves no run directory behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from cli_testing import error_lines, run_command

from stafinetune.commands import sample, train
from stafinetune.commands.cli import hydra_error_line
from stafinetune.config import asset_path


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAFINETUNE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("train.stepz=10", "config error: unknown config key train.stepz (no such field in "
                           "TrainConfig; did you mean train.steps?)"),
        ("+train.stepz=10", "config error: unknown config key train.stepz (no such field in "
                            "TrainConfig; did you mean train.steps?)"),
        ("train.steps=abc", "config error: train.steps=abc: Value 'abc' of type 'str' could "
                            "not be converted to Integer"),
        ("model=nope", "config error: In 'config': Could not find 'model/nope' (options: "),
        ("train.steps=[", "config error: cannot parse the override 'train.steps=['"),
        ("train.steps=0", "config error: train.steps must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line_and_leave_no_run_directory(
    tmp_path, base, capsys, override, line
):
    code, out, err = run_command(train.main, *base, override, capsys=capsys)
    assert code == 2 and error_lines(err) == [error_lines(err)[0]], err
    assert error_lines(err)[0].startswith(line), err
    assert not (tmp_path / "run").exists()


def test_a_rank_of_several_leaves_the_shared_folders_to_the_launcher(
    tmp_path, base, capsys, monkeypatch
):
    """Under torchrun the other ranks create their files in the same folders at the same
    moment: a rejecting rank removes only its own files (the launch script prunes the
    folders once every rank has ended)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_command(train.main, *base, "train.steps=0", capsys=capsys)
    assert code == 2, err
    assert (tmp_path / "run").is_dir()
    assert [p for p in (tmp_path / "run").rglob("*") if p.is_file()] == []


def test_a_rejected_config_keeps_a_directory_that_held_a_run(tmp_path, base, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    code, _, err = run_command(train.main, *base, "train.steps=0", capsys=capsys)
    assert code == 2 and (run / "metrics.jsonl").is_file()


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path, base, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_command(train.main, *base, f"hydra.run.dir={blocker / 'run'}",
                               capsys=capsys)  # fmt: skip
    assert code == 2 and len(error_lines(err)) == 1, err
    assert err.startswith(f"error: cannot create or write the run directory {blocker / 'run'}")


def test_unwritable_run_directories_read_as_one_line():
    # what Hydra raises for a read-only folder: the mkdir's error, or logging's wrapping of
    # the log file's
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/run")
    assert hydra_error_line(denied) == (
        "error: cannot create or write the run directory /ro/run: Permission denied "
        "(hydra.run.dir must name a writable folder)"
    )
    wrapped = ValueError("Unable to configure handler 'file'")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/ro/run/x.log")
    assert "/ro/run/x.log: Permission denied" in hydra_error_line(wrapped)
    assert hydra_error_line(KeyError("a bug")) is None  # keeps its traceback


def test_a_sequence_parallel_degree_the_launch_cannot_hold_is_one_line(tmp_path, base, capsys):
    code, _, err = run_command(train.main, *base, "parallel.sp=3", capsys=capsys)
    assert code == 2 and "Traceback" not in err, err
    assert error_lines(err) == [
        "error: parallel.sp=3 must divide the number of launched processes (1); launch a "
        "multiple of 3 processes (launch/torchrun.sh 3 ...)"
    ]


@pytest.fixture()
def sample_args(tmp_path: Path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moves right\n")
    return [f"hydra.run.dir={tmp_path / 'sample'}", f"sample.prompts={prompts}",
            "sample.steps=1", "sample.device=cpu", "sample.warmup=false",
            "logging.progress=false"]  # fmt: skip


def test_a_strategy_nested_too_deep_is_one_line(tmp_path, sample_args, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_command(sample.main, *sample_args, f"attention.strategy_path={deep}",
                               capsys=capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err, err
    assert error_lines(err) == [f"error: {deep} is nested too deeply to be read as JSON"]


def test_damaged_safetensors_in_an_export_are_one_line(tmp_path, sample_args, capsys):
    export = tmp_path / "export"
    shutil.copytree(asset_path("wan_tiny_teacher"), export / "transformer")
    weights = export / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 4  # overlaps the next tensor
    blob = json.dumps(header).encode()
    weights.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + length :])
    code, _, err = run_command(sample.main, *sample_args, f"sample.checkpoint={export}",
                               "attention=full", capsys=capsys)  # fmt: skip
    assert code == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith(f"error: model.path='{export / 'transformer'}': ")
    assert "diffusion_pytorch_model.safetensors" in line
