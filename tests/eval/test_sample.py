"""The sampler: seeds, guidance, weights from checkpoints and exports; the sample command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from eval_testing import DENSE, LATENT_SHAPE, STA, run_command, teacher_config
from torch import nn

from stafinetune.build import validation_batches
from stafinetune.config import TrainConfig
from stafinetune.data import DataConfig, build_text_encoder
from stafinetune.diffusion.sampling import ClassifierFreeGuidance, Schedule, sample_latents
from stafinetune.inference.generate import default_prompts, generate, prompt_noise, read_prompts
from stafinetune.inference.weights import Weights, inference_attention, load_model, resolve_weights
from stafinetune.metrics import read_video
from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, build_model

PROMPTS = ["a red circle moving right at 3 pixels per frame on a grey background",
           "a blue square moving up at 2 pixels per frame on a white background"]  # fmt: skip
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def text_encoder():
    return build_text_encoder(DataConfig())


@pytest.fixture(scope="module")
def teacher():
    return load_model(teacher_config(), STA, Weights("base"), steps=3, device=CPU,
                      dtype=torch.float32)  # fmt: skip


def _latents(dit, text_encoder, prompts, seed, **kwargs) -> list[torch.Tensor]:
    options = {"schedule": Schedule.flow(3), "warmup": False, "progress": False, **kwargs}
    videos = generate(dit, prompts, text_encoder, latent_shape=LATENT_SHAPE, seed=seed, **options)
    assert [v.seed for v in videos] == [seed + k for k in range(len(prompts))]
    return [v.latents for v in videos]


def test_same_seed_same_video_and_each_prompt_its_own_seed(teacher, text_encoder):
    first = _latents(teacher, text_encoder, PROMPTS, seed=5)
    again = _latents(teacher, text_encoder, PROMPTS, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = _latents(teacher, text_encoder, PROMPTS, seed=6)
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # prompt k uses seed + k whatever else is sampled: prompt 1 alone at seed 6 is the same
    alone = _latents(teacher, text_encoder, PROMPTS[1:], seed=6)
    assert torch.equal(alone[0], first[1])
    assert first[0].shape == LATENT_SHAPE and first[0].dtype == torch.float32


def test_guidance_scale_one_is_the_unguided_sampler(teacher, text_encoder):
    guided = _latents(teacher, text_encoder, PROMPTS[:1], seed=3, guidance_scale=1.0)[0]
    text, mask, pooled = text_encoder.encode(PROMPTS[:1])
    plain = sample_latents(teacher, prompt_noise(LATENT_SHAPE, 3), text, mask, pooled, steps=3)
    assert torch.equal(guided, plain[0])
    stronger = _latents(teacher, text_encoder, PROMPTS[:1], seed=3, guidance_scale=4.0)[0]
    assert not torch.allclose(stronger, guided)


class _TextVelocity(nn.Module):
    """Velocity = each sample's mean text state, broadcast (records the batch sizes it sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x, timestep, text, text_mask, pooled=None, *, step_index=None):
        self.batches.append(x.shape[0])
        return text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1).expand_as(x)


def test_guidance_combines_conditional_and_negative_velocities(text_encoder):
    model = _TextVelocity()
    negative = text_encoder.encode(["a dull grey void"])
    text, mask, pooled = text_encoder.encode(PROMPTS)
    x = torch.zeros(2, *LATENT_SHAPE)
    t = torch.full((2,), 500.0)
    v = ClassifierFreeGuidance(model, negative, 3.0)(x, t, text, mask, pooled, step_index=0)
    cond, neg = text.mean(dim=(1, 2)), negative[0].mean()
    expected = neg + 3.0 * (cond - neg)  # (2,)
    torch.testing.assert_close(v[:, 0, 0, 0, 0], expected)
    assert model.batches == [4]  # conditional and negative in one forward
    ClassifierFreeGuidance(model, negative, 1.0)(x, t, text, mask, pooled, step_index=0)
    assert model.batches == [4, 2]  # scale 1: the conditional forward alone


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory):
    """Distil the STA student for 2 steps (export on) on 4 synthetic clips."""
    from stafinetune.config import compose_job_config
    from stafinetune.training.trainer import Trainer

    root = tmp_path_factory.mktemp("short_run")
    job = compose_job_config([
        f"data.root={root / 'data'}", "data.num_clips=4", "data.num_workers=0",
        "data.decode_workers=0", "logging=none", "logging.progress=false", "train.steps=2",
        "train.batch_size=2", "train.lr=1e-2", "train.warmup_steps=0", "train.sample_steps=0",
        "train.ckpt_every=0", "train.device=cpu",
    ])  # fmt: skip
    return job, Trainer(job, root / "run").fit()


