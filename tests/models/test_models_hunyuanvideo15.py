"""HunyuanVideo 1.5 (``hunyuanvideo15_tiny``) against diffusers' own transformer.

The model joins image, ByT5 glyph and Qwen text tokens after the video (valid ones first);
``VideoDiT`` passes empty glyph and image streams for text-to-video, diffusers' pipeline
padded ones (256 glyph, 729 image slots; 7 and 9 here): the outputs must agree exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dit_testing import build, make_batch, run

from stafinetune import enable_sta
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.dit import cast_like_diffusers
from stafinetune.models.families import ImageDims, get_family

FLAVOR = "hunyuanvideo15_tiny"
I2V = "hunyuanvideo15_i2v_tiny"
FULL_WINDOW = [5, 4, 4]  # the (5, 8, 8) canvas in (1, 2, 2) tiles
GLYPH_SLOTS, IMAGE_SLOTS = 7, 9


def original(dit: Any) -> torch.nn.Module:
    """diffusers' ``HunyuanVideo15Transformer3DModel`` (own processors) with ``dit``'s weights."""
    from diffusers import HunyuanVideo15Transformer3DModel

    ref = HunyuanVideo15Transformer3DModel(**dict(dit.transformer.config))
    cast_like_diffusers(ref, dit.dtype)
    ref.load_state_dict(dit.transformer.state_dict())
    return ref.eval()


def glyph(b: dict[str, torch.Tensor], valid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``valid[i]`` ByT5 glyph tokens of ``GLYPH_SLOTS`` per sample (``condition=``)."""
    g = torch.Generator().manual_seed(7)
    return {
        "text_2": torch.randn(b["latents"].shape[0], GLYPH_SLOTS, 24, generator=g),
        "text_2_mask": torch.arange(GLYPH_SLOTS)[None] < torch.tensor(valid)[:, None],
    }


def image(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An image condition as the data caches it: condition latents (B, C, T, H, W) whose first
    latent frame is the image's (the rest, a causal VAE's later frames, is not read) and
    ``IMAGE_SLOTS`` SigLIP-like states of width 32 (``image_latents=``, ``image_embeds=``)."""
    g = torch.Generator().manual_seed(8)
    latents = b["latents"]
    return {
        "image_latents": torch.randn(latents.shape, generator=g),
        "image_embeds": torch.randn(latents.shape[0], IMAGE_SLOTS, 32, generator=g),
    }


def pipeline_kwargs(
    b: dict[str, torch.Tensor],
    streams: dict[str, torch.Tensor] | None = None,
    images: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The transformer call diffusers' pipelines make: [latents, condition latents, mask] and
    padded glyph and image streams. Text-to-video (``HunyuanVideo15Pipeline``): zero condition
    and mask, all-zero image states; image-to-video (``HunyuanVideo15ImageToVideoPipeline``):
    the image's latent on the first frame, zeros after, mask 1 on that frame."""
    latents = b["latents"]
    batch = latents.shape[0]
    streams = streams or glyph(b, (0, 0))
    cond, mask = torch.zeros_like(latents), torch.zeros_like(latents[:, :1])
    embeds = torch.zeros(batch, IMAGE_SLOTS, 20)
    if images is not None:
        cond[:, :, 0], mask[:, :, 0] = images["image_latents"][:, :, 0], 1.0
        embeds = images["image_embeds"]
    return {
        "hidden_states": torch.cat([latents, cond, mask], dim=1),
        "timestep": b["timestep"],
        "encoder_hidden_states": b["text"],
        "encoder_attention_mask": b["text_mask"].long(),
        "encoder_hidden_states_2": streams["text_2"],
        "encoder_attention_mask_2": streams["text_2_mask"].long(),
        "image_embeds": embeds,
        "return_dict": False,
    }


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_text_to_video_matches_diffusers(mode: str) -> None:
    """Dense and full-window STA equal diffusers called as its pipeline calls it."""
    dit = build(FLAVOR, mode=mode, window=FULL_WINDOW)
    b = make_batch()
    with torch.no_grad():
        expected = original(dit)(**pipeline_kwargs(b))[0]
        got = run(dit, b)
    assert got.shape == b["latents"].shape == (2, 16, 5, 16, 16)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_image_and_glyph_streams_match_diffusers(mode: str) -> None:
    """An image-to-video model's image condition (``image_inputs``) and the glyph text enter
    as diffusers' i2v pipeline passes them; the joint sequence holds video, then 9 image + 3
    or 5 glyph + 16 or 9 text tokens, valid first."""
    dit = build(I2V, mode=mode, window=FULL_WINDOW)
    assert dit.image_dims == ImageDims(17, 32) and dit.in_channels == 16
    b = make_batch()
    streams, images = glyph(b, (3, 5)), image(b)
    with torch.no_grad():
        expected = original(dit)(**pipeline_kwargs(b, streams, images))[0]
        with dit.capture(layers=[0]) as store:
            got = run(dit, b, condition=streams, **images)
        later = {**images, "image_latents": images["image_latents"].clone()}
        later["image_latents"][:, :, 1:] = 0.0
        same = run(dit, b, condition=streams, **later)
        negated = {**images, "image_embeds": -images["image_embeds"]}
        other = run(dit, b, condition=streams, **negated)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(same, got)  # the first latent frame alone conditions
    assert (got - other).abs().max() > 1e-3  # the image states are used
    assert store.text_len.tolist() == [9 + 3 + 16, 9 + 5 + 9]
    assert store[0].shape == (2, 320 + IMAGE_SLOTS + GLYPH_SLOTS + 16, 4, 16)
    assert store[0][1, 320 + 23 :].abs().max() == 0  # padding query rows are zero


