"""``enable_sta`` in a real diffusers ``WanImageToVideoPipeline`` run (tiny random parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_testing import (
    FRAMES,
    FULL_WINDOW,
    NEGATIVE,
    PROMPT,
    SIZE,
    TILE,
    build_dit,
    noise_of,
    plain_copy,
    step_strategy,
    student,
    wan_i2v_pipeline,
)

from stafinetune import disable_sta, enable_sta
from stafinetune.diffusion.sampling import ClassifierFreeGuidance, sample_latents
from stafinetune.models.families import WAN_TEXT_TOKENS

STEPS = 3
TIGHT = {"atol": 1e-5, "rtol": 1e-5}
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def encode(pipe: Any, prompt: str) -> torch.Tensor:
    """``prompt``'s UMT5 states (1, 512, 32), zero-padded: ``WanPipeline``'s encoding, since
    the image-to-video pipeline of diffusers 0.42 needs ``ftfy`` to clean a prompt itself."""
    from diffusers import WanPipeline

    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(pipe, prompt, max_sequence_length=WAN_TEXT_TOKENS)


def generate(pipe: Any, seed: int = 0, guidance: float = 1.0) -> torch.Tensor:
    """Latents (1, 16, 5, 16, 16) for ``PROMPT`` and ``IMAGE`` (``NEGATIVE`` under guidance)."""
    return pipe(IMAGE, prompt_embeds=encode(pipe, PROMPT),
                negative_prompt_embeds=encode(pipe, NEGATIVE), guidance_scale=guidance,
                num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type="latent").frames  # fmt: skip


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    """The dense pipeline, its output, and its encodings of the prompt and the image."""
    pipe = wan_i2v_pipeline(plain_copy(build_dit("wan_i2v_tiny", mode="full")), STEPS)
    with torch.no_grad():
        embeds = pipe.encode_image(IMAGE, torch.device("cpu"))  # (1, 17, 32)
        pixels = pipe.video_processor.preprocess(IMAGE, height=SIZE, width=SIZE)
        _, condition = pipe.prepare_latents(pixels, 1, 16, SIZE, SIZE, FRAMES, torch.float32,
                                            torch.device("cpu"))  # fmt: skip
    return {"pipe": pipe, "dense": generate(pipe), "text": encode(pipe, PROMPT),
            "negative": encode(pipe, NEGATIVE),
            "image": {"image_latents": condition[:, 4:], "image_embeds": embeds}}  # fmt: skip


def test_full_windows_equal_the_dense_pipeline(setup: dict[str, Any]) -> None:
    pipe = setup["pipe"]
    enable_sta(pipe, tile=TILE, window=FULL_WINDOW)
    try:
        torch.testing.assert_close(generate(pipe), setup["dense"], **TIGHT)
        enable_sta(pipe, tile=TILE, window=[3, 3, 3])
        assert (generate(pipe) - setup["dense"]).abs().max() > 1e-3
    finally:
        disable_sta(pipe)
    assert torch.equal(generate(pipe), setup["dense"])


@pytest.mark.parametrize("guidance", [4.0])
def test_strategy_pipeline_equals_our_sampler(
    setup: dict[str, Any], tmp_path: Path, guidance: float
) -> None:
    """The pipeline with per-step windows gives our sampler's latents: same mask channels,
    condition and image states, with and without classifier-free guidance."""
    path = tmp_path / "mask_strategy.json"
    step_strategy(STEPS).save(path)
    pipe = setup["pipe"]
    enable_sta(pipe, strategy=path)
    try:
        got = generate(pipe, seed=3, guidance=guidance)
    finally:
        disable_sta(pipe)
    text = setup["text"]
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    negative = (setup["negative"], mask, torch.zeros(1, 1))
    model = ClassifierFreeGuidance(student("wan_i2v_tiny", path), negative, guidance)
    expected = sample_latents(model, noise_of(3), text, mask, None, steps=STEPS, **setup["image"])
    torch.testing.assert_close(got, expected, **TIGHT)


@pytest.fixture(scope="module")
def a14b() -> dict[str, Any]:
    """Wan 2.2 I2V-A14B-shaped: a dense ``WanImageToVideoPipeline`` whose ``transformer`` /
    ``transformer_2`` are the tiny image-to-video experts (no image encoder: no
    ``image_dim``), its output, and its condition latents."""
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    def experts(**attention: Any) -> Any:
        torch.manual_seed(0)
        return build_model(ModelConfig(flavor="wan22_tiny_i2v_experts"),
                           AttentionConfig(backend="reference", **attention))  # fmt: skip

    dense = experts(mode="full")
    pipe = wan_i2v_pipeline(plain_copy(dense.high), STEPS, transformer_2=plain_copy(dense.low),
                            boundary_ratio=dense.boundary_ratio)  # fmt: skip
    with torch.no_grad():
        pixels = pipe.video_processor.preprocess(IMAGE, height=SIZE, width=SIZE)
        _, condition = pipe.prepare_latents(pixels, 1, 16, SIZE, SIZE, FRAMES, torch.float32,
                                            torch.device("cpu"))  # fmt: skip
    return {"pipe": pipe, "dense": generate(pipe, seed=2), "experts": experts,
            "text": encode(pipe, PROMPT), "image_latents": condition[:, 4:]}  # fmt: skip


@pytest.mark.parametrize("attention", [{"mode": "full"}, {"tile": TILE, "window": FULL_WINDOW}])
def test_two_i2v_experts_equal_the_pipeline(
    a14b: dict[str, Any], attention: dict[str, Any]
) -> None:
    """Our two-expert model (dense, full-window STA) samples the pipeline's latents from the
    condition latents alone (20 channels: mask + latents, no image states); the high-noise
    expert alone does not."""
    text = a14b["text"]
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    dit = a14b["experts"](**attention)
    assert dit.image_dims is not None and dit.image_dims.embed_dim is None
    got = sample_latents(dit, noise_of(2), text, mask, None, steps=STEPS,
                         image_latents=a14b["image_latents"])  # fmt: skip
    torch.testing.assert_close(got, a14b["dense"], **TIGHT)
    alone = sample_latents(dit.high, noise_of(2), text, mask, None, steps=STEPS,
                           image_latents=a14b["image_latents"])  # fmt: skip
    assert (alone - a14b["dense"]).abs().max() > 1e-3


def test_an_i2v_experts_export_loads_into_the_i2v_pipeline(
    a14b: dict[str, Any], tmp_path: Path
) -> None:
    """``save_pretrained`` of the experts names ``WanImageToVideoPipeline`` (no image encoder)
    with the boundary; loaded with the user's other parts, it samples the dense latents."""
    from diffusers import WanImageToVideoPipeline

    a14b["experts"](mode="full").save_pretrained(tmp_path)
    base = a14b["pipe"]
    pipe = WanImageToVideoPipeline.from_pretrained(
        tmp_path, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        scheduler=base.scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.boundary_ratio == 0.5 and pipe.image_encoder is None
    torch.testing.assert_close(generate(pipe, seed=2), a14b["dense"], **TIGHT)