def test_an_export_samples_as_the_checkpoint_it_came_from(short_run, text_encoder):
    _, result = short_run
    ckpt, export = (
        resolve_weights(str(result.last_checkpoint)),
        resolve_weights(str(result.export_dir)),
    )
    assert (ckpt.kind, export.kind) == ("checkpoint", "export")
    assert resolve_weights(str(result.run_dir)) == export  # a finished run: its export
    assert export.strategy == result.export_dir / "mask_strategy.json"
    latents = []
    for weights in (ckpt, export, Weights("base")):
        dit = load_model(teacher_config(), STA, weights, steps=3, device=CPU, dtype=torch.float32)
        latents.append(_latents(dit, text_encoder, PROMPTS, seed=0))
    from_ckpt, from_export, from_base = latents
    assert all(torch.equal(a, b) for a, b in zip(from_ckpt, from_export, strict=True))
    assert not torch.allclose(from_ckpt[0], from_base[0])  # the 2 steps changed the weights
    with pytest.raises(ValueError, match="sample.checkpoint=.* is neither an export"):
        resolve_weights(str(result.run_dir / "checkpoints"))


def test_default_prompts_are_the_training_validation_captions(short_run):
    job, _ = short_run
    val = validation_batches(job.data, batch_size=TrainConfig().batch_size, seed=0, count=2)
    captions = [c for batch in val for c in batch["caption"]]
    assert default_prompts(job.data, 3, verbose=False) == captions[:3]
    with pytest.raises(ValueError, match="sample.num_prompts=5 but .* hold only 4 distinct"):
        default_prompts(job.data, 5, verbose=False)


def test_a_one_step_strategy_holds_at_every_step_and_others_must_match(tmp_path: Path):
    tile = [1, 2, 2]
    windows = torch.tensor([3, 3, 3]).expand(1, 2, 4, 3)  # (steps, L, H, 3)
    one = tmp_path / "one.json"
    MaskStrategy.from_tensor(windows, canvas=[5, 8, 8], tile=tile, candidates=[[3, 3, 3]]).save(one)
    attention = inference_attention(dataclasses.replace(STA, strategy_path=str(one)), steps=20)
    plan = build_model(ModelConfig(flavor="wan_tiny"), attention).plan
    assert all(torch.equal(plan.windows_for_step(i), windows[0]) for i in range(20))
    four = tmp_path / "four.json"
    MaskStrategy.from_tensor(windows.expand(4, 2, 4, 3), canvas=[5, 8, 8], tile=tile,
                             candidates=[[3, 3, 3]]).save(four)  # fmt: skip
    with pytest.raises(ValueError, match="sample.steps=20 but .* holds windows for 4"):
        inference_attention(dataclasses.replace(STA, strategy_path=str(four)), steps=20)
    assert inference_attention(dataclasses.replace(STA, strategy_path=str(four)), 4).strategy_path
    assert inference_attention(DENSE, 20) is DENSE
    with pytest.raises(ValueError, match="attention.tile"):
        inference_attention(AttentionConfig(tile=[1, 1, 1], strategy_path=str(one)), steps=20)


def test_read_prompts_skips_blank_lines_and_names_the_field(tmp_path: Path):
    path = tmp_path / "p.txt"
    path.write_text("  first prompt \n\n second\n")
    assert read_prompts(path) == ["first prompt", "second"]
    path.write_text("\n \n")
    with pytest.raises(ValueError, match=r"sample.prompts=.* holds no prompt"):
        read_prompts(path)
    with pytest.raises(ValueError, match=r"sample.prompts=.*: no such file"):
        read_prompts(tmp_path / "none.txt")


def test_the_sample_command_writes_one_mp4_per_prompt(tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([PROMPTS[0], "", PROMPTS[1], "a green diamond"]) + "\n")
    out = tmp_path / "out"
    proc = run_command("stafinetune.commands.sample", f"sample.prompts={prompts}", "sample.steps=2",
                       "sample.seed=10", f"hydra.run.dir={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = json.loads((out / "samples.json").read_text())
    rows = samples["samples"]
    assert [r["prompt"] for r in rows] == [PROMPTS[0], PROMPTS[1], "a green diamond"]
    assert [r["seed"] for r in rows] == [10, 11, 12]
    assert [r["file"] for r in rows] == [
        "0000_a-red-circle-moving-right-at-3-pixels-per-frame.mp4",  # slugs of <= 48 characters
        "0001_a-blue-square-moving-up-at-2-pixels-per-frame-on.mp4",
        "0002_a-green-diamond.mp4",
    ]
    files = sorted(p.name for p in (out / "videos").iterdir())
    assert files == [r["file"] for r in rows]
    assert all(r["latency_s"] > 0 and 0 < r["attention_s"] < r["latency_s"] for r in rows)
    assert read_video(out / "videos" / files[0]).shape == (17, 128, 128, 3)
    assert samples["attention"] == "STA, window [3, 3, 3], first 3 steps dense"
    assert samples["steps"] == 2
