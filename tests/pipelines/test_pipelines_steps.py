"""How ``enable_sta`` numbers denoising steps, the exported student in a pipeline, and errors.

Wan only: the step counting lives in the shared binding, the family-specific parts are
covered by ``test_pipelines_enable_sta``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pipeline_testing import (
    FULL_WINDOW,
    TILE,
    CallRecorder,
    build_dit,
    conditioning,
    generate,
    noise_of,
    plain_copy,
    replay,
    step_strategy,
    student,
    wan_pipeline,
)

from stafinetune import disable_sta, enable_sta, sta_step
from stafinetune.diffusion.sampling import Schedule, sample_latents
from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, build_model
from stafinetune.models.binding import StepTracker, binding_of

STEPS = 4
TIGHT = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def cond() -> dict[str, Any]:
    """The prompt's text states from the tiny Wan pipeline's own tokenizer and UMT5."""
    return conditioning(wan_pipeline(plain_copy(build_dit("wan_tiny", mode="full")), STEPS))


def test_step_tracker_rules() -> None:
    tracker = StepTracker()
    timesteps = [999.0, 999.0, 800.0, 800.0, 100.0, 999.0, 5.0]
    assert [tracker.observe(torch.tensor(t)) for t in timesteps] == [0, 0, 1, 1, 2, 0, 1]
    assert tracker.observe(torch.tensor([[0.0, 7.0], [7.0, 7.0]])) == 0  # above 5: a new run
    tracker.reset()
    assert tracker.observe(1.0) == 0


def test_doubled_batch_guidance_and_per_token_timesteps(tmp_path: Path) -> None:
    """A loop that batches cond and uncond into one call, with (B,) or Wan 2.2's per-token
    (B, S) timesteps, is counted by its timesteps; a second loop starts at step 0."""
    path = tmp_path / "mask_strategy.json"
    step_strategy(STEPS, seed=2).save(path)
    transformer = plain_copy(build_dit("wan_tiny", mode="full"))
    enable_sta(transformer, strategy=path)
    reference = student("wan_tiny", path)
    x, text = torch.randn(2, 16, 5, 16, 16), torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    ts = [1000.0, 750.0, 500.0, 250.0]
    with torch.no_grad():
        expected = [reference(x, torch.full((2,), t), text, mask, step_index=i) for i, t in enumerate(ts)]  # fmt: skip
        for shape in ((2,), (2, 320)):
            for i, t in enumerate(ts):
                out = transformer(x, torch.full(shape, t), text, return_dict=False)[0]
                torch.testing.assert_close(out, expected[i], **TIGHT)
        with sta_step(transformer, 1):  # a hand-written loop can say the step itself
            out = transformer(x, torch.full((2,), 3.0), text, return_dict=False)[0]
    torch.testing.assert_close(out, reference(x, torch.full((2,), 3.0), text, mask, step_index=1), **TIGHT)  # fmt: skip


def test_two_transformers_share_the_step_count(tmp_path: Path) -> None:
    """Wan 2.2 style: transformer_2 takes over below the boundary at the pipeline's step."""
    path = tmp_path / "mask_strategy.json"
    step_strategy(STEPS, seed=4).save(path)
    high, low = (plain_copy(build_dit("wan_tiny", seed=s, mode="full")) for s in (0, 1))
    pipe = wan_pipeline(high, STEPS, transformer_2=low, boundary_ratio=0.4)
    enable_sta(pipe, strategy=path)
    recorders = CallRecorder(pipe.transformer), CallRecorder(pipe.transformer_2)
    generate(pipe, STEPS)
    # timesteps 1000, 750, 500 >= 400 run on transformer, 250 on transformer_2 as step 3
    assert [len(r.calls) for r in recorders] == [3, 1]
    for seed, recorder, first in ((0, recorders[0], 0), (1, recorders[1], 3)):
        reference = student("wan_tiny", path, seed=seed)
        for i, call in enumerate(recorder.calls):
            torch.testing.assert_close(replay(reference, call, first + i), call["output"], **TIGHT)


