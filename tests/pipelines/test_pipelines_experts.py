"""Wan 2.2 two-expert sampling: our ``ExpertDiT`` against diffusers' ``WanPipeline`` with
``transformer_2`` and ``boundary_ratio`` (dense, full-window STA, per-expert windows), and a
two-expert export loading back into that pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_testing import (
    FULL_WINDOW,
    TILE,
    conditioning,
    generate,
    noise_of,
    plain_copy,
    step_strategy,
    wan_pipeline,
)

from stafinetune import enable_sta
from stafinetune.diffusion.sampling import sample_latents
from stafinetune.inference.weights import Weights, load_model
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.experts import ExpertDiT

STEPS = 4
BOUNDARY = 0.6  # timesteps 1000, 750 on the high-noise expert; 500, 250 on the low-noise one
TIGHT = {"atol": 1e-5, "rtol": 1e-5}
MODEL = ModelConfig(flavor="wan22_tiny_experts", boundary_ratio=BOUNDARY)


def experts(**attention: Any) -> ExpertDiT:
    """The tiny two-expert model with seed-0 weights (high expert built first)."""
    torch.manual_seed(0)
    dit = build_model(MODEL, AttentionConfig(backend="reference", **attention))
    assert isinstance(dit, ExpertDiT)
    return dit


@pytest.fixture(scope="module")
def pipe_and_cond() -> tuple[Any, dict[str, Any]]:
    """A dense ``WanPipeline`` whose ``transformer`` / ``transformer_2`` are the experts."""
    dense = experts(mode="full")
    pipe = wan_pipeline(plain_copy(dense.high), STEPS, transformer_2=plain_copy(dense.low),
                        boundary_ratio=BOUNDARY)  # fmt: skip
    return pipe, conditioning(pipe)


def ours(dit: ExpertDiT, cond: dict[str, Any], seed: int) -> torch.Tensor:
    return sample_latents(dit, noise_of(seed), cond["text"], cond["text_mask"], steps=STEPS)


@pytest.mark.parametrize("attention", [{"mode": "full"}, {"tile": TILE, "window": FULL_WINDOW}])
def test_experts_switch_at_the_boundary_as_diffusers(
    pipe_and_cond: tuple[Any, dict[str, Any]], attention: dict[str, Any]
) -> None:
    pipe, cond = pipe_and_cond
    expected = generate(pipe, STEPS, seed=3)
    torch.testing.assert_close(ours(experts(**attention), cond, 3), expected, **TIGHT)
    # the switch matters: the high-noise expert alone samples something else
    alone = sample_latents(experts(mode="full").high, noise_of(3), cond["text"],
                           cond["text_mask"], steps=STEPS)  # fmt: skip
    assert not torch.allclose(alone, expected, atol=1e-3)


def test_each_expert_samples_with_its_own_windows(
    pipe_and_cond: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    """``strategy_path`` / ``strategy_path_2`` in a ``VideoDiT``-style model equal
    ``enable_sta(strategy=..., strategy_2=...)`` in the pipeline, step by step."""
    pipe, cond = pipe_and_cond
    high, low = tmp_path / "high.json", tmp_path / "low.json"
    step_strategy(STEPS, seed=5).save(high)
    step_strategy(STEPS, seed=6).save(low)
    dit = experts(tile=TILE, strategy_path=str(high), strategy_path_2=str(low))
    enable_sta(pipe, strategy=high, strategy_2=low, backend="reference")
    try:
        expected = generate(pipe, STEPS, seed=4)
    finally:
        from stafinetune import disable_sta

        disable_sta(pipe)
    torch.testing.assert_close(ours(dit, cond, 4), expected, **TIGHT)
    same = experts(tile=TILE, strategy_path=str(high))  # the low expert with the high's windows
    assert not torch.allclose(ours(same, cond, 4), expected, atol=1e-4)


def test_a_two_expert_export_loads_into_wan_pipeline(
    pipe_and_cond: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    """``save_pretrained`` writes transformer/, transformer_2/ and model_index.json with the
    boundary: ``WanPipeline.from_pretrained`` takes it with the user's other components, and
    ``load_model`` of the export samples the same latents."""
    from diffusers import WanPipeline

    base, cond = pipe_and_cond
    export = tmp_path / "export"
    trained = experts(tile=TILE, window=[3, 1, 3])
    trained.save_pretrained(export)
    for name, expert in (
        ("mask_strategy.json", trained.high),
        ("mask_strategy_2.json", trained.low),
    ):
        from stafinetune.models import MaskStrategy

        MaskStrategy.from_plan(expert.plan, canvas=[5, 8, 8], tile=TILE).save(export / name)
    pipe = WanPipeline.from_pretrained(
        export, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        scheduler=base.scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.boundary_ratio == BOUNDARY and pipe.transformer_2 is not None
    enable_sta(pipe, strategy=export / "mask_strategy.json",
               strategy_2=export / "mask_strategy_2.json", backend="reference")  # fmt: skip
    loaded = load_model(MODEL, AttentionConfig(backend="reference"), Weights("export", export),
                        steps=STEPS, device=torch.device("cpu"), dtype=torch.float32)  # fmt: skip
    assert isinstance(loaded, ExpertDiT) and loaded.low.attention_cfg.strategy_path is not None
    torch.testing.assert_close(ours(loaded, cond, 2), generate(pipe, STEPS, seed=2), **TIGHT)
    torch.testing.assert_close(ours(loaded, cond, 2), ours(trained, cond, 2), **TIGHT)


def test_each_expert_guided_at_its_own_scale_as_diffusers(
    pipe_and_cond: tuple[Any, dict[str, Any]],
) -> None:
    """``sample.guidance_scale`` / ``guidance_scale_2``: the high-noise expert's steps guided
    at one scale, the low-noise expert's at the other, as ``WanPipeline`` does."""
    from pipeline_testing import NEGATIVE, TEXT_LEN

    from stafinetune.inference.generate import expert_guidance

    pipe, cond = pipe_and_cond
    with torch.no_grad():
        neg, _ = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False,
                                    max_sequence_length=TEXT_LEN)  # fmt: skip
    negative = (neg, neg.abs().sum(-1) > 0, torch.zeros(1, 1))
    expected = generate(pipe, STEPS, seed=6, guidance_scale=2.0, guidance_scale_2=4.0,
                        negative_prompt=NEGATIVE)  # fmt: skip
    guided = expert_guidance(experts(mode="full"), negative, 2.0, 4.0)
    got = sample_latents(guided, noise_of(6), cond["text"], cond["text_mask"], steps=STEPS)
    torch.testing.assert_close(got, expected, **TIGHT)
    one_scale = expert_guidance(experts(mode="full"), negative, 2.0, None)
    plain = sample_latents(one_scale, noise_of(6), cond["text"], cond["text_mask"], steps=STEPS)
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_strategy_2_needs_a_two_expert_pipeline_and_the_same_tile(
    pipe_and_cond: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    from stafinetune.models import MaskStrategy

    pipe, _ = pipe_and_cond
    path = tmp_path / "s.json"
    step_strategy(STEPS).save(path)
    with pytest.raises(ValueError, match="a pipeline with transformer and transformer_2"):
        enable_sta(pipe.transformer, strategy=path, strategy_2=path)
    other = MaskStrategy.from_tensor(torch.ones(1, 2, 4, 3, dtype=torch.int64), canvas=[5, 8, 8],
                                     tile=[1, 1, 1], candidates=[[1, 1, 1]])  # fmt: skip
    with pytest.raises(ValueError, match=r"differs from strategy='s \[1, 2, 2\]"):
        enable_sta(pipe, strategy=path, strategy_2=other)
    assert all(
        getattr(t, "_stafinetune_sta", None) is None for t in (pipe.transformer, pipe.transformer_2)
    )


@pytest.mark.parametrize("attention", [{"mode": "full"}, {"tile": TILE, "window": FULL_WINDOW}])
def test_ti2v_text_to_video_samples_as_wan_pipeline(
    pipe_and_cond: tuple[Any, dict[str, Any]], attention: dict[str, Any]
) -> None:
    """Wan 2.2 TI2V-5B's text-to-video mode: a 48-channel model and ``WanPipeline`` with
    ``expand_timesteps`` (one timestep per token) over a 16x VAE; our sampler (one timestep
    per sample) gives the same latents, dense and with full STA windows."""
    from diffusers import AutoencoderKLWan, WanPipeline

    base, cond = pipe_and_cond
    torch.manual_seed(0)
    dit = build_model(ModelConfig(flavor="wan22_tiny_ti2v"),
                      AttentionConfig(backend="reference", **attention))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
                               scale_factor_spatial=16).eval()  # fmt: skip
    torch.manual_seed(0)
    dense = build_model(ModelConfig(flavor="wan22_tiny_ti2v"), AttentionConfig(mode="full"))
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae,
                       transformer=plain_copy(dense), scheduler=base.scheduler,
                       expand_timesteps=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle moving left slowly", num_frames=17, height=256, width=256,
                    num_inference_steps=STEPS, guidance_scale=1.0, max_sequence_length=12,
                    generator=torch.Generator().manual_seed(1), output_type="latent").frames  # fmt: skip
    noise = torch.randn((1, 48, 5, 16, 16), generator=torch.Generator().manual_seed(1))
    got = sample_latents(dit, noise, cond["text"], cond["text_mask"], steps=STEPS)
    torch.testing.assert_close(got, expected, **TIGHT)


