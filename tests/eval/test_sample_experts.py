"""The sample command's library half on a Wan 2.2 two-expert export: both experts, each with
its own windows, switched at the boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_testing import LATENT_SHAPE

from sta_kernels import density
from stafinetune.data import DataConfig, build_text_encoder
from stafinetune.diffusion.sampling import sample_latents
from stafinetune.inference.generate import SampleConfig, prompt_noise, sample_model
from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, build_model
from stafinetune.models.experts import ExpertDiT

TILE = [1, 2, 2]
MODEL = ModelConfig(flavor="wan22_tiny_experts")  # boundary 500: steps at 1000, 750, 500 high


def test_a_two_expert_export_samples_with_each_experts_windows(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = build_model(MODEL, AttentionConfig(tile=TILE, window=[3, 3, 3]))
    assert isinstance(trained, ExpertDiT)
    trained.low.set_attention(AttentionConfig(tile=TILE, window=[1, 1, 1]))
    export = tmp_path / "export"
    trained.save_pretrained(export)
    for name, expert in (
        ("mask_strategy.json", trained.high),
        ("mask_strategy_2.json", trained.low),
    ):
        MaskStrategy.from_plan(expert.plan, canvas=[5, 8, 8], tile=TILE).save(export / name)
    prompts = ["a red circle moving left"]
    sample = SampleConfig(steps=4, device="cpu", precision="fp32", warmup=False, seed=3)
    videos, settings = sample_model(
        MODEL, AttentionConfig(backend="reference"), DataConfig(), sample, prompts,
        tmp_path / "out", checkpoint=str(export), progress=False,
    )  # fmt: skip
    high, low = (float(density((5, 8, 8), tuple(TILE), w)) for w in ([3, 3, 3], [1, 1, 1]))
    assert settings["video_density"] == pytest.approx((3 * high + low) / 4)
    assert (
        json.loads((tmp_path / "out" / "samples.json").read_text())["video_density"]
        == (settings["video_density"])
    )
    text, mask, pooled = build_text_encoder(DataConfig()).encode(prompts)
    trained.low.attention = trained.high.attention  # as the loaded model shares it
    expected = sample_latents(trained, prompt_noise(LATENT_SHAPE, 3), text, mask, pooled, steps=4)
    torch.testing.assert_close(videos[0].latents, expected[0], atol=1e-5, rtol=1e-5)


def test_guidance_scale_2_is_for_two_expert_models() -> None:
    from stafinetune.inference.generate import expert_guidance

    negative = (torch.zeros(1, 4, 32), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 32))
    with pytest.raises(ValueError, match="sample.guidance_scale_2 is the low-noise expert's"):
        expert_guidance(build_model(ModelConfig(flavor="wan_tiny"), AttentionConfig()), negative,
                        2.0, 3.0)  # fmt: skip
    with pytest.raises(ValueError, match="sample.guidance_scale_2 must be >= 0 or null"):
        SampleConfig(guidance_scale_2=-1.0)
