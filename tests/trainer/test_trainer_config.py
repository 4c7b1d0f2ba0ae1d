"""Config composition through Hydra's compose API and start-up validation."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from stafinetune.config import JobConfig, compose_job_config, conf_dir


def test_default_composes_into_typed_config():
    job = compose_job_config()
    assert isinstance(job, JobConfig)
    assert job.model.flavor == "wan_tiny"
    assert job.attention.mode == "sta" and job.attention.window == [3, 3, 3]
    assert job.data.source == "synthetic"
    assert job.logging.backend == "wandb"
    assert job.train.steps >= 100


@pytest.mark.parametrize(
    "group", ["model", "attention", "data", "train", "distill", "parallel", "logging", "experiment"]
)
def test_every_group_option_composes(group):
    options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    assert options, f"conf/{group} has no options"
    extra = {
        "folder": ["data.manifest=/nonexistent/clips.jsonl"],
        "hf_dataset": ["data.dataset_path=/nonexistent/ds"],
        "wan2.1_1.3b_sta": [
            "model.path=/m",
            "data.manifest=/d.jsonl",
            "data.video_encoder_path=/m/vae",
            "data.text_encoder_path=/m/te",
        ],
        "hunyuan_720p_sta": [
            "model.path=/m",
            "data.manifest=/d.jsonl",
            "data.video_encoder_path=/m/vae",
            "data.text_encoder_path=/m/te",
            "data.text_encoder_2_path=/m/te2",
        ],
        "hunyuanvideo15_720p_sta": [
            "model.path=/m",
            "data.manifest=/d.jsonl",
            "data.video_encoder_path=/m/vae",
            "data.text_encoder_path=/m/te",
            "data.tokenizer_path=/m/tok",
            "data.text_encoder_2_path=/m/te2",
            "data.tokenizer_2_path=/m/tok2",
        ],
        **{
            name: [
                "model.path=/m",
                "data.manifest=/d.jsonl",
                "data.video_encoder_path=/m/vae",
                "data.text_encoder_path=/m/te",
            ]
            for name in ("wan2.2_ti2v_5b_sta", "wan2.2_a14b_sta", "wan2.2_i2v_a14b_sta")
        },
    }
    for option in options:
        overrides = [f"{group}={option}", *extra.get(option, [])]
        if group == "attention" and option == "full":
            overrides.append("distill=none")
        if group == "model":  # flavors without weights distil from a random teacher
            overrides.append("distill.allow_random_teacher=true")
        job = compose_job_config(overrides)
        assert isinstance(job, JobConfig), option


def test_cli_overrides_reach_every_group():
    job = compose_job_config(
        [
            "train.steps=7",
            "train.lr=1e-3",
            "attention.window=[1,2,3]",
            "data.num_clips=8",
            "logging=none",
            "model.gradient_checkpointing=true",
        ]
    )
    assert (job.train.steps, job.train.lr, job.attention.window) == (7, 1e-3, [1, 2, 3])
    assert job.data.num_clips == 8 and job.logging.backend == "none"
    assert job.model.gradient_checkpointing


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=0", "train.steps"),
        ("train.schedule=linear", "train.schedule"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("attention.window=[0,1,1]", "attention.window"),
        ("attention.mode=sparse", "attention.mode"),
        ("model.flavor=gpt2", "model.flavor"),
        ("data.num_frames=16", "data.num_frames"),
        ("distill.w_out=-1", "distill.w_out"),
        ("logging.backend=tensorboard", "logging.backend"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        compose_job_config([override])


def test_type_errors_and_unknown_keys_fail_at_composition():
    with pytest.raises(ConfigCompositionException) as err:
        compose_job_config(["train.steps=many"])
    assert "train.steps" in str(err.value.__cause__ or err.value)
    with pytest.raises(ConfigCompositionException):
        compose_job_config(["train.not_a_field=1"])
    with pytest.raises(ValueError, match="data.manifest"):
        compose_job_config(["data=folder"])
    with pytest.raises(
        ValueError, match="not set: data.text_encoder_path, data.video_encoder_path, model.path"
    ):
        compose_job_config(["experiment=wan2.1_1.3b_sta", "data.manifest=/x.jsonl"])


def test_cross_group_validation():
    with pytest.raises(ValueError, match="attention.mode='full'"):
        compose_job_config(["attention=full", "distill=sta"])


def test_cli_exits_with_field_name(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stafinetune.commands.train",
            "train.steps=0",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.steps must be >= 1" in proc.stderr


def test_validation_error_type_is_a_value_error():
    # OmegaConf's own type errors are ValueErrors too, so callers can catch one type
    assert issubclass(ValidationError, ValueError)