def test_ti2v_image_to_video_samples_as_wan_pipeline(
    pipe_and_cond: tuple[Any, dict[str, Any]],
) -> None:
    """Wan 2.2 TI2V-5B's image-to-video mode: ``WanImageToVideoPipeline`` with
    ``expand_timesteps`` (the first latent frame is the image's clean latent, timestep 0 on
    its tokens, re-imposed after every step) and our sampler with ``model.image_to_video``
    give the same latents with full STA windows."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

    base, cond = pipe_and_cond
    model = ModelConfig(flavor="wan22_tiny_ti2v", image_to_video=True)
    torch.manual_seed(0)
    dit = build_model(model, AttentionConfig(backend="reference", tile=TILE, window=FULL_WINDOW))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        # Wan 2.2's VAE layout: a 2x2 pixel patch before three 2x downsamplings (16x)
        vae = AutoencoderKLWan(base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               in_channels=12, out_channels=12, patch_size=2, is_residual=True,
                               latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
                               scale_factor_spatial=16).eval()  # fmt: skip
    torch.manual_seed(0)
    dense = build_model(model, AttentionConfig(mode="full"))
    pipe = WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                                   vae=vae, transformer=plain_copy(dense),
                                   scheduler=base.scheduler, expand_timesteps=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))  # [0, 1]
    expected = pipe(image, prompt_embeds=cond["text"], num_frames=17, height=256, width=256,
                    num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).frames  # fmt: skip
    with torch.no_grad():  # the data path's condition: the first frame alone through the VAE
        first = vae.encode(image[:, :, None] * 2 - 1).latent_dist.mode()  # (1, 48, 1, 16, 16)
    noise = torch.randn((1, 48, 5, 16, 16), generator=torch.Generator().manual_seed(1))
    got = sample_latents(dit, noise, cond["text"], cond["text_mask"], steps=STEPS,
                         image_latents=first)  # fmt: skip
    torch.testing.assert_close(got, expected, **TIGHT)
    torch.testing.assert_close(got[:, :, :1], first, atol=0, rtol=0)
    # STA inside diffusers' own pipeline takes its per-token timesteps too
    enable_sta(pipe, tile=TILE, window=FULL_WINDOW, backend="reference")
    in_pipe = pipe(image, prompt_embeds=cond["text"], num_frames=17, height=256, width=256,
                   num_inference_steps=STEPS, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(1)).frames  # fmt: skip
    torch.testing.assert_close(in_pipe, expected, **TIGHT)
