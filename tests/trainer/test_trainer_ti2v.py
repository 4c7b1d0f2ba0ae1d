"""Wan 2.2 TI2V image-to-video training on the CPU (``experiment=ti2v_i2v_tiny``): the cache
holds each clip's first-frame latent alone, the losses leave that frame out, resume is exact,
validation and ``stafinetune-sample`` condition on the first frames."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stafinetune.config import compose_job_config
from stafinetune.training import checkpoint as ckpt
from stafinetune.training.trainer import Trainer


def _job(data_root: Path, *overrides: str):
    return compose_job_config([
        "experiment=ti2v_i2v_tiny", f"data.root={data_root}", "data.num_clips=16",
        "data.num_workers=0", "data.decode_workers=0", "logging=none", "logging.progress=false",
        "train.log_every=1", "train.val_every=0", "train.sample_steps=0", "train.export=false",
        "train.warmup_steps=1", "train.device=cpu", "train.batch_size=2", *overrides,
    ])  # fmt: skip


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return load_file(str(path / "model.safetensors"))


def test_ti2v_i2v_distillation_resumes_exactly(tiny_data_root: Path, tmp_path: Path) -> None:
    overrides = ("distill=sta", "distill.allow_random_teacher=true", "train.steps=3",
                 "train.ckpt_every=0")  # fmt: skip
    straight = Trainer(_job(tiny_data_root, *overrides), tmp_path / "straight").fit()
    first = Trainer(_job(tiny_data_root, *overrides), tmp_path / "resumed").fit(until_step=1)
    assert first.step == 1
    second = Trainer(_job(tiny_data_root, *overrides), tmp_path / "resumed").fit()
    assert second.losses == straight.losses[1:]
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ti2v_losses_leave_the_given_first_frame_out(tiny_data_root: Path, tmp_path: Path) -> None:
    """The cached condition is the first frame's latent alone (the tiny encoder is causal, so
    it equals the clip's first latent frame); no prediction on that frame enters a loss."""
    from stafinetune.training.distill import model_inputs

    job = _job(tiny_data_root, "distill=sta", "distill.allow_random_teacher=true")
    trainer = Trainer(job, tmp_path)
    batch = trainer.data.val_batches[0]
    assert batch["image_latents"].shape == (2, 48, 1, 16, 16) and "image_embeds" not in batch
    torch.testing.assert_close(batch["image_latents"], batch["latents"][:, :, :1])
    step = trainer.distill
    noise, sigma = batch["noise"], batch["sigma"]
    terms = step.losses(trainer.student, trainer.student, batch, noise, sigma)
    # a target that differs from the truth only on the first frame gives the same losses
    x0 = batch["latents"]
    x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    target = noise - x0
    target[:, :, 0] += 100.0
    again = step.losses_at(trainer.student, trainer.student, batch, x_t, sigma, target=target)
    for name in ("data", "out", "attn"):
        torch.testing.assert_close(again[name], terms[name])
    assert model_inputs(batch, x_t, sigma, torch.device("cpu"))["image_embeds"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("data.image_encoder=tiny",), "set data.image_encoder=vae"),
        (("model.image_to_video=false",), "text-to-video model: set data.image_encoder=null"),
        (("distill=dmd2", "distill.allow_random_teacher=true"),
         "model.image_to_video .* supports distill.method=per_step"),
        (("parallel.sp=2",), "model.image_to_video .* supports parallel.sp=1"),
        (("model=wan_tiny", "data.latent_channels=16"), "model.image_to_video applies to"),
    ],
)
def test_ti2v_i2v_options_are_checked_at_start_up(
    tiny_data_root: Path, tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(_job(tiny_data_root, *overrides), tmp_path)
