"""Image-to-video training on the CPU: the clips' first frames condition a tiny Wan I2V
student (``experiment=i2v_tiny``) or HunyuanVideo 1.5 I2V student
(``experiment=hunyuanvideo15_i2v_tiny``); resume is exact; validation samples from those
frames; start-up refuses image data that does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stafinetune.config import compose_job_config
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.trainer import Trainer


@pytest.fixture(scope="module")
def data_root(tiny_data_root: Path) -> Path:
    """The session's synthetic clips (generated once); the i2v cache is a cache of its own."""
    return tiny_data_root


# each image-to-video experiment: its text-to-video sibling and what its export's config says
EXPERIMENTS = {
    "i2v_tiny": ("wan_tiny", ('"in_channels": 36', '"image_dim": 32')),
    "hunyuanvideo15_i2v_tiny": (
        "hunyuanvideo15_tiny", ('"in_channels": 33', '"image_embed_dim": 32', '"task_type": "i2v"')
    ),
}


def _job(data_root: Path, *overrides: str, experiment: str = "i2v_tiny"):
    return compose_job_config([
        f"experiment={experiment}", f"data.root={data_root}", "data.num_clips=16",
        "data.num_workers=0", "data.decode_workers=0", "logging=none", "logging.progress=false",
        "train.log_every=1", "train.val_every=0", "train.sample_steps=0", "train.export=false",
        "train.warmup_steps=1", "train.device=cpu", "train.batch_size=2", *overrides,
    ])  # fmt: skip


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_i2v_distillation_resumes_exactly(data_root: Path, tmp_path: Path, experiment: str) -> None:
    overrides = ("distill=sta", "distill.allow_random_teacher=true", "train.steps=3",
                 "train.ckpt_every=0")  # fmt: skip
    job = lambda: _job(data_root, *overrides, experiment=experiment)  # noqa: E731
    straight = Trainer(job(), tmp_path / "straight").fit()
    first = Trainer(job(), tmp_path / "resumed").fit(until_step=1)
    assert first.step == 1
    second = Trainer(job(), tmp_path / "resumed").fit()
    assert second.losses == straight.losses[1:]
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_i2v_validation_samples_from_the_batch_frames(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, experiment: str
) -> None:
    """Validation videos of student and teacher start from the batch's own first frames."""
    from stafinetune.training import validation

    seen: list[dict[str, torch.Tensor]] = []

    def recording(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("image_latents", "image_embeds")})
        return sample_latents(*args, **kwargs)

    sample_latents = validation.sample_latents
    monkeypatch.setattr(validation, "sample_latents", recording)
    job = _job(data_root, "distill=sta", "distill.allow_random_teacher=true", "train.steps=1",
               "train.val_every=1", "train.sample_steps=2", "train.export=true",
               experiment=experiment)  # fmt: skip
    trainer = Trainer(job, tmp_path)
    batch = trainer.data.val_batches[0]
    assert batch["image_latents"].shape == (2, 16, 5, 16, 16)
    assert batch["image_embeds"].shape == (2, 17, 32)
    result = trainer.fit()
    assert len(seen) >= 2  # the student and the teacher, at step 0 at least
    for images in seen:
        n = images["image_latents"].shape[0]
        assert torch.equal(images["image_latents"], batch["image_latents"][:n])
        assert torch.equal(images["image_embeds"], batch["image_embeds"][:n])
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert "val/sample_gap_mse" in result.val_history[-1]
    exported = (result.export_dir / "transformer" / "config.json").read_text()
    assert all(field in exported for field in EXPERIMENTS[experiment][1])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_i2v_model_needs_image_data(data_root: Path, tmp_path: Path, experiment: str) -> None:
    job = lambda *o: _job(data_root, *o, experiment=experiment)  # noqa: E731
    with pytest.raises(ValueError, match="is an image-to-video model: set data.image_encoder"):
        Trainer(job("data.image_encoder=null"), tmp_path)
    t2v = EXPERIMENTS[experiment][0]
    refused = f"{t2v}' is a text-to-video model: set data.image_encoder=null"
    with pytest.raises(ValueError, match=refused):
        Trainer(job(f"model={t2v}"), tmp_path)
    with pytest.raises(ValueError, match="data.image_dim=48: .*states of width 48 .* takes 32"):
        Trainer(job("data.image_dim=48"), tmp_path)
    with pytest.raises(ValueError, match="width 32: set data.image_encoder=tiny, clip or siglip"):
        Trainer(job("data.image_encoder=latents"), tmp_path)


def test_sampling_the_data_captions_uses_their_clips_frames(data_root: Path) -> None:
    """``stafinetune-sample`` without prompts: each caption comes with its own clip's condition."""
    from stafinetune.data import resolve_cache_dir
    from stafinetune.data.cache import LatentCache
    from stafinetune.data.encoders import build_video_encoder
    from stafinetune.inference.generate import SampleConfig, default_prompts, image_conditions
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    data = _job(data_root).data
    prompts = default_prompts(data, 3, verbose=False)
    dit = build_model(ModelConfig(flavor="wan_i2v_tiny"), AttentionConfig(mode="full"))
    conditions = image_conditions(SampleConfig(num_prompts=3), data, prompts, dit,
                                  build_video_encoder(data))  # fmt: skip
    cache = LatentCache(resolve_cache_dir(data))
    by_caption = {cache[i].caption: cache[i] for i in range(len(cache))}
    for prompt, condition in zip(prompts, conditions, strict=True):
        assert torch.equal(condition["image_latents"][0], by_caption[prompt].image_latents)
        assert torch.equal(condition["image_embeds"][0], by_caption[prompt].image_embeds)


@pytest.mark.parametrize(
    ("method", "experiment"),
    [("none", "i2v_tiny"), ("dmd2", "i2v_tiny"), ("trajectory", "i2v_tiny"),
     ("dmd2", "hunyuanvideo15_i2v_tiny")],
)  # fmt: skip
def test_other_methods_take_the_image_condition(
    data_root: Path, tmp_path: Path, method: str, experiment: str
) -> None:
    """One step of plain flow matching and of each few-step method on i2v batches (the
    student's rollout, the guided teacher and dmd2's critic all see the first-frame
    condition, or the model refuses to run)."""
    job = _job(data_root, f"distill={method}", "distill.allow_random_teacher=true",
               "distill.fewstep.critic_ratio=1", "train.steps=1",
               experiment=experiment)  # fmt: skip
    result = Trainer(job, tmp_path).fit()
    assert result.step == 1 and all(torch.isfinite(torch.tensor(result.losses)))
