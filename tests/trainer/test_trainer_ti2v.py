"""Wan 2.2 TI2V image-to-video training on the CPU (``experiment=ti2v_i2v_tiny``): the cache
holds each clip's first-frame latent alone, the losses leave that frame out, resume is exact,
validation and ``stafinetune-sample`` condition on the first frames."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stafinetune.config import JobConfig
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.trainer import Trainer

TI2V = ("experiment=ti2v_i2v_tiny", "train.batch_size=2", "train.warmup_steps=1")


@pytest.fixture()
def job(tiny_job: Callable[..., JobConfig]) -> Callable[..., JobConfig]:
    """``job(*overrides)``: the tiny TI2V image-to-video job on the session's clips."""
    return lambda *overrides: tiny_job(*TI2V, *overrides)


def test_ti2v_i2v_distillation_resumes_exactly(
    job: Callable[..., JobConfig], tmp_path: Path
) -> None:
    overrides = ("distill=sta", "distill.allow_random_teacher=true", "train.steps=2",
                 "train.ckpt_every=0")  # fmt: skip
    straight = Trainer(job(*overrides), tmp_path / "straight").fit()
    first = Trainer(job(*overrides), tmp_path / "resumed").fit(until_step=1)
    assert first.step == 1
    second = Trainer(job(*overrides), tmp_path / "resumed").fit()
    assert second.losses == straight.losses[1:]
    a, b = (load_file(str(ckpt.latest_checkpoint(tmp_path / run / "checkpoints")
                          / "model.safetensors")) for run in ("straight", "resumed"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ti2v_losses_leave_the_given_first_frame_out(
    job: Callable[..., JobConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cached condition is the first frame's latent alone (the tiny encoder is causal, so
    it equals the clip's first latent frame); no target on that frame enters a loss, and
    validation samples keep it as given."""
    from stafinetune.training import validation
    from stafinetune.training.distill import model_inputs

    seen: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        seen.append(kwargs["image_latents"])
        out = sample_latents(*args, **kwargs)
        assert torch.equal(out[:, :, :1], kwargs["image_latents"])
        return out

    sample_latents = validation.sample_latents
    monkeypatch.setattr(validation, "sample_latents", recording)
    trainer = Trainer(job("distill=sta", "distill.allow_random_teacher=true", "train.steps=1",
                          "train.val_every=1", "train.sample_steps=2"), tmp_path)  # fmt: skip
    batch = trainer.data.val_batches[0]
    assert batch["image_latents"].shape == (2, 48, 1, 16, 16) and "image_embeds" not in batch
    torch.testing.assert_close(batch["image_latents"], batch["latents"][:, :, :1])
    step, student = trainer.distill, trainer.student
    noise, sigma = batch["noise"], batch["sigma"]
    terms = step.losses(student, student, batch, noise, sigma)
    # a target that differs from the truth only on the first frame gives the same losses
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t, target = (1 - s) * batch["latents"] + s * noise, noise - batch["latents"]
    target[:, :, 0] += 100.0
    again = step.losses_at(student, student, batch, x_t, sigma, target=target)
    for name in ("data", "out", "attn"):
        torch.testing.assert_close(again[name], terms[name])
    assert model_inputs(batch, x_t, sigma, torch.device("cpu"))["image_embeds"] is None
    result = trainer.fit()
    assert len(seen) >= 2 and all(torch.equal(x, batch["image_latents"][: len(x)]) for x in seen)
    assert "val/sample_gap_mse" in result.val_history[-1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.image_encoder=tiny",), "set data.image_encoder=vae"),
        (("model.image_to_video=false",), r"=null \(or model.image_to_video=true\)"),
        (("distill=dmd2", "distill.allow_random_teacher=true"),
         "model.image_to_video .* supports distill.method=per_step"),
        (("model=wan_tiny", "data.latent_channels=16"), "model.image_to_video applies to"),
    ],
)
def test_ti2v_i2v_options_are_checked_at_start_up(
    tiny_job: Callable[..., JobConfig], tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_job(*TI2V, *overrides), tmp_path)
