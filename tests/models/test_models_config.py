"""Config validation, flavors (real shapes on the meta device), export and local loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dit_testing import build, make_batch, run
from omegaconf import OmegaConf

from stafinetune.models import AttentionConfig, ModelConfig, build_model, reset_rope_buffers


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "sparse"}, r"attention.mode must be one of \('full', 'sta'\), got 'sparse'"),
        ({"backend": "cuda"}, r"attention.backend must be one of"),
        ({"tile": [1, 2]}, r"attention.tile must be a list of 3 positive ints"),
        ({"window": [3, 0, 3]}, r"attention.window must be a list of 3 positive ints"),
        ({"window": [3, 2.5, 3]}, r"attention.window must hold integers"),
        ({"layer_windows": [[3, 3, 3], [1, 1]]}, r"attention.layer_windows\[1\] must be"),
        ({"head_windows": [[[3, 3, 3]], [[3, 3, 3], [1, 1, 1]]]}, r"attention.head_windows must give the same"),
        ({"head_windows": [[[3, 3, -1]]]}, r"attention.head_windows\[0\]\[0\] must be"),
        ({"dense_first_steps": -1}, r"attention.dense_first_steps must be an int >= 0"),
    ],
)
def test_attention_config_errors_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**kwargs)


def test_model_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"model.flavor must be one of \[.*'wan_tiny'.*\], got 'wan3'"):
        ModelConfig(flavor="wan3")
    with pytest.raises(ValueError, match="model.config_overrides only applies"):
        ModelConfig(path="/some/dir", config_overrides={"num_layers": 1})
    with pytest.raises(ValueError, match="model.config_overrides has a key"):
        build_model(ModelConfig(config_overrides={"num_blocks": 1}), AttentionConfig())


def test_window_shapes_checked_against_the_model() -> None:
    with pytest.raises(ValueError, match="attention.layer_windows must give 2 windows"):
        build("wan_tiny", layer_windows=[[3, 3, 3]] * 3)
    with pytest.raises(ValueError, match=r"attention.head_windows must be 2 layers x 4 heads.*got 2 x 3"):
        build("hunyuan_tiny", head_windows=[[[3, 3, 3]] * 3] * 2)


def test_layer_windows_apply_per_layer() -> None:
    b = make_batch(batch=1)
    with torch.no_grad():
        mixed = run(build("wan_tiny", layer_windows=[[5, 4, 4], [1, 1, 1]]), b)
        same = run(build("wan_tiny", head_windows=[[[5, 4, 4]] * 4, [[1, 1, 1]] * 4]), b)
        other = run(build("wan_tiny", layer_windows=[[1, 1, 1], [5, 4, 4]]), b)
    torch.testing.assert_close(mixed, same)
    assert (mixed - other).abs().max() > 1e-3


def test_strict_window_rejects_windows_wider_than_the_canvas() -> None:
    b = make_batch(batch=1)
    relaxed = build("wan_tiny", window=[9, 4, 4])
    with torch.no_grad():
        run(relaxed, b)  # clipped to the whole axis
    strict = build("wan_tiny", window=[9, 4, 4], strict_window=True)
    with pytest.raises(ValueError, match=r"attention.window: window \[9, 4, 4\].*tile grid \[5, 4, 4\]"):
        run(strict, b)


def test_omegaconf_nodes_are_accepted() -> None:
    """The trainer may pass Hydra's DictConfig nodes; they become validated dataclasses."""
    model = OmegaConf.structured(ModelConfig)
    attention = OmegaConf.structured(AttentionConfig(mode="sta", window=[3, 3, 3], backend="reference"))
    dit = build_model(model, attention, device="cpu", dtype=torch.float32)
    assert isinstance(dit.attention_cfg, AttentionConfig) and dit.attention_cfg.window == [3, 3, 3]
    with pytest.raises(ValueError, match="attention.mode"):
        dit.set_attention(OmegaConf.create({"mode": "bogus"}))


def test_yaml_values_are_dataclass_fields() -> None:
    """Every YAML under conf/model and conf/attention sets only valid fields of the dataclasses.

    Interpolated values (e.g. ``${stafinetune.asset:...}``) are left to the job's resolvers.
    """
    conf = Path(__file__).resolve().parents[2] / "conf"
    for group, cls in (("model", ModelConfig), ("attention", AttentionConfig)):
        files = sorted((conf / group).glob("*.yaml"))
        assert files
        for path in files:
            raw = OmegaConf.load(path)
            unknown = set(raw.keys()) - set(cls.__dataclass_fields__)
            assert not unknown, f"{path.name} sets unknown fields {sorted(unknown)}"
            OmegaConf.merge(OmegaConf.structured(cls), raw)  # types check
            literal = {k: raw[k] for k in raw if not OmegaConf.is_interpolation(raw, k)}
            cls(**OmegaConf.to_container(OmegaConf.create(literal)))  # __post_init__ validation


