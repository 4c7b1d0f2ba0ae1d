"""diffusers features combined with ``enable_sta``: offloading, attention backends, fused
projections, the cache hooks and ``save_pretrained`` / ``from_pretrained``.

Each feature, with STA at windows covering the whole tile grid, gives the output of the same
feature on diffusers' own processors, whether STA comes first or second. At sparse windows a
feature that keeps the numerics (offloading, backends, fusion) gives STA's output without it;
a cache changes it, as it changes the dense model's. On the CPU the offloading hooks load
onto the CPU itself; the GPU test moves weights for real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from pipeline_testing import (
    FULL_WINDOW,
    TILE,
    generate,
    hunyuan_pipeline,
    tiny_transformer,
    transformer_inputs,
    wan_pipeline,
)

from stafinetune import enable_sta
from stafinetune.models.attention import RuntimeProcessor
from stafinetune.models.binding import binding_of
from stafinetune.models.families import get_family

STEPS = 6  # the caches skip work from the second or third step on
SPARSE = [3, 1, 3]
TIGHT = {"atol": 1e-5, "rtol": 1e-5}
CPU = torch.device("cpu")
BACKEND = "_native_math"  # an attention backend that runs on the CPU


def _pipeline(family: str) -> Any:
    make = wan_pipeline if family == "wan" else hunyuan_pipeline
    return make(tiny_transformer(family), STEPS)


def _sequential_offload(pipe: Any, device: torch.device) -> None:
    """What ``enable_sequential_cpu_offload`` does to the transformer: weights on the meta
    device, loaded per module by accelerate's hooks (the tiny UMT5's tied embedding fails
    under accelerate on the CPU, STA or not, so the pipeline's own call is left to the GPU)."""
    from accelerate import cpu_offload

    cpu_offload(pipe.transformer, device, offload_buffers=len(pipe.transformer._parameters) > 0)


def _first_block_cache(pipe: Any) -> None:
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))


def _pyramid_attention_broadcast(pipe: Any) -> None:
    pipe.transformer.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    )


def _faster_cache(pipe: Any) -> None:
    pipe.transformer.enable_cache(
        FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            current_timestep_callback=lambda: pipe.current_timestep,
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,  # these pipelines run guidance as separate calls
        )
    )


def _group_offloading(kind: str) -> Callable[[Any], None]:
    def apply(pipe: Any) -> None:
        blocks = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        pipe.transformer.enable_group_offload(CPU, offload_type=kind, **blocks)

    return apply


# name: (apply the feature to a pipeline, whether it keeps the numerics)
FEATURES: dict[str, tuple[Callable[[Any], None], bool]] = {
    "model_cpu_offload": (lambda pipe: pipe.enable_model_cpu_offload(device="cpu"), True),
    "sequential_offload": (lambda pipe: _sequential_offload(pipe, CPU), True),
    "group_offload_blocks": (_group_offloading("block_level"), True),
    "group_offload_leaves": (_group_offloading("leaf_level"), True),
    "attention_backend": (lambda pipe: pipe.transformer.set_attention_backend(BACKEND), True),
    "fused_qkv": (lambda pipe: pipe.transformer.fuse_qkv_projections(), True),
    "first_block_cache": (_first_block_cache, False),
    "pyramid_attention_broadcast": (_pyramid_attention_broadcast, False),
    "faster_cache": (_faster_cache, False),
}


def _assert_in_place(feature: str, transformer: Any) -> None:
    """The feature is on, and STA still owns the STA layers."""
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    family = get_family("wan" if type(transformer).__name__.startswith("Wan") else "hunyuan")
    layers = family.sta_layers(transformer)
    assert binding_of(transformer) is not None
    assert all(isinstance(attn.processor, RuntimeProcessor) for attn in layers)
    if feature == "model_cpu_offload":
        assert hasattr(transformer, "_hf_hook")
    elif feature == "sequential_offload":
        assert all(p.device.type == "meta" for p in transformer.parameters())
    elif feature.startswith("group_offload"):
        assert _is_group_offload_enabled(transformer)
    elif feature == "attention_backend":  # the other processors that have a backend take it
        others = [
            m.processor
            for m in transformer.modules()
            if hasattr(getattr(m, "processor", None), "_attention_backend")
        ]
        assert all(p._attention_backend.value == BACKEND for p in others)
    elif feature == "fused_qkv":  # HunyuanVideo's legacy Attention does not fuse (nor use) q, k, v
        from diffusers.models.attention import AttentionModuleMixin

        fusable = [attn for attn in layers if isinstance(attn, AttentionModuleMixin)]
        assert all(attn.fused_projections for attn in fusable)
        assert fusable or family.name == "hunyuan"
    else:
        assert transformer.is_cache_enabled


