"""Wan 2.2: the published flavors, TI2V-5B's 48-channel text-to-video mode against diffusers,
and the two-expert model (routing, capture, config, loading both experts from a folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dit_testing import build, make_batch, original, run, run_original

from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.experts import ExpertDiT, expert_sigma_range, model_parts, window_plans

FULL = [5, 4, 4]  # the whole (5, 8, 8) canvas with tile (1, 2, 2)


def experts(seed: int = 0, **attention) -> ExpertDiT:
    attention.setdefault("backend", "reference")
    torch.manual_seed(seed)
    dit = build_model(ModelConfig(flavor="wan22_tiny_experts"), AttentionConfig(**attention))
    assert isinstance(dit, ExpertDiT)
    return dit


def test_published_wan22_shapes_build_on_meta() -> None:
    """TI2V-5B: 30 layers of 24 x 128 heads, 48 channels, ~5B parameters; T2V-A14B: two experts
    of the Wan 2.1 14B shape (~14B parameters each) switching at 0.875; I2V-A14B at 0.9."""
    ti2v = build_model(ModelConfig(flavor="wan2.2_ti2v_5b"), AttentionConfig(), device="meta")
    assert (ti2v.num_layers, ti2v.num_heads, ti2v.head_dim, ti2v.in_channels) == (30, 24, 128, 48)
    assert 4.9e9 < sum(p.numel() for p in ti2v.parameters()) < 5.1e9
    a14b = build_model(ModelConfig(flavor="wan2.2_t2v_a14b"), AttentionConfig(), device="meta")
    assert isinstance(a14b, ExpertDiT) and a14b.boundary_timestep == 875.0
    assert (a14b.num_layers, a14b.num_heads, a14b.in_channels) == (40, 40, 16)
    for part in model_parts(a14b).values():
        assert 14.0e9 < sum(p.numel() for p in part.parameters()) < 14.5e9
    # I2V-A14B: the same experts taking 36 channels (20 of condition) and no image states
    i2v = build_model(ModelConfig(flavor="wan2.2_i2v_a14b"), AttentionConfig(), device="meta")
    assert isinstance(i2v, ExpertDiT) and i2v.boundary_timestep == 900.0
    assert (i2v.num_layers, i2v.num_heads, i2v.in_channels) == (40, 40, 16)
    for part in model_parts(i2v).values():
        assert (part.image_dims.condition_channels, part.image_dims.embed_dim) == (20, None)
        assert 14.0e9 < sum(p.numel() for p in part.parameters()) < 14.5e9


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_ti2v_text_to_video_matches_diffusers(mode: str) -> None:
    """The 48-channel TI2V-like model with full windows (or dense) equals diffusers' dense
    model called as WanPipeline's ``expand_timesteps`` mode does: one timestep per token."""
    dit = build("wan22_tiny_ti2v", mode=mode, window=FULL)
    b = make_batch()
    b["latents"] = torch.randn(2, 48, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    per_token = {**b, "timestep": b["timestep"][:, None].expand(2, 5 * 8 * 8)}  # (B, S)
    with torch.no_grad():
        expected = run_original(original(dit), "wan", per_token)
        got = run(dit, b)
    assert got.shape == (2, 48, 5, 16, 16)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_ti2v_image_to_video_matches_diffusers(mode: str) -> None:
    """TI2V's image-to-video mode (``model.image_to_video``) with full windows (or dense)
    equals diffusers' dense model called as WanImageToVideoPipeline's ``expand_timesteps``
    mode does: the first latent frame is the clean condition, its tokens at timestep 0."""
    torch.manual_seed(0)
    dit = build_model(ModelConfig(flavor="wan22_tiny_ti2v", image_to_video=True),
                      AttentionConfig(mode=mode, window=FULL, backend="reference"))  # fmt: skip
    assert dit.image_dims is not None and dit.image_dims.first_frame and dit.in_channels == 48
    b = make_batch()
    g = torch.Generator().manual_seed(2)
    b["latents"] = torch.randn(2, 48, 5, 16, 16, generator=g)
    first = torch.randn(2, 48, 1, 16, 16, generator=g)  # the image's clean latent
    mask = torch.ones(1, 1, 5, 16, 16)
    mask[:, :, 0] = 0  # diffusers' first_frame_mask
    per_token = mask[0, 0][:, ::2, ::2].flatten()[None] * b["timestep"][:, None]  # (B, S)
    expected_in = {**b, "latents": (1 - mask) * first + mask * b["latents"], "timestep": per_token}
    with torch.no_grad():
        expected = run_original(original(dit), "wan", expected_in)
        got = run(dit, b, image_latents=first)
        # the model input ignores the noisy first frame
        b["latents"][:, :, 0] = 0
        again = run(dit, b, image_latents=first)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"must be \(B, C, 1, H, W\)"):
        run(dit, b, image_latents=first.expand(2, 48, 5, 16, 16))
    with pytest.raises(ValueError, match="needs image_latents"):
        run(dit, b)
    with pytest.raises(ValueError, match="model.image_to_video applies to flavors"):
        ModelConfig(flavor="wan_tiny", image_to_video=True)


