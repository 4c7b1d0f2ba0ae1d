"""Model flavors by name: the diffusers config of each supported DiT shape.

Tiny flavors drive tests and the embedded CPU default; the real flavors carry the published
diffusers ``transformer/config.json`` values of Wan 2.1 T2V (1.3B, 14B), HunyuanVideo
(13B), HunyuanVideo 1.5 (8.3B) and Wan 2.2 (TI2V-5B, T2V-A14B, I2V-A14B), so they build on the meta
device for benchmarks and load weights from a local diffusers directory.

A two-expert flavor (Wan 2.2 A14B) names its noise boundary: the high-noise expert
(``transformer/``) denoises timesteps ``t >= boundary_ratio * 1000``, the low-noise expert
(``transformer_2/``) the rest, as diffusers' ``WanPipeline`` switches them. Both experts share
the flavor's config (see ``stafinetune.models.experts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Flavor:
    """A named model shape: its family (``wan`` / ``hunyuan`` / ``hunyuanvideo15``) and
    diffusers config kwargs.

    ``boundary_ratio``: set for two-expert models (Wan 2.2 A14B), the published switch from
    the high-noise to the low-noise expert as a fraction of the 1000 training timesteps.
    ``first_frame_i2v``: the same weights also run image-to-video on a clean first latent
    frame (Wan 2.2 TI2V; ``model.image_to_video``).
    """

    name: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    boundary_ratio: float | None = None
    first_frame_i2v: bool = False

    @property
    def experts(self) -> bool:
        """Whether the model is two experts (``transformer`` and ``transformer_2``)."""
        return self.boundary_ratio is not None


_WAN_COMMON: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

_HUNYUAN_13B: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
}

# Embedded default: latents (16, 5, 16, 16) -> canvas (5, 8, 8) = 320 tokens; 2 layers,
# 4 heads x 16, text tokens of width 32. Small enough for hundreds of CPU steps a minute.
_WAN_TINY: dict[str, Any] = {
    **_WAN_COMMON,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}

FLAVORS: dict[str, Flavor] = {
    "wan_tiny": Flavor("wan_tiny", "wan", dict(_WAN_TINY)),
    # Tests: one dual-stream and one single-stream block so both joint paths are exercised.
    "hunyuan_tiny": Flavor(
        "hunyuan_tiny",
        "hunyuan",
        {
            **_HUNYUAN_13B,
            "num_attention_heads": 4,
            "attention_head_dim": 16,
            "num_layers": 1,
            "num_single_layers": 1,
            "num_refiner_layers": 1,
            "mlp_ratio": 2.0,
            "text_embed_dim": 32,
            "pooled_projection_dim": 32,
            "rope_axes_dim": [4, 6, 6],
        },
    ),
    "wan2.1_t2v_1.3b": Flavor(
        "wan2.1_t2v_1.3b",
        "wan",
        {
            **_WAN_COMMON,
            "num_attention_heads": 12,
            "attention_head_dim": 128,
            "ffn_dim": 8960,
            "num_layers": 30,
        },
    ),
    "wan2.1_t2v_14b": Flavor(
        "wan2.1_t2v_14b",
        "wan",
        {
            **_WAN_COMMON,
            "num_attention_heads": 40,
            "attention_head_dim": 128,
            "ffn_dim": 13824,
            "num_layers": 40,
        },
    ),
    "hunyuanvideo_13b": Flavor("hunyuanvideo_13b", "hunyuan", dict(_HUNYUAN_13B)),
    # Wan 2.2 TI2V-5B (text- and image-to-video): 48 latent channels of the Wan 2.2 VAE (16x
    # spatial, 4x temporal compression), 30 layers of 24 heads x 128, ffn 14336.
    "wan2.2_ti2v_5b": Flavor(
        "wan2.2_ti2v_5b",
        "wan",
        {
            **_WAN_COMMON,
            "in_channels": 48,
            "out_channels": 48,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "ffn_dim": 14336,
            "num_layers": 30,
        },
        first_frame_i2v=True,
    ),
    # Wan 2.2 T2V-A14B: two experts of the Wan 2.1 14B shape (Wan 2.1 VAE), boundary 0.875.
    "wan2.2_t2v_a14b": Flavor(
        "wan2.2_t2v_a14b",
        "wan",
        {
            **_WAN_COMMON,
            "num_attention_heads": 40,
            "attention_head_dim": 128,
            "ffn_dim": 13824,
            "num_layers": 40,
        },
        boundary_ratio=0.875,
    ),
    # Tests: two wan_tiny-shaped experts with a boundary in the middle of the noise range.
    "wan22_tiny_experts": Flavor("wan22_tiny_experts", "wan", dict(_WAN_TINY), boundary_ratio=0.5),
    # Tests: a TI2V-5B-like tiny model with 48 latent channels.
    "wan22_tiny_ti2v": Flavor(
        "wan22_tiny_ti2v",
        "wan",
        {**_WAN_TINY, "in_channels": 48, "out_channels": 48},
        first_frame_i2v=True,
    ),
}

# Wan 2.1 image-to-video: 36 input channels (16 noisy latents + 4 mask channels + 16 latents
# of the conditioning video), CLIP image states (image_dim) through added k/v projections in
# every cross-attention. Values of diffusers' scripts/convert_wan_to_diffusers.py
# ("Wan-I2V-14B-480p" / "Wan-I2V-14B-720p": one transformer config, two trainings).
_WAN_I2V_14B: dict[str, Any] = {
    **_WAN_COMMON,
    "in_channels": 36,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "ffn_dim": 13824,
    "num_layers": 40,
}
FLAVORS |= {
    # Tests and the i2v demo: wan_tiny taking 36 channels and 17 image tokens of width 32.
    "wan_i2v_tiny": Flavor(
        "wan_i2v_tiny",
        "wan",
        {**FLAVORS["wan_tiny"].config, "in_channels": 36, "image_dim": 32, "added_kv_proj_dim": 64},
    ),
    "wan2.1_i2v_14b_480p": Flavor("wan2.1_i2v_14b_480p", "wan", dict(_WAN_I2V_14B)),
    "wan2.1_i2v_14b_720p": Flavor("wan2.1_i2v_14b_720p", "wan", dict(_WAN_I2V_14B)),
    # Wan 2.2 I2V-A14B: two experts of the Wan 2.1 I2V 14B input (36 channels: 16 noisy + 4
    # mask + 16 condition latents of the Wan 2.1 VAE) without CLIP image states (no image_dim,
    # no added k/v projections). Shape and boundary 0.900 from Wan-AI's Wan2.2
    # wan/configs/wan_i2v_A14B.py (dim 5120 = 40 heads x 128, ffn 13824, 40 layers,
    # boundary 0.900); in_channels 36 / no image_dim as diffusers'
    # scripts/convert_wan_to_diffusers.py writes "Wan2.2-I2V-14B-720p".
    "wan2.2_i2v_a14b": Flavor(
        "wan2.2_i2v_a14b",
        "wan",
        {**_WAN_I2V_14B, "image_dim": None, "added_kv_proj_dim": None},
        boundary_ratio=0.9,
    ),
    # Tests: two wan_tiny-shaped experts taking 36 channels and no image states.
    "wan22_tiny_i2v_experts": Flavor(
        "wan22_tiny_i2v_experts",
        "wan",
        {**_WAN_TINY, "in_channels": 36},
        boundary_ratio=0.5,
    ),
}


# HunyuanVideo 1.5 (8.3B): diffusers' ``HunyuanVideo15Transformer3DModel`` defaults, which its
# conversion script (scripts/convert_hunyuan_video1_5_to_diffusers.py) keeps for every published
# transformer, overriding only ``target_size`` (the pipeline's default resolution) and
# ``task_type``. 54 dual-stream blocks of 16 heads x 128; the input is 65 channels: 32 noisy
# latent channels, 32 image-condition channels and 1 condition mask (zeros for text-to-video).
_HUNYUANVIDEO15_8B: dict[str, Any] = {
    "in_channels": 65,
    "out_channels": 32,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 54,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "text_embed_dim": 3584,  # Qwen2.5-VL-7B hidden states
    "text_embed_2_dim": 1472,  # ByT5 (glyph text) hidden states
    "image_embed_dim": 1152,  # SigLIP image states (image-to-video)
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
    "use_meanflow": False,
}

# Tests: 2 dual-stream blocks of 4 heads x 16 on 16 latent channels (input 2*16+1 = 33),
# text of width 32 and a 2x2 patch (the real model's is 1x1), so the model tests'
# latents (16, 5, 16, 16) make the same canvas (5, 8, 8) as the other tiny flavors.
_HUNYUANVIDEO15_TINY: dict[str, Any] = {
    **_HUNYUANVIDEO15_8B,
    "in_channels": 33,
    "out_channels": 16,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "text_embed_dim": 32,
    "text_embed_2_dim": 24,
    "image_embed_dim": 20,
    "patch_size": 2,
    "rope_axes_dim": [4, 6, 6],
    "target_size": 128,
    "task_type": "t2v",
}

FLAVORS.update(
    {
        "hunyuanvideo15_tiny": Flavor(
            "hunyuanvideo15_tiny", "hunyuanvideo15", _HUNYUANVIDEO15_TINY
        ),
        # hunyuanvideo15_tiny as image-to-video: the tiny image encoder's 17 states of width
        # 32; the i2v pipeline sizes its video by target_size (256 x 256 for a 16x VAE)
        "hunyuanvideo15_i2v_tiny": Flavor(
            "hunyuanvideo15_i2v_tiny",
            "hunyuanvideo15",
            {**_HUNYUANVIDEO15_TINY, "image_embed_dim": 32, "task_type": "i2v", "target_size": 256},
        ),
        # the conversion script's TRANSFORMER_CONFIGS; the transformer never reads task_type,
        # the family reads it as the image-to-video switch, and the flavor's value wins over
        # a model.path folder's (``dit.flavor_decides``: earlier scripts wrote "i2v" for 480p_t2v)
        "hunyuanvideo15_480p_t2v": Flavor(
            "hunyuanvideo15_480p_t2v",
            "hunyuanvideo15",
            {**_HUNYUANVIDEO15_8B, "target_size": 640, "task_type": "t2v"},
        ),
        "hunyuanvideo15_720p_t2v": Flavor(
            "hunyuanvideo15_720p_t2v",
            "hunyuanvideo15",
            {**_HUNYUANVIDEO15_8B, "target_size": 960, "task_type": "t2v"},
        ),
        "hunyuanvideo15_720p_i2v": Flavor(
            "hunyuanvideo15_720p_i2v",
            "hunyuanvideo15",
            {**_HUNYUANVIDEO15_8B, "target_size": 960, "task_type": "i2v"},
        ),
    }
)


def get_flavor(name: str) -> Flavor:
    """Return the flavor called ``name`` or raise ``ValueError`` listing the known ones."""
    if name not in FLAVORS:
        raise ValueError(f"model.flavor must be one of {sorted(FLAVORS)}, got {name!r}")
    return FLAVORS[name]
