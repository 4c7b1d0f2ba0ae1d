"""``enable_sta`` in a real diffusers ``HunyuanVideo15Pipeline`` of tiny random parts.

The pipeline gets its text (Qwen) and glyph (ByT5) states as embeddings, so no tokenizer runs;
it adds its own 729 all-zero image tokens. fp32 on the CPU with the reference STA backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_testing import (
    FULL_WINDOW,
    TILE,
    CallRecorder,
    build_dit,
    step_strategy,
    student,
    tiny_image_encoder,
)

from stafinetune import disable_sta, enable_sta
from stafinetune.models.dit import cast_like_diffusers
from stafinetune.models.families import get_family

FLAVOR = "hunyuanvideo15_tiny"
STEPS = 3
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


def hunyuanvideo15_pipeline(
    transformer: torch.nn.Module, guidance_scale: float, image_to_video: bool = False
) -> Any:
    """A ``HunyuanVideo15Pipeline`` around ``transformer``: tiny Qwen2.5-VL and T5 text
    encoders (their dtype is all the pipeline reads when given embeddings), a tiny
    ``AutoencoderKLHunyuanVideo15`` (8x spatial, 4x temporal), classifier-free guidance;
    ``image_to_video``: a ``HunyuanVideo15ImageToVideoPipeline`` with a tiny SigLIP too."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4,
        )).eval()  # fmt: skip
        t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=24, d_kv=6, d_ff=48, num_layers=1,
                                     num_heads=4)).eval()  # fmt: skip
        # image-to-video encodes the image: 16x in space as the real VAE (which the data
        # pipeline checks), an encoder output of 32 channels
        blocks, space = ((8, 8, 8, 8, 32), 16) if image_to_video else ((8, 8, 8, 8), 8)
        vae = AutoencoderKLHunyuanVideo15(
            latent_channels=16, block_out_channels=blocks, layers_per_block=1,
            spatial_compression_ratio=space,
        ).eval()  # fmt: skip
    parts = dict(
        text_encoder=qwen, tokenizer=None, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=t5, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )  # fmt: skip
    if image_to_video:
        image_encoder, feature_extractor = tiny_image_encoder("siglip")
        pipe = HunyuanVideo15ImageToVideoPipeline(
            **parts, image_encoder=image_encoder, feature_extractor=feature_extractor
        )
    else:
        pipe = HunyuanVideo15Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts() -> dict[str, torch.Tensor]:
    """Prompt and negative-prompt embeddings: 12 text slots (8 and 4 valid) and 6 glyph slots
    (3 and 0 valid)."""
    g = torch.Generator().manual_seed(4)
    mask = lambda n, valid: (torch.arange(n)[None] < valid).float()  # noqa: E731
    return {
        "prompt_embeds": torch.randn(1, 12, 32, generator=g),
        "prompt_embeds_mask": mask(12, 8),
        "prompt_embeds_2": torch.randn(1, 6, 24, generator=g),
        "prompt_embeds_mask_2": mask(6, 3),
        "negative_prompt_embeds": torch.randn(1, 12, 32, generator=g),
        "negative_prompt_embeds_mask": mask(12, 4),
        "negative_prompt_embeds_2": torch.zeros(1, 6, 24),
        "negative_prompt_embeds_mask_2": mask(6, 0),
    }


def generate(pipe: Any, seed: int = 0) -> torch.Tensor:
    """Latents (1, 16, 5, 16, 16): 17 frames of 128 x 128."""
    return pipe(num_frames=17, height=128, width=128, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type="latent",
                **prompts()).frames  # fmt: skip


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    """The dense guided pipeline and its output."""
    from diffusers import HunyuanVideo15Transformer3DModel

    dit = build_dit(FLAVOR, mode="full")
    transformer = HunyuanVideo15Transformer3DModel(**dict(dit.transformer.config))
    cast_like_diffusers(transformer, dit.dtype)
    transformer.load_state_dict(dit.transformer.state_dict())
    pipe = hunyuanvideo15_pipeline(transformer.eval(), guidance_scale=5.0)
    return {"pipe": pipe, "dense": generate(pipe)}


@pytest.fixture
def pipe(setup: dict[str, Any]) -> Iterator[Any]:
    yield setup["pipe"]
    disable_sta(setup["pipe"])


