"""Sampling and comparing an image-to-video model: an image per prompt (``sample.images``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from stafinetune.commands import eval as eval_command
from stafinetune.config import conf_dir, to_job_config
from stafinetune.data import DataConfig, build_text_encoder
from stafinetune.data.encoders import (
    build_image_encoder,
    build_video_encoder,
    encode_image_condition,
)
from stafinetune.diffusion.sampling import Schedule, sample_latents
from stafinetune.errors import UserError
from stafinetune.inference.generate import (
    SampleConfig,
    load_image,
    prompt_noise,
    sample_model,
)
from stafinetune.inference.weights import Weights, load_model
from stafinetune.models import AttentionConfig, ModelConfig

PROMPTS = ["a red circle moving right", "a blue square moving up"]
MODEL = ModelConfig(flavor="wan_i2v_tiny")
ATTENTION = AttentionConfig(mode="sta", backend="reference", window=[3, 3, 3])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A prompts file, two images (a PNG of another size, a JPEG) and the i2v data config."""
    root = tmp_path_factory.mktemp("i2v_sample")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(root / "b.jpg")
    data = DataConfig(root=str(root / "data"), image_encoder="tiny")
    return {"root": root, "data": data, "images": [str(root / "a.png"), str(root / "b.jpg")]}


def _sample(inputs: dict, out: Path, **values) -> list:
    cfg = SampleConfig(prompts=str(inputs["root"] / "prompts.txt"), steps=2, warmup=False,
                       device="cpu", **values)  # fmt: skip
    videos, _ = sample_model(MODEL, ATTENTION, inputs["data"], cfg, PROMPTS, out,
                                    checkpoint=None, progress=False)  # fmt: skip
    return videos


def test_each_prompt_is_sampled_from_its_image(inputs: dict, tmp_path: Path) -> None:
    videos = _sample(inputs, tmp_path / "a", images=inputs["images"], seed=4)
    samples = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert (
        samples["images"] == inputs["images"]
        and len(list((tmp_path / "a" / "videos").iterdir())) == 2
    )
    # prompt 1 equals the sampler given its image's condition directly (same model and noise)
    data = inputs["data"]
    dit = load_model(MODEL, ATTENTION, Weights("base"), steps=2, device=torch.device("cpu"),
                     dtype=torch.float32, seed=4)  # fmt: skip
    frame = load_image(inputs["images"][1], 128, 128)  # (3, H, W)
    assert (
        frame.shape == (3, 128, 128)
        and load_image(inputs["images"][0], 128, 128).shape == frame.shape
    )
    video = frame[None, :, None].expand(-1, -1, 17, -1, -1)
    latents, embeds = encode_image_condition(
        build_video_encoder(data), build_image_encoder(data), video
    )
    text, mask, pooled = build_text_encoder(data).encode(PROMPTS[1:])
    expected = sample_latents(dit, prompt_noise((16, 5, 16, 16), 5), text, mask, pooled,
                              schedule=Schedule.flow(2), image_latents=latents, image_embeds=embeds)  # fmt: skip
    torch.testing.assert_close(videos[1].latents, expected[0], atol=1e-5, rtol=1e-5)
    # one image serves every prompt: prompt 0 now starts from the other image
    shared = _sample(inputs, tmp_path / "b", images=inputs["images"][1:], seed=4)
    assert torch.equal(shared[1].latents, videos[1].latents)
    assert not torch.allclose(shared[0].latents, videos[0].latents)


