"""The HunyuanVideo 1.5 720p suites of the GPU benchmarks build at their real shapes (on the
meta device: no memory, no GPU). Their timings need a GPU; ``--smoke`` runs their code paths
on the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sampling  # noqa: E402
import train_step  # noqa: E402

from sta_kernels import density, num_tiles
from stafinetune.models import AttentionConfig, ModelConfig, build_model


@pytest.mark.parametrize(("script", "layers"), [(train_step, 4), (sampling, 54)])
def test_hv15_720p_suite_builds_at_its_real_shape(script, layers: int) -> None:
    suite = script.SUITES["hv15_720p"]
    cfg = ModelConfig(flavor=suite.flavor, config_overrides=dict(suite.overrides))
    dit = build_model(
        cfg, AttentionConfig(tile=list(suite.tile)), device="meta", dtype=torch.bfloat16
    )
    assert (dit.family, dit.num_layers, dit.num_heads, dit.head_dim) == (
        "hunyuanvideo15",
        layers,
        16,
        128,
    )
    canvas = dit.canvas_for((dit.in_channels, *suite.latent))
    assert canvas == (31, 45, 80) and num_tiles(canvas, suite.tile) == (6, 6, 10)
    assert density(canvas, suite.tile, torch.tensor([[3, 3, 5]])).item() == pytest.approx(
        0.1399, abs=1e-4
    )
    assert script.SMOKE_SUITES["hv15_720p"].flavor == "hunyuanvideo15_tiny"