def test_each_sample_runs_on_the_expert_of_its_timestep() -> None:
    dit = experts(window=[3, 3, 3])
    b = make_batch()  # timesteps 37 (low expert) and 812 (high expert), boundary 500
    with torch.no_grad():
        got = run(dit, b)
        for row, expert in ((0, dit.low), (1, dit.high)):
            one = {k: v[row : row + 1] for k, v in b.items()}
            torch.testing.assert_close(got[row : row + 1], run(expert, one), atol=1e-6, rtol=1e-6)
        b["timestep"] = torch.tensor([500.0, 499.9])  # the boundary itself is the high expert's
        torch.testing.assert_close(run(dit, b)[0], run(dit.high, b)[0])
        assert not torch.allclose(run(dit, b)[1], run(dit.high, b)[1], atol=1e-4)


def test_capture_records_the_running_expert_and_refuses_a_mixed_batch() -> None:
    dit = experts()
    b = make_batch()
    with torch.no_grad(), dit.capture(detach=True) as store:
        high = {k: v[1:] for k, v in b.items()}
        out = run(dit, high)
        assert sorted(store.layers) == [0, 1] and torch.equal(store["final"], out)
        with dit.high.capture(detach=True) as reference:
            run(dit.high, high)
        torch.testing.assert_close(store[1], reference[1])
        with pytest.raises(ValueError, match="one side of the boundary timestep 500"):
            run(dit, b)


def test_each_expert_has_its_own_windows(tmp_path: Path) -> None:
    from stafinetune.models import MaskStrategy

    low = tmp_path / "low.json"
    plan = build("wan_tiny", window=[1, 1, 1]).plan
    MaskStrategy.from_plan(plan, canvas=[5, 8, 8], tile=[1, 2, 2]).save(low)
    dit = experts(window=[3, 3, 3], strategy_path_2=str(low))
    plans = window_plans(dit)
    assert sorted(plans) == ["transformer", "transformer_2"]
    assert (plans["transformer"].train == 3).all() and (plans["transformer_2"].train == 1).all()
    assert dit.low.attention is dit.high.attention  # one kernel module, two window plans


def test_both_experts_load_from_a_local_pipeline_folder(tmp_path: Path) -> None:
    saved = experts(seed=3)
    saved.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    for expert in ("both", "high", "low"):
        cfg = ModelConfig(flavor="wan22_tiny_experts", path=str(tmp_path / "pipe"), expert=expert)
        loaded = build_model(cfg, AttentionConfig())
        if expert == "both":
            reference = saved.state_dict()
        else:
            reference = getattr(saved, expert).state_dict()
        got = loaded.state_dict()
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in got), expert
    (tmp_path / "pipe" / "transformer_2" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"looked for config.json in <path>/transformer_2\)"):
        build_model(ModelConfig(flavor="wan22_tiny_experts", path=str(tmp_path / "pipe")),
                    AttentionConfig())  # fmt: skip


def test_expert_config() -> None:
    cfg = ModelConfig(flavor="wan2.2_t2v_a14b")
    assert (cfg.expert, cfg.boundary_ratio) == ("both", 0.875)
    assert expert_sigma_range("high", 0.875) == (0.875, 1.0)
    assert expert_sigma_range("low", 0.875) == (0.0, 0.875)
    assert expert_sigma_range(None, None) == (0.0, 1.0)
    with pytest.raises(ValueError, match="model.expert must be one of"):
        ModelConfig(flavor="wan2.2_t2v_a14b", expert="middle")
    with pytest.raises(ValueError, match=r"model.boundary_ratio must lie in \(0, 1\)"):
        ModelConfig(flavor="wan2.2_t2v_a14b", boundary_ratio=1.0)
    with pytest.raises(ValueError, match="apply to two-expert flavors"):
        ModelConfig(flavor="wan2.2_ti2v_5b", expert="high")
