"""``enable_sta`` / ``disable_sta`` in real diffusers WanPipeline and HunyuanVideoPipeline runs.

Every pipeline is assembled from tiny random local parts (``pipeline_testing``) and runs fp32
on the CPU with the reference STA backend, so the comparisons are tight.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_testing import (
    FLAVORS,
    FULL_WINDOW,
    NEGATIVE,
    TILE,
    CallRecorder,
    build_dit,
    conditioning,
    generate,
    hunyuan_pipeline,
    noise_of,
    plain_copy,
    replay,
    step_strategy,
    student,
    wan_pipeline,
)

from stafinetune import disable_sta, enable_sta
from stafinetune.diffusion.sampling import sample_latents
from stafinetune.models.binding import BINDING_ATTRIBUTE, binding_of
from stafinetune.models.families import get_family

STEPS = 4
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", params=["wan", "hunyuan"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def setup(family: str) -> dict[str, Any]:
    """A dense pipeline of one family, its dense output and the conditioning it encodes."""
    dit = build_dit(FLAVORS[family], mode="full")
    make = wan_pipeline if family == "wan" else hunyuan_pipeline
    pipe = make(plain_copy(dit), STEPS)
    processors = [attn.processor for attn in get_family(family).sta_layers(pipe.transformer)]
    return {
        "pipe": pipe,
        "dense": generate(pipe, STEPS),
        "cond": conditioning(pipe),
        "flavor": FLAVORS[family],
        "originals": processors,
    }


@pytest.fixture
def pipe(setup: dict[str, Any]) -> Iterator[Any]:
    """The module's pipeline, with STA turned off again after the test."""
    yield setup["pipe"]
    disable_sta(setup["pipe"])


def guided(pipe: Any) -> dict[str, Any]:
    """Pipeline arguments that make two transformer calls per step (classifier-free guidance)."""
    if type(pipe).__name__ == "WanPipeline":
        return {"guidance_scale": 5.0, "negative_prompt": NEGATIVE}
    return {"true_cfg_scale": 5.0, "negative_prompt": NEGATIVE}


def test_full_windows_equal_the_dense_pipeline(setup: dict[str, Any], pipe: Any) -> None:
    enable_sta(pipe, tile=TILE, window=FULL_WINDOW)
    torch.testing.assert_close(generate(pipe, STEPS), setup["dense"], **TIGHT)
    enable_sta(pipe, tile=TILE, window=[3, 3, 3])  # a second call replaces the settings
    assert len(pipe.transformer._forward_pre_hooks) == 1
    assert (generate(pipe, STEPS) - setup["dense"]).abs().max() > 1e-3


def test_disable_restores_diffusers_bit_for_bit(setup: dict[str, Any], pipe: Any) -> None:
    transformer = pipe.transformer
    enable_sta(pipe, tile=TILE, window=[3, 1, 3])
    assert binding_of(transformer) is not None
    sparse = generate(pipe, STEPS)
    disable_sta(pipe)
    layers = get_family("wan" if setup["flavor"] == "wan_tiny" else "hunyuan").sta_layers(transformer)
    assert all(a.processor is b for a, b in zip(layers, setup["originals"], strict=True))
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks
    assert not hasattr(transformer, BINDING_ATTRIBUTE)
    assert torch.equal(generate(pipe, STEPS), setup["dense"])
    assert not torch.equal(sparse, setup["dense"])
    disable_sta(pipe)  # nothing to undo: a no-op


def test_strategy_pipeline_equals_our_sampler(
    setup: dict[str, Any], pipe: Any, tmp_path: Path
) -> None:
    """Per-step windows follow the pipeline's loop: its latents are our sampler's, same seed."""
    path = tmp_path / "mask_strategy.json"
    step_strategy(STEPS).save(path)
    enable_sta(pipe, strategy=path, dense_first_steps=1)
    got = generate(pipe, STEPS, seed=3)
    cond = setup["cond"]
    expected = sample_latents(student(setup["flavor"], path, dense_first_steps=1), noise_of(3),
                              cond["text"], cond["text_mask"], cond["pooled_text"], steps=STEPS)  # fmt: skip
    torch.testing.assert_close(got, expected, **TIGHT)
    assert torch.equal(generate(pipe, STEPS, seed=3), got)  # the next run counts from 0 again
    disable_sta(pipe)
    assert (got - generate(pipe, STEPS, seed=3)).abs().max() > 1e-3


def test_guidance_calls_share_their_step(setup: dict[str, Any], pipe: Any, tmp_path: Path) -> None:
    """Two calls per step (cond, uncond) get the same windows; the count restarts per run."""
    path = tmp_path / "mask_strategy.json"
    step_strategy(STEPS, seed=1).save(path)
    enable_sta(pipe, strategy=path)
    recorder = CallRecorder(pipe.transformer)
    first = generate(pipe, STEPS, **guided(pipe))
    recorder.remove()
    assert len(recorder.calls) == 2 * STEPS
    reference = student(setup["flavor"], path)
    for i, call in enumerate(recorder.calls):
        torch.testing.assert_close(replay(reference, call, i // 2), call["output"], **TIGHT)
    assert torch.equal(generate(pipe, STEPS, **guided(pipe)), first)  # a new run: step 0 again