def test_full_windows_equal_the_dense_pipeline(setup: dict[str, Any], pipe: Any) -> None:
    enable_sta(pipe, tile=TILE, window=FULL_WINDOW, backend="reference")
    torch.testing.assert_close(generate(pipe), setup["dense"], **TIGHT)
    enable_sta(pipe, tile=TILE, window=[3, 1, 3], backend="reference")
    sparse = generate(pipe)
    assert (sparse - setup["dense"]).abs().max() > 1e-3
    disable_sta(pipe)
    layers = get_family("hunyuanvideo15").sta_layers(pipe.transformer)
    assert all(type(a.processor).__name__ == "HunyuanVideo15AttnProcessor2_0" for a in layers)
    assert torch.equal(generate(pipe), setup["dense"])


def test_per_step_windows_follow_the_guided_loop(pipe: Any, tmp_path: Path) -> None:
    """Each of the pipeline's guided calls (cond, uncond: 729 image slots, glyph tokens)
    equals ``VideoDiT`` on the same inputs, at that call's step, with compact streams."""
    path = tmp_path / "mask_strategy.json"
    step_strategy(STEPS).save(path)
    enable_sta(pipe, strategy=path, dense_first_steps=1, backend="reference")
    recorder = CallRecorder(pipe.transformer)
    generate(pipe, seed=3)
    recorder.remove()
    assert len(recorder.calls) == 2 * STEPS
    dit = student(FLAVOR, path, dense_first_steps=1)
    for i, call in enumerate(recorder.calls):
        hidden, mask_2 = call["hidden_states"], call["encoder_attention_mask_2"].bool()
        valid = int(mask_2.sum())
        assert hidden[:, 16:].abs().max() == 0  # text-to-video: zero condition and mask
        condition = {"text_2": call["encoder_hidden_states_2"][:, :valid],
                     "text_2_mask": mask_2[:, :valid]}  # fmt: skip
        with torch.no_grad():
            out = dit(hidden[:, :16], call["timestep"], call["encoder_hidden_states"],
                          call["encoder_attention_mask"].bool(), step_index=i // 2,
                          condition=condition)  # fmt: skip
        torch.testing.assert_close(out, call["output"], **TIGHT, msg=f"call {i}")


# ---------------------------------------------------------------- image-to-video
I2V = "hunyuanvideo15_i2v_tiny"


def generate_i2v(pipe: Any, image: Any, seed: int = 0) -> torch.Tensor:
    """Latents (1, 16, 5, 16, 16) of 17 frames of ``image`` (256 x 256, the 16x VAE)."""
    return pipe(image=image, num_frames=17, num_inference_steps=STEPS, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **prompts()).frames  # fmt: skip


