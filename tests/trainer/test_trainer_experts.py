"""Wan 2.2 two-expert training: each expert's noise range and teacher, ``model.expert=both``
resuming exactly, and the export of both experts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stafinetune.config import DistillConfig, JobConfig
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.experts import ExpertDiT
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.distill import draw_noise
from stafinetune.training.trainer import Trainer

EXPERTS = ("model=wan22_tiny_experts", "distill.allow_random_teacher=true", "distill.w_out=1.0",
           "distill.w_attn=1.0")  # fmt: skip


def test_noise_levels_stay_in_the_expert_range() -> None:
    cfg = DistillConfig(timestep_sampling="logit_normal", timestep_shift=3.0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(64, 1, 1, 1, 1)
    _, high = draw_noise(x0, cfg, gen, sigma_range=(0.875, 1.0))
    _, low = draw_noise(x0, cfg, gen, sigma_range=(0.0, 0.875))
    assert high.min() >= 0.875 and low.max() <= 0.875
    # ``both``: every micro-batch on one side, each side drawn as often as its noise mass
    sides = [
        bool(draw_noise(x0[:4], cfg, gen, boundary=0.875)[1].ge(0.875).all()) for _ in range(400)
    ]
    full = draw_noise(torch.zeros(20000, 1, 1, 1, 1), cfg, gen)[1]
    assert abs(sum(sides) / 400 - float(full.ge(0.875).float().mean())) < 0.06
    for _ in range(20):
        sigma = draw_noise(x0[:4], cfg, gen, boundary=0.875)[1]
        assert bool(sigma.ge(0.875).all()) or bool(sigma.lt(0.875).all())


def test_both_experts_resume_exactly(tiny_job: Callable[..., JobConfig], tmp_path: Path) -> None:
    overrides = (*EXPERTS, "train.steps=3", "train.ckpt_every=0", "train.ema_decay=0.9",
                 "train.grad_accum=2", "train.batch_size=2")  # fmt: skip
    straight = Trainer(tiny_job(*overrides), tmp_path / "straight").fit()
    first = Trainer(tiny_job(*overrides), tmp_path / "resumed").fit(until_step=1)
    assert first.step == 1
    second = Trainer(tiny_job(*overrides), tmp_path / "resumed").fit()
    assert second.losses == straight.losses[1:]
    a, b = (ckpt.latest_checkpoint(tmp_path / r / "checkpoints") for r in ("straight", "resumed"))
    for name in ("model", "ema"):
        sa, sb = (
            load_file(str(a / f"{name}.safetensors")),
            load_file(str(b / f"{name}.safetensors")),
        )
        assert sa.keys() == sb.keys() and any(k.startswith("experts.low.") for k in sa)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # both experts trained (one per micro-batch, each as often as its noise mass)
    for expert in ("high", "low"):
        key = f"experts.{expert}.transformer.blocks.0.attn1.to_q.weight"
        assert not torch.equal(sa[key], _initial(key))


def _initial(key: str) -> torch.Tensor:
    """The seed-0 initial weight ``key`` of the tiny experts (the trainer's ``train.seed``)."""
    torch.manual_seed(0)
    return build_model(ModelConfig(flavor="wan22_tiny_experts"), AttentionConfig()).state_dict()[
        key
    ]


def test_one_expert_trains_on_its_range_from_its_folder(
    tiny_job: Callable[..., JobConfig], tmp_path: Path
) -> None:
    """``model.expert=low`` loads ``transformer_2/`` as the student and as the dense teacher,
    draws levels below the boundary, and exports ``transformer_2/`` beside the base model's
    untouched ``transformer/`` as a WanPipeline folder."""
    torch.manual_seed(5)
    base = build_model(ModelConfig(flavor="wan22_tiny_experts"), AttentionConfig())
    assert isinstance(base, ExpertDiT)
    base.save_pretrained(tmp_path / "base")
    job = tiny_job(*EXPERTS, f"model.path={tmp_path / 'base'}", "model.expert=low",
                   "train.steps=1", "train.export=true")  # fmt: skip
    trainer = Trainer(job, tmp_path / "run")
    low = base.low.state_dict()
    for model in (trainer.student, trainer.teacher):
        assert all(torch.equal(v, low[k]) for k, v in model.state_dict().items())
    assert trainer.distill.sigma_range == (0.0, 0.5)
    result = trainer.fit()
    export = result.export_dir
    assert sorted(p.name for p in export.iterdir()) == [
        "mask_strategy_2.json", "model_index.json", "stafinetune.json", "transformer",
        "transformer_2",
    ]  # fmt: skip
    loaded = build_model(ModelConfig(flavor="wan22_tiny_experts", path=str(export)),
                         AttentionConfig())  # fmt: skip
    trained = load_file(str(result.last_checkpoint / "model.safetensors"))
    assert all(torch.equal(v, trained[k]) for k, v in loaded.low.state_dict().items())
    assert all(
        torch.equal(v, base.high.state_dict()[k]) for k, v in loaded.high.state_dict().items()
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("parallel=fsdp2",), "model.expert=both .* supports parallel.strategy=ddp"),
        (("train.trainable=lora",), "neither train.trainable=lora nor model.compile=true"),
        (("distill=dmd2",), "supports distill.method=per_step"),
        (
            ("model.expert=low", "train.trainable=lora", "train.lora_merge_export=true"),
            "load_into_transformer_2=True",
        ),
        (
            ("model.expert=high", "model.boundary_ratio=0"),
            r"model.boundary_ratio must lie in \(0, 1\)",
        ),
    ],
)
def test_expert_options_are_checked_at_start_up(overrides: tuple[str, ...], message: str) -> None:
    from stafinetune.config import compose_job_config

    with pytest.raises(ValueError, match=message):
        compose_job_config([*EXPERTS, *overrides])


def test_both_experts_train_under_sequence_parallelism() -> None:
    # accepted at start-up; tests/parallel/sp_check.py checks its parity with one process
    from stafinetune.config import compose_job_config

    job = compose_job_config([*EXPERTS, "parallel.sp=2"])
    assert (job.model.expert, job.parallel.strategy, job.parallel.sp) == ("both", "ddp", 2)


def test_ti2v_data_geometry_follows_the_16x_vae() -> None:
    """``data.video_encoder=wan2.2`` (TI2V-5B's VAE): 121 frames of 704x1280 -> latents
    31x44x80 -> the published 720p canvas 31x22x40; sizes must be multiples of 16."""
    from stafinetune.data import DataConfig
    from stafinetune.models.dit import token_canvas

    data = DataConfig(source="folder", manifest="/clips.jsonl", video_encoder="wan2.2",
                      video_encoder_path="/vae", num_frames=121, height=704, width=1280)  # fmt: skip
    assert data.latent_grids() == [(31, 44, 80)]
    assert token_canvas(data.latent_grids()[0], (1, 2, 2)) == (31, 22, 40)
    with pytest.raises(ValueError, match="is not a multiple of 16"):
        DataConfig(video_encoder="wan2.2", video_encoder_path="/vae", height=488, width=832)