@pytest.mark.parametrize(
    ("flavor", "family", "layers", "heads", "billions"),
    [
        ("wan2.1_t2v_1.3b", "wan", 30, 12, (1.2, 1.6)),
        ("wan2.1_t2v_14b", "wan", 40, 40, (13.0, 15.0)),
        ("hunyuanvideo_13b", "hunyuan", 60, 24, (12.0, 13.5)),
        # the I2V transformer: 16.4B with its image embedder and added k/v projections
        ("wan2.1_i2v_14b_480p", "wan", 40, 40, (16.0, 17.0)),
        ("wan2.1_i2v_14b_720p", "wan", 40, 40, (16.0, 17.0)),
    ],
)
def test_real_flavors_build_on_meta(flavor: str, family: str, layers: int, heads: int, billions: tuple) -> None:
    dit = build_model(ModelConfig(flavor=flavor), AttentionConfig(tile=[6, 8, 8]), device="meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in dit.parameters()) / 1e9
    assert (dit.family, dit.num_layers, dit.num_heads, dit.head_dim) == (family, layers, heads, 128)
    assert billions[0] < params < billions[1]
    assert dit.patch_size == (1, 2, 2) and dit.in_channels == 16 and dit.text_dim == 4096
    assert dit.pooled_dim == (768 if family == "hunyuan" else None)
    assert dit.canvas_for((16, 21, 60, 104)) == (21, 30, 52)
    assert all(p.is_meta for p in dit.parameters())


def test_canvas_for_rejects_indivisible_latents() -> None:
    dit = build("wan_tiny")
    with pytest.raises(ValueError, match="latent H=15 is not a positive multiple of the patch size 2"):
        dit.canvas_for((1, 16, 5, 15, 16))


def test_export_and_load_from_local_directory(tmp_path: Path, flavor: str) -> None:
    """save_pretrained writes diffusers format; build_model(path=...) loads it back exactly."""
    dit = build(flavor, mode="sta", window=[3, 3, 3], seed=3)
    b = make_batch()
    with torch.no_grad():
        expected = run(dit, b)
    out_dir = tmp_path / "student"
    dit.save_pretrained(out_dir)
    assert (out_dir / "config.json").is_file()
    assert list(out_dir.glob("*.safetensors"))
    saved_attention = json.loads((out_dir / "stafinetune_attention.json").read_text())
    assert saved_attention["window"] == [3, 3, 3]

    # a pipeline-style root holding transformer/ loads too
    pipeline_root = tmp_path / "pipeline"
    shutil.copytree(out_dir, pipeline_root / "transformer")
    for path in (out_dir, pipeline_root):
        loaded = build_model(
            ModelConfig(flavor=flavor, path=str(path)),
            AttentionConfig(mode="sta", window=[3, 3, 3], backend="reference"),
        )
        with torch.no_grad():
            torch.testing.assert_close(run(loaded, b), expected, atol=0, rtol=0)

    other = "hunyuan_tiny" if flavor == "wan_tiny" else "wan_tiny"
    with pytest.raises(ValueError, match="but model.flavor is a"):
        build_model(ModelConfig(flavor=other, path=str(out_dir)), AttentionConfig())
    with pytest.raises(ValueError, match="holds no diffusers transformer"):
        build_model(ModelConfig(flavor=flavor, path=str(tmp_path / "empty")), AttentionConfig())


def test_bf16_keeps_diffusers_fp32_modules() -> None:
    torch.manual_seed(0)
    dit = build_model(ModelConfig(), AttentionConfig(backend="reference"), dtype=torch.bfloat16)
    t = dit.transformer
    assert t.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert t.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert t.blocks[0].scale_shift_table.dtype == torch.float32
    with torch.no_grad():
        out = run(dit, make_batch(batch=1))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_triton_backend_on_cpu_fails_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention.backend=triton needs a CUDA device"):
        build("wan_tiny", backend="triton")
    dit = build("wan_tiny", mode="full", backend="triton")  # dense: the backend is never used
    with pytest.raises(ValueError, match="attention.backend=triton"):
        dit.set_attention(AttentionConfig(backend="triton"))


def test_fp8_is_checked_at_build() -> None:
    """attention.fp8 needs the triton backend on a GPU: a CPU model or another backend fails
    when the model is built, not at the first sampling step."""
    with pytest.raises(ValueError, match="attention.fp8 must be true or false"):
        AttentionConfig(fp8="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention.fp8=true runs the triton backend"):
        build_model(ModelConfig(), AttentionConfig(fp8=True))
    dit = build("wan_tiny", mode="full")
    with pytest.raises(ValueError, match="attention.backend=reference"):
        dit.set_attention(AttentionConfig(backend="reference", fp8=True))


def test_meta_build_then_materialize(flavor: str) -> None:
    """Build on meta, allocate, load weights: reset_rope_buffers restores non-persistent state."""
    source = build(flavor, mode="sta", window=[3, 3, 3], seed=5)
    dit = build_model(
        ModelConfig(flavor=flavor),
        AttentionConfig(mode="sta", window=[3, 3, 3], backend="reference"),
        device="meta",
    )
    dit.to_empty(device="cpu")
    dit.load_state_dict(source.state_dict())
    reset_rope_buffers(dit, "cpu")
    b = make_batch(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(run(dit, b), run(source, b), atol=0, rtol=0)