@pytest.fixture(scope="module")
def i2v(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dense ``HunyuanVideo15ImageToVideoPipeline`` whose transformer is a ``VideoDiT``
    export loaded back by diffusers, its VAE and SigLIP saved as local folders, an image."""
    import numpy as np
    from diffusers import HunyuanVideo15Transformer3DModel
    from PIL import Image

    folder = tmp_path_factory.mktemp("hv15_i2v")
    dit = build_dit(I2V, mode="full")
    dit.save_pretrained(folder / "transformer")
    transformer = HunyuanVideo15Transformer3DModel.from_pretrained(folder / "transformer")
    pipe = hunyuanvideo15_pipeline(transformer.eval(), 5.0, image_to_video=True)
    pipe.vae.save_pretrained(folder / "vae")
    pipe.image_encoder.save_pretrained(folder / "siglip")
    pipe.feature_extractor.save_pretrained(folder / "siglip")
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "frame.png")
    image = Image.open(folder / "frame.png").convert("RGB")
    return {"pipe": pipe, "folder": folder, "image": image, "dense": generate_i2v(pipe, image)}


def test_i2v_export_with_full_windows_equals_the_dense_pipeline(i2v: dict[str, Any]) -> None:
    """The exported i2v transformer runs in diffusers' i2v pipeline; STA at full windows
    equals its dense output, sparse windows change it."""
    pipe = i2v["pipe"]
    assert pipe.transformer.config.task_type == "i2v"
    try:
        enable_sta(pipe, tile=TILE, window=FULL_WINDOW, backend="reference")
        torch.testing.assert_close(generate_i2v(pipe, i2v["image"]), i2v["dense"], **TIGHT)
        enable_sta(pipe, tile=TILE, window=[3, 1, 3], backend="reference")
        assert (generate_i2v(pipe, i2v["image"]) - i2v["dense"]).abs().max() > 1e-3
    finally:
        disable_sta(pipe)


def test_i2v_sample_condition_is_what_the_pipeline_feeds(i2v: dict[str, Any]) -> None:
    """``stafinetune-sample``'s condition of ``sample.images`` (the VAE and SigLIP folders of
    ``data.video_encoder=hunyuanvideo15``, ``data.image_encoder=siglip``) makes ``VideoDiT``
    compute every guided call of the pipeline: the same condition latents, mask and image
    states through ``image_inputs``."""
    from stafinetune.data.config import DataConfig
    from stafinetune.data.encoders import build_video_encoder
    from stafinetune.inference.generate import SampleConfig, image_conditions

    folder = i2v["folder"]
    data_cfg = DataConfig(num_frames=17, height=256, width=256, video_encoder="hunyuanvideo15",
                          video_encoder_path=str(folder / "vae"), image_encoder="siglip",
                          image_encoder_path=str(folder / "siglip"))  # fmt: skip
    dit = build_dit(I2V, mode="full")
    sample_cfg = SampleConfig(prompts="prompts.txt", images=[str(folder / "frame.png")])
    (image,) = image_conditions(sample_cfg, data_cfg, ["a prompt"], dit,
                                build_video_encoder(data_cfg))  # fmt: skip
    recorder = CallRecorder(i2v["pipe"].transformer)
    generate_i2v(i2v["pipe"], i2v["image"])
    recorder.remove()
    assert len(recorder.calls) == 2 * STEPS
    for i, call in enumerate(recorder.calls):
        hidden, mask_2 = call["hidden_states"], call["encoder_attention_mask_2"].bool()
        valid = int(mask_2.sum())
        condition = {"text_2": call["encoder_hidden_states_2"][:, :valid],
                     "text_2_mask": mask_2[:, :valid]}  # fmt: skip
        with torch.no_grad():
            out = dit(hidden[:, :16], call["timestep"], call["encoder_hidden_states"],
                      call["encoder_attention_mask"].bool(), condition=condition,
                      **image)  # fmt: skip
        torch.testing.assert_close(out, call["output"], atol=1e-4, rtol=1e-4, msg=f"call {i}")
    torch.testing.assert_close(image["image_embeds"], call["image_embeds"], **TIGHT)
    torch.testing.assert_close(image["image_latents"][:, :, 0], hidden[:, 16:32, 0], **TIGHT)


def test_siglip_folders_load_safely(i2v: dict[str, Any], tmp_path: Path) -> None:
    """``data.image_encoder=siglip`` needs a local folder and refuses pickle weights alone
    unless ``data.allow_pickle_weights``; the encoder keys the cache."""
    from safetensors.torch import load_file

    from stafinetune.data.config import DataConfig
    from stafinetune.data.encoders import build_image_encoder
    from stafinetune.data.preprocess import cache_fingerprint

    with pytest.raises(ValueError, match="local SiglipVisionModel folder for 'siglip'"):
        DataConfig(image_encoder="siglip")
    siglip = i2v["folder"] / "siglip"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (pickled / name).write_bytes((siglip / name).read_bytes())
    torch.save(load_file(str(siglip / "model.safetensors")), pickled / "pytorch_model.bin")
    cfg = DataConfig(image_encoder="siglip", image_encoder_path=str(pickled))
    with pytest.raises(ValueError, match="only pickle weights.*data.allow_pickle_weights"):
        build_image_encoder(cfg)
    allowed = DataConfig(image_encoder="siglip", image_encoder_path=str(pickled),
                         allow_pickle_weights=True)  # fmt: skip
    encoder = build_image_encoder(allowed)
    assert (encoder.image_tokens, encoder.image_dim) == (16, 32)
    clip = DataConfig(image_encoder="clip", image_encoder_path=str(pickled))
    assert cache_fingerprint(cfg) != cache_fingerprint(clip)
