"""Wan 2.1 image-to-video: the family's image inputs reproduce diffusers' own call."""

from __future__ import annotations

import pytest
import torch
from dit_testing import build, make_batch, original

from stafinetune.models import get_flavor
from stafinetune.models.families import WAN_TEXT_TOKENS

TOKENS = 17  # image tokens of the tiny image encoders (a 4 x 4 grid and a class token)


def image_batch(batch: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    """``make_batch`` plus condition latents (B, 16, 5, 16, 16) and image states (B, 17, 32)."""
    g = torch.Generator().manual_seed(seed)
    return {
        **make_batch(batch),
        "image_latents": torch.randn(batch, 16, 5, 16, 16, generator=g),
        "image_embeds": torch.randn(batch, TOKENS, 32, generator=g),
    }


def run_i2v(dit, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return dit(b["latents"], b["timestep"], b["text"], b["text_mask"],
               image_latents=b["image_latents"], image_embeds=b["image_embeds"])  # fmt: skip


def diffusers_i2v(ref: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The transformer call of ``WanImageToVideoPipeline``: zero-padded text of 512 tokens,
    [latents, mask (4 channels, 1 on the first latent frame), condition] on channels."""
    text = b["text"] * b["text_mask"][..., None]
    text = torch.cat([text, text.new_zeros(text.shape[0], WAN_TEXT_TOKENS - text.shape[1], 32)], 1)
    mask = torch.zeros(b["latents"].shape[0], 4, *b["latents"].shape[2:])
    mask[:, :, 0] = 1
    hidden = torch.cat([b["latents"], mask, b["image_latents"]], dim=1)  # (B, 36, T, H, W)
    return ref(hidden, b["timestep"], text, encoder_hidden_states_image=b["image_embeds"],
               return_dict=False)[0]  # fmt: skip


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_i2v_matches_diffusers(mode: str) -> None:
    """Dense and full-window STA equal diffusers' dense I2V transformer; the image matters."""
    dit = build("wan_i2v_tiny", mode=mode, window=[5, 4, 4])
    assert dit.in_channels == 16 and dit.image_dims.embed_dim == 32
    b = image_batch()
    with torch.no_grad():
        expected = diffusers_i2v(original(dit), b)
        got = run_i2v(dit, b)
        other = run_i2v(dit, {**b, "image_embeds": b["image_embeds"].flip(0)})
    assert got.shape == b["latents"].shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (other - got).abs().max() > 1e-3  # the image states reach the output


def test_sparse_windows_touch_video_attention_only() -> None:
    """STA changes the video self-attention: sparse differs from dense on the same inputs."""
    b = image_batch(batch=1)
    with torch.no_grad():
        dense = run_i2v(build("wan_i2v_tiny", mode="full"), b)
        sparse = run_i2v(build("wan_i2v_tiny", mode="sta", window=[3, 3, 3]), b)
    assert (dense - sparse).abs().max() > 1e-4


def test_image_inputs_are_checked() -> None:
    """A missing condition, one given to a text-to-video model, wrong shapes: clear errors."""
    i2v, t2v = build("wan_i2v_tiny", mode="full"), build("wan_tiny", mode="full")
    b = image_batch(batch=1)
    with pytest.raises(ValueError, match="needs image_latents"):
        i2v(b["latents"], b["timestep"], b["text"], b["text_mask"])
    with pytest.raises(ValueError, match="takes no image_latents"):
        run_i2v(t2v, b)
    with pytest.raises(ValueError, match=r"image embeds must be \(B, N, 32\)"):
        run_i2v(i2v, {**b, "image_embeds": b["image_embeds"][..., :8]})
    with pytest.raises(ValueError, match="image latents must have"):
        run_i2v(i2v, {**b, "image_latents": b["image_latents"][:, :, :2]})


def test_published_i2v_flavors() -> None:
    """The 14B I2V flavors take 36 channels, CLIP ViT-H states and added k/v of width 5120."""
    for name in ("wan2.1_i2v_14b_480p", "wan2.1_i2v_14b_720p"):
        cfg = get_flavor(name).config
        assert (cfg["in_channels"], cfg["out_channels"], cfg["image_dim"]) == (36, 16, 1280)
        assert cfg["added_kv_proj_dim"] == cfg["num_attention_heads"] * cfg["attention_head_dim"]