def test_exported_student_runs_in_the_pipeline(cond: dict[str, Any], tmp_path: Path) -> None:
    """Base pipeline + ``export/transformer`` + ``export/mask_strategy.json`` = the student.

    A finetune exports one step-independent window per (layer, head); a one-step strategy
    applies to every denoising step."""
    from diffusers import WanTransformer3DModel

    export = tmp_path / "export"
    trained = build_dit("wan_tiny", seed=7, window=[3, 1, 3])  # stands in for a finetuned student
    trained.save_pretrained(export / "transformer")
    MaskStrategy.from_plan(trained.plan, canvas=[5, 8, 8], tile=TILE).save(export / "mask_strategy.json")  # fmt: skip
    pipe = wan_pipeline(WanTransformer3DModel.from_pretrained(export / "transformer"), STEPS)
    enable_sta(pipe, strategy=export / "mask_strategy.json")
    rebuilt = build_model(
        ModelConfig(path=str(export / "transformer")),
        AttentionConfig(strategy_path=str(export / "mask_strategy.json")),
    )
    expected = sample_latents(rebuilt, noise_of(5), cond["text"], cond["text_mask"], steps=STEPS)
    torch.testing.assert_close(generate(pipe, STEPS, seed=5), expected, **TIGHT)


@pytest.mark.parametrize("stochastic", [False, True])
def test_a_few_step_export_samples_as_the_student(
    cond: dict[str, Any], tmp_path: Path, stochastic: bool
) -> None:
    """A few-step student's strategy carries its schedule: ``enable_sta`` gives the pipeline
    the student's scheduler, and the pipeline samples as ``sample_latents`` with it (exactly
    for Euler steps; a stochastic schedule's fresh noise comes from the pipeline's own
    generator, so there the levels and the re-noising are checked)."""
    from diffusers import WanTransformer3DModel

    schedule = Schedule((1.0, 0.6, 0.3), stochastic=stochastic)
    export = tmp_path / "export"
    trained = build_dit("wan_tiny", seed=7, window=[3, 1, 3])
    trained.save_pretrained(export / "transformer")
    sampling = {**schedule.to_dict(), "guidance_scale": 1.0}
    MaskStrategy.from_plan(trained.plan, canvas=[5, 8, 8], tile=TILE,
                           metadata={"sampling": sampling}).save(export / "mask_strategy.json")  # fmt: skip
    pipe = wan_pipeline(WanTransformer3DModel.from_pretrained(export / "transformer"), STEPS)
    original = pipe.scheduler
    enable_sta(pipe, strategy=export / "mask_strategy.json")
    assert pipe.scheduler is not original and pipe.scheduler.config.stochastic_sampling == stochastic
    recorder = CallRecorder(pipe.transformer)
    latents = generate(pipe, 3, seed=5)
    assert [float(c["timestep"].flatten()[0]) for c in recorder.calls] == pytest.approx(
        [1000.0, 600.0, 300.0]
    )
    rebuilt = build_model(
        ModelConfig(path=str(export / "transformer")),
        AttentionConfig(strategy_path=str(export / "mask_strategy.json")),
    )
    if not stochastic:
        expected = sample_latents(rebuilt, noise_of(5), cond["text"], cond["text_mask"],
                                  schedule=schedule)  # fmt: skip
        torch.testing.assert_close(latents, expected, **TIGHT)
    with pytest.raises(ValueError, match="samples in 3 steps: call the pipeline with "
                                         "num_inference_steps=3"):  # fmt: skip
        generate(pipe, STEPS)
    disable_sta(pipe)
    assert pipe.scheduler is original