def test_sparse_windows_through_the_bare_transformer_equal_videodit() -> None:
    """STA bound to a plain diffusers transformer (as ``enable_sta`` does) reads the text
    lengths from the pipeline's padded streams: the same windows give ``VideoDiT``'s output."""
    window = [3, 1, 3]
    dit = build(I2V, mode="sta", window=window)
    b = make_batch()
    streams, images = glyph(b, (3, 5)), image(b)
    bare = original(dit)
    enable_sta(bare, tile=[1, 2, 2], window=window, backend="reference")
    with torch.no_grad():
        ours = run(dit, b, condition=streams, **images)
        pipeline = bare(**pipeline_kwargs(b, streams, images))[0]
        dense = original(dit)(**pipeline_kwargs(b, streams, images))[0]
    torch.testing.assert_close(pipeline, ours, atol=2e-5, rtol=1e-4)
    assert (pipeline - dense).abs().max() > 1e-3  # the windows are sparse


def test_bf16_dense_is_bit_exact() -> None:
    """In bf16 (inputs and timestep in the model's dtype, as the pipeline passes them)."""
    torch.manual_seed(0)
    dit = build_model(
        ModelConfig(flavor=FLAVOR), AttentionConfig(mode="full"), dtype=torch.bfloat16
    )
    b = make_batch()
    inputs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in pipeline_kwargs(b).items()
    }
    with torch.no_grad():
        expected = original(dit)(**inputs)[0]
        got = run(dit, b)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_autocast_keeps_the_timestep_in_float32() -> None:
    """Under autocast a bf16 model sees the float32 timestep (a distillation's bf16 teacher
    and fp32 student, the same noise level); 813 and 812 are one bf16 value."""
    torch.manual_seed(0)
    dit = build_model(
        ModelConfig(flavor=FLAVOR), AttentionConfig(mode="full"), dtype=torch.bfloat16
    )
    b = make_batch(batch=1, text_lens=(9,))
    outs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for t in (812.0, 813.0):
            outs.append(run(dit, {**b, "timestep": torch.tensor([t])}))
        rounded = run(dit, {**b, "timestep": torch.tensor([813.0]).bfloat16().float()})
    assert not torch.equal(outs[0], outs[1]) and torch.equal(rounded, outs[0])


def test_family_layout() -> None:
    dit = build(FLAVOR, mode="sta", window=[3, 3, 3])
    family = get_family("hunyuanvideo15")
    assert dit.num_layers == 2 and dit.in_channels == 16 and dit.text_dim == 32
    assert dit.pooled_dim is None and dit.patch_size == (1, 2, 2)
    blocks = family.blocks(dit.transformer)
    assert blocks[0] is dit.transformer.context_embedder.token_refiner.refiner_blocks[0]
    assert blocks[1:] == list(dit.transformer.transformer_blocks)