def _run(family: str, feature: str | None, window: list[int] | None, sta_first: bool = True):
    """Latents of the family's pipeline with ``feature`` and STA at ``window`` (None: off)."""
    pipe = _pipeline(family)
    apply = (lambda _: None) if feature is None else FEATURES[feature][0]
    if not sta_first:
        apply(pipe)
    if window is not None:
        enable_sta(pipe, tile=TILE, window=window)
    if sta_first:
        apply(pipe)
    if window is not None and feature is not None:
        _assert_in_place(feature, pipe.transformer)
    return generate(pipe, STEPS)


@pytest.fixture(autouse=True)
def _restore_attention_backend() -> Iterator[None]:
    """``set_attention_backend`` also sets diffusers' process-wide active backend: the test's
    change must not reach the next tests."""
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("native"):
        yield


@pytest.fixture(scope="module", params=["wan", "hunyuan"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def plain(family: str) -> dict[str, torch.Tensor]:
    """The family's latents without any feature: dense and with sparse STA."""
    return {"dense": _run(family, None, None), "sparse": _run(family, None, SPARSE)}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_with_sta(family: str, feature: str, plain: dict[str, torch.Tensor]) -> None:
    expected = _run(family, feature, None)  # the feature on diffusers' own processors
    torch.testing.assert_close(_run(family, feature, FULL_WINDOW), expected, **TIGHT)
    torch.testing.assert_close(
        _run(family, feature, FULL_WINDOW, sta_first=False), expected, **TIGHT
    )
    sparse = _run(family, feature, SPARSE)
    if FEATURES[feature][1]:
        torch.testing.assert_close(sparse, plain["sparse"], **TIGHT)
    else:  # the cache acts on both, and STA stays sparse under it
        assert (expected - plain["dense"]).abs().max() > 1e-3
        assert (sparse - plain["sparse"]).abs().max() > 1e-3
        assert (sparse - expected).abs().max() > 1e-3


def test_save_and_load_a_transformer_carrying_sta(family: str, tmp_path: Path) -> None:
    """``save_pretrained`` writes the plain diffusers model (STA is not part of the format);
    ``from_pretrained`` loads it without STA, and ``enable_sta`` brings it back."""
    inputs = transformer_inputs(family)
    transformer = tiny_transformer(family)
    with torch.no_grad():
        dense = transformer(**inputs)[0]
        enable_sta(transformer, tile=TILE, window=SPARSE)
        sparse = transformer(**inputs)[0]
    transformer.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    loaded = type(transformer).from_pretrained(tmp_path)
    assert binding_of(loaded) is None
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], dense)
        enable_sta(loaded, tile=TILE, window=SPARSE)
        assert torch.equal(loaded(**inputs)[0], sparse)


OFFLOADS_ON_GPU: dict[str, Callable[[Any], None]] = {
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(),
    "sequential_cpu_offload": lambda pipe: pipe.enable_sequential_cpu_offload(),
    "group_offload_streams": lambda pipe: pipe.transformer.enable_group_offload(
        torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1, use_stream=True
    ),
    "group_offload_leaves": lambda pipe: pipe.transformer.enable_group_offload(
        torch.device("cuda"), offload_type="leaf_level"
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("offload", list(OFFLOADS_ON_GPU))
def test_offloading_onto_the_gpu(family: str, offload: str) -> None:
    """Weights move between CPU and GPU: at full windows the dense model's offloaded output,
    at sparse windows STA's output on the GPU without offloading."""
    if not torch.cuda.is_available():
        pytest.skip("offloading onto an accelerator needs a CUDA device")

    def run(window: list[int] | None, offloaded: bool) -> torch.Tensor:
        pipe = _pipeline(family)
        if window is not None:
            enable_sta(pipe, tile=TILE, window=window, backend="reference")
        if offloaded:
            OFFLOADS_ON_GPU[offload](pipe)
            if offload.startswith("group_offload"):  # the other components stay on the GPU
                for name in ("text_encoder", "text_encoder_2", "vae"):
                    if getattr(pipe, name, None) is not None:
                        getattr(pipe, name).to("cuda")
        else:
            pipe.to("cuda")
        return generate(pipe, STEPS).cpu()

    expected = run(None, True)  # diffusers alone first: a failure here is not STA's
    torch.testing.assert_close(run(FULL_WINDOW, True), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run(SPARSE, True), run(SPARSE, False), atol=1e-4, rtol=1e-4)
