"""Image-to-video data: the first frame's condition latents and image states, cached."""

from __future__ import annotations

import pytest
import torch
from data_media import small_config

from stafinetune.data import build_train_loader, prepare_data
from stafinetune.data.cache import LatentCache
from stafinetune.data.config import DataConfig
from stafinetune.data.encoders import TinyImageEncoder, build_image_encoder, build_video_encoder
from stafinetune.data.preprocess import cache_fingerprint
from stafinetune.data.sources import build_source
from stafinetune.data.video import load_clip


@pytest.fixture(scope="module")
def image_cache(synthetic_root):
    """(cfg, cache_dir) of the small synthetic set with the tiny image encoder (6 clips)."""
    cfg = small_config(synthetic_root, num_clips=6, image_encoder="tiny")
    return cfg, prepare_data(cfg, verbose=False)


def test_cache_holds_the_first_frame_condition(image_cache) -> None:
    """Condition latents encode [first frame, black frames]; image states the first frame."""
    cfg, cache_dir = image_cache
    cache = LatentCache(cache_dir)
    assert (cache.info["image_tokens"], cache.info["image_dim"]) == (17, 32)
    venc, ienc = build_video_encoder(cfg), TinyImageEncoder(32)
    source = build_source(cfg, generate=False)
    sample = cache[4]
    video, _ = load_clip(source[sample.index], cfg)  # (3, F, H, W)
    condition = torch.cat([video[:, :1], torch.zeros_like(video[:, 1:])], dim=1)
    assert torch.equal(sample.image_latents, venc.encode(condition[None])[0])
    assert torch.equal(sample.image_embeds, ienc.encode(video[None, :, 0])[0])
    # a causal VAE: the first latent frame is the clip's own, the rest are not
    assert torch.equal(sample.image_latents[:, 0], sample.latents[:, 0])
    assert not torch.allclose(sample.image_latents[:, 1:], sample.latents[:, 1:])


def test_loader_batches_carry_the_condition_on_the_fly_too(image_cache) -> None:
    cfg, _ = image_cache
    fly = small_config(cfg.root, num_clips=6, image_encoder="tiny", use_cache=False)
    prepare_data(fly, verbose=False)
    a = next(iter(build_train_loader(cfg, batch_size=2, seed=2)))
    b = next(iter(build_train_loader(fly, batch_size=2, seed=2)))
    assert a["image_latents"].shape == (2, 16, 5, 16, 16)
    assert a["image_embeds"].shape == (2, 17, 32)
    for key in ("latents", "image_latents", "image_embeds"):
        assert torch.equal(a[key], b[key]), key


def test_image_fields_key_the_cache_and_are_checked(synthetic_root) -> None:
    """Text-to-video caches keep their fingerprint; the image encoder changes it."""
    plain = small_config(synthetic_root)
    assert cache_fingerprint(plain) == cache_fingerprint(small_config(synthetic_root, image_dim=64))
    assert cache_fingerprint(plain) != cache_fingerprint(
        small_config(synthetic_root, image_encoder="tiny")
    )
    with pytest.raises(ValueError, match="data.image_encoder must be null or one of"):
        DataConfig(image_encoder="dino")
    with pytest.raises(ValueError, match="data.image_encoder_path must point"):
        DataConfig(image_encoder="clip")


def test_clip_image_encoder_matches_the_pipelines_encode_image(tmp_path) -> None:
    """A local CLIPVisionModel folder gives the states ``WanImageToVideoPipeline`` computes."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from stafinetune.data.real_encoders import CLIPImageEncoder

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             image_size=32, patch_size=8)).eval()  # fmt: skip
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    frame = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    encoder = build_image_encoder(small_config(tmp_path, image_encoder="clip",
                                               image_encoder_path=str(tmp_path / "clip")))  # fmt: skip
    assert isinstance(encoder, CLIPImageEncoder) and encoder.image_tokens == 17
    with torch.no_grad():
        inputs = processor(images=Image.fromarray(pixels), return_tensors="pt")
        expected = model(**inputs, output_hidden_states=True).hidden_states[-2]  # (1, 17, 32)
    torch.testing.assert_close(encoder.encode(frame[None]), expected, atol=1e-5, rtol=1e-5)