def test_a_videodit_transformer_follows_a_pipeline(cond: dict[str, Any]) -> None:
    """One mechanism: a ``VideoDiT``'s own transformer in a pipeline counts the steps too."""
    dit = build_dit("wan_tiny", window=[3, 3, 1], dense_first_steps=2)
    pipe = wan_pipeline(dit.transformer, STEPS)
    expected = sample_latents(dit, noise_of(1), cond["text"], cond["text_mask"], steps=STEPS)
    torch.testing.assert_close(generate(pipe, STEPS, seed=1), expected, **TIGHT)
    with pytest.raises(ValueError, match="belongs to a VideoDiT.*set_attention"):
        enable_sta(pipe, tile=TILE, window=FULL_WINDOW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": TILE}, "needs either strategy= or window="),
        ({"window": [3, 3, 3]}, r"window=\.\.\.\) needs tile="),
        ({"tile": TILE, "window": [3, 3]}, r"must be \(3,\), \(2, 3\) or \(2, 4, 3\)"),
        ({"tile": TILE, "window": [3, 0, 3]}, ">= 1 tile"),
        ({"tile": [1, 2], "window": [3, 3, 3]}, r"enable_sta\(tile=\.\.\.\)"),
        ({"tile": TILE, "window": [3, 3, 3], "backend": "cuda"}, "backend"),
        ({"tile": TILE, "window": [3, 3, 3], "dense_first_steps": -1}, "dense_first_steps"),
        ({"tile": TILE, "window": [3, 3, 3], "fp8": "yes"}, r"fp8=\.\.\.\) must be True or False"),
        ({"tile": TILE, "window": [3, 3, 3], "fp8": True, "backend": "reference"},
         "fp8=True\\) runs the triton backend"),
        ({"strategy": "two_steps", "tile": [1, 1, 1]}, r"differs from the tile \[1, 2, 2\]"),
        ({"strategy": "three_heads"}, "must hold 4 heads"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], message: str) -> None:
    transformer = plain_copy(build_dit("wan_tiny", mode="full"))
    enable_sta(transformer, tile=TILE, window=[3, 3, 3])
    before = binding_of(transformer)
    if "strategy" in kwargs:
        heads = 3 if kwargs["strategy"] == "three_heads" else 4
        kwargs["strategy"] = step_strategy(2, heads=heads)
    with pytest.raises(ValueError, match=message):
        enable_sta(transformer, **kwargs)
    assert binding_of(transformer) is before  # a bad call leaves the previous settings


def test_other_models_and_short_strategies_fail_clearly() -> None:
    with pytest.raises(TypeError, match="WanTransformer3DModel and HunyuanVideoTransformer3DModel"):
        enable_sta(torch.nn.Linear(2, 2), tile=TILE, window=[3, 3, 3])
    with pytest.raises(TypeError, match="pipeline with a transformer"):
        enable_sta(object(), tile=TILE, window=[3, 3, 3])
    pipe = wan_pipeline(plain_copy(build_dit("wan_tiny", mode="full")), 3)
    enable_sta(pipe, strategy=step_strategy(2))
    with pytest.raises(ValueError, match="step_index=2 but the mask strategy.*inference steps"):
        generate(pipe, 3)
    assert binding_of(pipe.transformer).runtime.state is None  # the failed forward cleaned up


def test_fp8_reaches_the_attention_and_names_its_scope() -> None:
    """``enable_sta(fp8=True)`` hands fp8 to the attention of sampling calls; on this CPU
    model the FP8 kernel cannot run, and the pipeline's first forward says why."""
    pipe = wan_pipeline(plain_copy(build_dit("wan_tiny", mode="full")), 2)
    enable_sta(pipe, tile=TILE, window=[3, 3, 3], fp8=True)
    assert binding_of(pipe.transformer).attention.fp8
    with pytest.raises(ValueError, match="fp8=True: the FP8 kernel needs a CUDA"):
        generate(pipe, 2)
    enable_sta(pipe, tile=TILE, window=[3, 3, 3])
    assert not binding_of(pipe.transformer).attention.fp8
