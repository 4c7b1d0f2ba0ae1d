"""Wan 2.2 I2V-A14B-style training on the CPU (``experiment=i2v_experts_tiny``): two
image-to-video experts conditioned on the clips' condition latents alone
(``data.image_encoder=latents``, no image states); ``model.expert=both`` resumes exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stafinetune.config import JobConfig
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.trainer import Trainer

EXPERTS = ("experiment=i2v_experts_tiny", "train.batch_size=2", "train.warmup_steps=1")


@pytest.fixture()
def job(tiny_job: Callable[..., JobConfig]) -> Callable[..., JobConfig]:
    """A CPU job of the tiny image-to-video experts on the session's clips."""
    return lambda *overrides: tiny_job(*EXPERTS, *overrides)


def test_both_i2v_experts_distil_and_resume_exactly(
    job: Callable[..., JobConfig], tmp_path: Path
) -> None:
    overrides = ("distill=sta", "distill.allow_random_teacher=true", "model.expert=both",
                 "train.steps=3", "train.ckpt_every=0")  # fmt: skip
    trainer = Trainer(job(*overrides, "train.export=true"), tmp_path / "straight")
    batch = trainer.data.val_batches[0]
    assert batch["image_latents"].shape == (2, 16, 5, 16, 16) and "image_embeds" not in batch
    straight = trainer.fit()
    index = json.loads((straight.export_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["boundary_ratio"] == 0.5
    first = Trainer(job(*overrides), tmp_path / "resumed").fit(until_step=1)
    assert first.step == 1
    second = Trainer(job(*overrides), tmp_path / "resumed").fit()
    assert second.losses == straight.losses[1:]
    a, b = (
        load_file(str(ckpt.latest_checkpoint(tmp_path / run / "checkpoints") / "model.safetensors"))
        for run in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for expert in ("high", "low"):  # 36 input channels in each expert
        assert a[f"experts.{expert}.transformer.patch_embedding.weight"].shape[1] == 36


def test_the_image_encoder_must_fit_the_image_states(
    job: Callable[..., JobConfig], tmp_path: Path
) -> None:
    """Start-up names ``data.image_encoder``: the experts take no image states, Wan 2.1 I2V
    takes them."""
    with pytest.raises(ValueError, match="no image states .* set data.image_encoder=latents"):
        Trainer(job("data.image_encoder=tiny"), tmp_path / "a")
    with pytest.raises(ValueError, match="width 32: set data.image_encoder=tiny, clip or siglip"):
        Trainer(job("model=wan_i2v_tiny"), tmp_path / "b")
    with pytest.raises(ValueError, match="must be null or one of"):
        job("data.image_encoder=states")


def test_sample_images_give_condition_latents_alone(
    job: Callable[..., JobConfig], tmp_path: Path
) -> None:
    """``sample.images`` for the experts: the latents of [image, black frames], no states."""
    from stafinetune.data.encoders import build_video_encoder, condition_video
    from stafinetune.inference.generate import SampleConfig, image_conditions, load_image
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    data = job().data
    path = tmp_path / "frame.png"
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    dit = build_model(ModelConfig(flavor="wan22_tiny_i2v_experts"), AttentionConfig(mode="full"))
    encoder = build_video_encoder(data)
    (condition,) = image_conditions(SampleConfig(images=[str(path)], prompts=["a cat"]), data,
                                    ["a cat"], dit, encoder)  # fmt: skip
    video = load_image(str(path), 128, 128)[None, :, None].expand(-1, -1, 17, -1, -1)
    assert condition["image_embeds"] is None
    expected = encoder.encode(condition_video(video))  # (1, 16, 5, 16, 16)
    torch.testing.assert_close(condition["image_latents"], expected, atol=0, rtol=0)