def test_condition_errors_name_the_tensor() -> None:
    dit = build(FLAVOR, mode="sta", window=[3, 3, 3])
    i2v = build(I2V, mode="sta", window=[3, 3, 3])
    b = make_batch()
    streams, images = glyph(b, (3, 5)), image(b)
    with pytest.raises(ValueError, match="unknown HunyuanVideo 1.5 condition .*image_latents="):
        run(dit, b, condition={"image_embeds": images["image_embeds"]})
    with pytest.raises(ValueError, match="text_2 and text_2_mask together"):
        run(dit, b, condition={"text_2": streams["text_2"]})
    with pytest.raises(ValueError, match="text-to-video model takes no image_latents"):
        run(dit, b, **images)
    with pytest.raises(ValueError, match="needs image_latents"):
        run(i2v, b)
    with pytest.raises(ValueError, match="image latents must be"):
        run(i2v, b, **{**images, "image_latents": images["image_latents"][:, :, :1]})
    with pytest.raises(ValueError, match=r"image embeds must be \(B, N, 32\)"):
        run(i2v, b, **{**images, "image_embeds": images["image_embeds"][..., :20]})
    with pytest.raises(ValueError, match="takes no condition tensors"):
        run(build("wan_tiny"), b, condition=streams)


def test_the_flavor_decides_the_task_of_a_folder(tmp_path, caplog) -> None:
    """The i2v and t2v transformers share one shape and differ only in ``task_type``, which
    some converted folders get wrong: ``model.flavor`` decides, before building and when
    loading, with a warning naming ``model.path``; a Wan folder of the other task (other
    input channels) is refused."""
    import json

    from stafinetune.models.dit import model_image_dims

    build(FLAVOR, mode="full").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "task_type": "i2v"}))
    as_t2v = ModelConfig(flavor=FLAVOR, path=str(tmp_path))
    with caplog.at_level("WARNING", logger="stafinetune.models.dit"):
        assert model_image_dims(as_t2v) is None
        dit = build_model(as_t2v, AttentionConfig(mode="full"))
    assert dit.image_dims is None and dit.transformer.config.task_type == "t2v"
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"model.path={tmp_path} says task_type='i2v' but model.flavor={FLAVOR} has "
                    "'t2v': following the flavor (the transformer never reads task_type)"]  # once
    assert model_image_dims(ModelConfig(flavor=I2V, path=str(tmp_path))) == ImageDims(17, 20)
    wan = tmp_path / "wan_i2v"
    build("wan_i2v_tiny", mode="full").save_pretrained(wan)
    with pytest.raises(ValueError, match="holds an image-to-video transformer .* is a text-to"):
        model_image_dims(ModelConfig(flavor="wan_tiny", path=str(wan)))


@pytest.mark.parametrize(
    "flavor", ["hunyuanvideo15_480p_t2v", "hunyuanvideo15_720p_t2v", "hunyuanvideo15_720p_i2v"]
)
def test_published_flavors_build_on_meta(flavor: str) -> None:
    """The 8.3B model: 54 STA layers of 16 heads x 128, 32 latent channels, a 1x1x1 patch."""
    dit = build_model(
        ModelConfig(flavor=flavor),
        AttentionConfig(tile=[6, 8, 8]),
        device="meta",
        dtype=torch.bfloat16,
    )
    params = sum(p.numel() for p in dit.parameters()) / 1e9
    assert (dit.num_layers, dit.num_heads, dit.head_dim, dit.in_channels) == (54, 16, 128, 32)
    assert 8.2 < params < 8.4 and dit.text_dim == 3584 and dit.pooled_dim is None
    assert dit.canvas_for((32, 31, 30, 53)) == (31, 30, 53)  # 121 frames at 480x848
    # 32 condition latents + 1 mask channel, SigLIP's 1152-wide states; t2v takes none
    assert dit.image_dims == (ImageDims(33, 1152) if flavor.endswith("i2v") else None)
    assert all(p.is_meta for p in dit.parameters())