def test_missing_or_stray_images_name_the_field(inputs: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sample.images must list an image per prompt"):
        _sample(inputs, tmp_path / "a")
    plain = {**inputs, "data": DataConfig(root=inputs["data"].root)}
    with pytest.raises(UserError, match="data.image_encoder must be set"):
        _sample(plain, tmp_path / "e", images=inputs["images"])
    with pytest.raises(UserError, match="sample.images lists 3 images for 2 prompts"):
        _sample(inputs, tmp_path / "b", images=[*inputs["images"], inputs["images"][0]])
    with pytest.raises(UserError, match="no such file"):
        _sample(inputs, tmp_path / "c", images=[str(tmp_path / "none.png")])
    wide = {
        **inputs,
        "data": DataConfig(root=inputs["data"].root, image_encoder="tiny", image_dim=48),
    }
    with pytest.raises(UserError, match="image states of width 48 but the model takes 32"):
        _sample(wide, tmp_path / "d", images=inputs["images"])


@pytest.mark.parametrize("model", ["wan_i2v_tiny", "hunyuanvideo15_i2v_tiny"])
def test_eval_compares_dense_and_sta_from_the_same_images(
    inputs: dict, tmp_path: Path, model: str
) -> None:
    prompt = tmp_path / "one_prompt.txt"
    prompt.write_text(PROMPTS[0] + "\n")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        job = to_job_config(compose(config_name="eval", overrides=[
            f"model={model}", "data.image_encoder=tiny", f"data.root={inputs['root'] / 'data'}",
            f"sample.prompts={prompt}", f"sample.images=[{inputs['images'][0]}]",
            "sample.steps=2", "sample.device=cpu", "sample.warmup=false", "logging.progress=false",
            "attention.backend=reference", "attention.dense_first_steps=0",
        ]))  # fmt: skip
    eval_command.run(job, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    dense, sta = report["models"]["dense"], report["models"]["sta"]
    assert dense["settings"]["images"] == sta["settings"]["images"] == inputs["images"][:1]
    assert dense["mean"]["latent_gap"] == 0.0 and sta["mean"]["latent_gap"] > 0


def _sample_each_image(
    inputs: dict, model: ModelConfig, data: DataConfig, out: Path
) -> tuple[SampleConfig, list, Any]:
    """``sample_model`` of ``PROMPTS`` from one image each (seed 4, 2 steps): its config, its
    videos and the same model loaded for sampling by hand."""
    cfg = SampleConfig(prompts=str(inputs["root"] / "prompts.txt"), steps=2, warmup=False,
                       device="cpu", images=inputs["images"], seed=4)  # fmt: skip
    videos, _ = sample_model(model, ATTENTION, data, cfg, PROMPTS, out, checkpoint=None,
                             progress=False)  # fmt: skip
    dit = load_model(model, ATTENTION, Weights("base"), steps=2, device=torch.device("cpu"),
                     dtype=torch.float32, seed=4)  # fmt: skip
    return cfg, videos, dit


def test_hunyuanvideo15_i2v_samples_each_prompt_from_its_image(
    inputs: dict, tmp_path: Path
) -> None:
    """HunyuanVideo 1.5 image-to-video: a prompt's video is the sampler's given its image's
    condition (first latent frame and image states); the states matter; the text-to-video
    sibling refuses images."""
    model = ModelConfig(flavor="hunyuanvideo15_i2v_tiny")
    data = inputs["data"]
    cfg, videos, dit = _sample_each_image(inputs, model, data, tmp_path / "a")
    video = load_image(inputs["images"][1], 128, 128)[None, :, None].expand(-1, -1, 17, -1, -1)
    latents, embeds = encode_image_condition(
        build_video_encoder(data), build_image_encoder(data), video
    )
    text, mask, _ = build_text_encoder(data).encode(PROMPTS[1:])
    run = lambda e: sample_latents(dit, prompt_noise((16, 5, 16, 16), 5), text, mask,  # noqa: E731
                                   schedule=Schedule.flow(2), image_latents=latents,
                                   image_embeds=e)  # fmt: skip
    expected = run(embeds)
    torch.testing.assert_close(videos[1].latents, expected[0], atol=1e-5, rtol=1e-5)
    assert (run(-embeds) - expected).abs().max() > 1e-4
    with pytest.raises(UserError, match="text-to-video"):
        sample_model(ModelConfig(flavor="hunyuanvideo15_tiny"), ATTENTION, data, cfg, PROMPTS,
                     tmp_path / "b", checkpoint=None, progress=False)  # fmt: skip


def test_ti2v_samples_start_from_the_image_latent(inputs: dict, tmp_path: Path) -> None:
    """Wan 2.2 TI2V's image-to-video mode (``model.image_to_video``, ``data.image_encoder=vae``):
    each video's first latent frame is its image's latent alone, the rest is sampled."""
    model = ModelConfig(flavor="wan22_tiny_ti2v", image_to_video=True)
    data = DataConfig(root=inputs["data"].root, image_encoder="vae", latent_channels=48)
    cfg, videos, dit = _sample_each_image(inputs, model, data, tmp_path / "a")
    frame = load_image(inputs["images"][1], 128, 128)[None, :, None]  # (1, 3, 1, H, W)
    video = frame.expand(-1, -1, 17, -1, -1)  # (1, 3, F, H, W)
    first, embeds = encode_image_condition(build_video_encoder(data), None, video, first_frame=True)
    assert first.shape == (1, 48, 1, 16, 16) and embeds is None
    text, mask, _ = build_text_encoder(data).encode(PROMPTS[1:])
    expected = sample_latents(dit, prompt_noise((48, 5, 16, 16), 5), text, mask,
                              schedule=Schedule.flow(2), image_latents=first)  # fmt: skip
    torch.testing.assert_close(videos[1].latents, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(videos[1].latents[:, :1], first[0], atol=0, rtol=0)
    clip = DataConfig(root=inputs["data"].root, image_encoder="tiny", latent_channels=48)
    with pytest.raises(UserError, match="model.image_to_video .* takes data.image_encoder=vae"):
        sample_model(model, ATTENTION, clip, cfg, PROMPTS, tmp_path / "b", checkpoint=None,
                     progress=False)  # fmt: skip
