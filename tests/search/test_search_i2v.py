"""The window search on an image-to-video model scores it with its batches' image condition."""

from __future__ import annotations

import pytest
import torch
from search_testing import build_tiny, calibration

from stafinetune.search import SearchConfig, evaluate_candidates


@pytest.mark.parametrize("flavor", ["wan_i2v_tiny", "hunyuanvideo15_i2v_tiny"])
def test_search_errors_depend_on_the_image_condition(flavor: str) -> None:
    dit = build_tiny(flavor)
    g = torch.Generator().manual_seed(5)
    batches = [{**b, "image_latents": torch.randn(b["latents"].shape, generator=g),
                "image_embeds": torch.randn(2, 17, 32, generator=g)}
               for b in calibration(flavor)]  # fmt: skip
    cfg = SearchConfig(steps=2, candidates=[[3, 3, 3], [1, 2, 2]])
    errors = evaluate_candidates(dit, batches, cfg, progress=False).errors[
        "rel_l2"
    ]  # (steps, L, H, C)
    other = [{**b, "image_embeds": -b["image_embeds"]} for b in batches]
    moved = evaluate_candidates(dit, other, cfg, progress=False).errors["rel_l2"]
    assert errors.shape[0] == 2 and torch.isfinite(errors).all()
    assert not torch.allclose(errors, moved)
