"""Fixtures of the metrics tests: tiny randomly initialised DINO / CLIP weight folders."""

from __future__ import annotations

import pytest
import torch


def _tiny_vision(**extra) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=224, initializer_range=0.5, **extra)  # fmt: skip


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory):
    """Folders written by ``save_pretrained`` of tiny random models, as a user would ship them."""
    import transformers

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    transformers.Dinov2Model(
        transformers.Dinov2Config(**_tiny_vision(patch_size=14))
    ).save_pretrained(root / "dinov2")
    transformers.ViTModel(
        transformers.ViTConfig(**_tiny_vision(patch_size=16)), add_pooling_layer=False
    ).save_pretrained(root / "dino_vit")
    transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**_tiny_vision(patch_size=32), projection_dim=16)
    ).save_pretrained(root / "clip_vision")
    transformers.CLIPModel(
        transformers.CLIPConfig(
            vision_config=_tiny_vision(patch_size=32),
            text_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=100,
            ),  # fmt: skip
            projection_dim=24,
        )
    ).save_pretrained(root / "clip_full")
    return root
