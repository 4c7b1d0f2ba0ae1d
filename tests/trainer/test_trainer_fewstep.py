"""Few-step students (distill=dmd2 / trajectory): the loss's stop-gradient, the critic's update
ratio, where guidance goes, the student's timesteps, exact resume with a critic, the export."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stafinetune.config import JobConfig
from stafinetune.diffusion.losses import dmd_loss
from stafinetune.diffusion.sampling import Schedule, sample_latents
from stafinetune.inference.generate import SampleConfig, sampling_schedule
from stafinetune.inference.weights import load_model, resolve_weights
from stafinetune.training.fewstep import DMD2Distill, TrajectoryDistill
from stafinetune.training.trainer import Trainer

FEW = ("attention.dense_first_steps=0",)


def _job(tiny_job: Callable[..., JobConfig], method: str, *overrides: str) -> JobConfig:
    return tiny_job(f"distill={method}", *FEW, "train.batch_size=2", *overrides)


class Recorder(nn.Module):
    """Calls ``model`` and records each call's timesteps and batch size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[list[float], int]] = []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        latents = kwargs["latents"] if "latents" in kwargs else args[0]
        self.calls.append((sorted(set(timestep.tolist())), latents.shape[0]))
        return self.model(*args, **kwargs)


class StudentStub:
    """The part of an engine the methods call for the student."""

    def __init__(self, module: nn.Module, model: nn.Module) -> None:
        self.module, self.model = module, model

    def grad_sync(self, enabled: bool) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 2, 4, 4, generator=gen, requires_grad=True)
    real, fake = (torch.randn(2, 3, 2, 4, 4, generator=gen) for _ in range(2))
    (grad,) = torch.autograd.grad(dmd_loss(sample, real, fake), sample)
    weight = (sample.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (fake - real) / weight / sample.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)
    # the stop-gradient: scores that depend on the sample must not add to its gradient
    real_dep = real + 0.5 * sample
    (grad_dep,) = torch.autograd.grad(dmd_loss(sample, real_dep, fake), sample)
    weight = (sample.detach() - real_dep.detach()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(
        grad_dep, (fake - real_dep.detach()) / weight / sample.numel(), rtol=1e-5, atol=1e-9
    )


def test_the_student_sees_exactly_its_schedules_timesteps(tiny_job, tmp_path):
    trainer = Trainer(_job(tiny_job, "dmd2", "train.steps=1"), tmp_path)
    method: DMD2Distill = trainer.distill
    levels = [1000.0 * s for s in method.schedule.sigmas]
    assert method.schedule == Schedule((1.0, 0.75, 0.5, 0.25), stochastic=True)
    recorder = Recorder(trainer.student)
    batch = {k: v[:2] for k, v in trainer.data.val_batches[0].items()}
    for seed in range(6):  # the student's step k is drawn: every k must see its own levels
        recorder.calls.clear()
        gen = torch.Generator().manual_seed(seed)
        method._sample(recorder, batch, gen, grad=True)
        seen = [c[0] for c in recorder.calls]
        k = len(seen) - 1  # k rollout steps, then step k with gradients
        assert seen == [[pytest.approx(t)] for t in levels[: k + 1]], (seed, seen)
    recorder.calls.clear()
    noise = torch.randn(2, *batch["latents"].shape[1:])
    sample_latents(recorder, noise, batch["text"], batch["text_mask"], batch["pooled_text"],
                   schedule=method.schedule, generator=torch.Generator().manual_seed(0))
    assert [c[0] for c in recorder.calls] == [[pytest.approx(t)] for t in levels]


def test_critic_updates_at_the_configured_ratio(tiny_job, tmp_path):
    trainer = Trainer(_job(tiny_job, "dmd2", "train.steps=1", "distill.fewstep.critic_ratio=3"),
                      tmp_path)  # fmt: skip
    counts = {"critic": 0, "student": 0}
    critic_step, student_step = trainer.critic_engine.step, trainer.engine.step

    def count(name: str, step: Callable[[], None]) -> Callable[[], None]:
        def wrapped() -> None:
            counts[name] += 1
            step()

        return wrapped

    trainer.critic_engine.step = count("critic", critic_step)
    trainer.engine.step = count("student", student_step)
    trainer.fit()
    assert counts == {"critic": 3, "student": 1}
    critic = torch.cat([p.detach().flatten() for p in trainer.critic.parameters()])
    teacher = torch.cat([p.detach().flatten() for p in trainer.teacher.parameters()])
    assert not torch.equal(critic, teacher)  # the critic trained away from its start
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


@pytest.mark.parametrize("method", ["dmd2", "trajectory"])
def test_guidance_goes_to_the_teacher_only(tiny_job, tmp_path, method):
    trainer = Trainer(_job(tiny_job, method, "train.steps=1",
                           "distill.fewstep.guidance_scale=3.0"), tmp_path)  # fmt: skip
    distill = trainer.distill
    teacher = Recorder(distill.teacher_module)
    distill.teacher_module = teacher
    student = Recorder(trainer.student)
    critic = None
    if isinstance(distill, DMD2Distill):
        critic = Recorder(trainer.critic_engine.module)
        trainer.critic_engine.student.module = critic
    batch = {k: v[:2] for k, v in trainer.data.val_batches[0].items()}
    distill.student_losses(StudentStub(student, trainer.student), batch,
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert teacher.calls and all(size == 4 for _, size in teacher.calls)  # cond + negative
    assert all(size == 2 for _, size in student.calls)
    if critic is not None:
        assert critic.calls and all(size == 2 for _, size in critic.calls)
    # and the teacher's guided prediction is the guidance formula of its two halves
    x = torch.randn(2, *batch["latents"].shape[1:])
    t = torch.tensor([0.3, 0.7])
    guided = distill.teacher_x0(x, t, batch)
    distill.cfg.fewstep.guidance_scale = 1.0
    cond = distill.teacher_x0(x, t, batch)
    neg_batch = {**batch, "text": distill.negative[0].expand(2, -1, -1),
                 "text_mask": distill.negative[1].expand(2, -1),
                 "pooled_text": distill.negative[2].expand(2, -1)}  # fmt: skip
    neg = distill.teacher_x0(x, t, neg_batch)
    torch.testing.assert_close(guided, neg + 3.0 * (cond - neg), rtol=1e-4, atol=1e-5)


def test_trajectory_target_is_the_teachers_segment(tiny_job, tmp_path):
    trainer = Trainer(_job(tiny_job, "trajectory", "train.steps=1"), tmp_path)
    method: TrajectoryDistill = trainer.distill
    assert not method.schedule.stochastic
    segments = method.fine_levels()
    # teacher_steps=20 over the 4 levels 1, .75, .5, .25: 5 Euler steps each, ending at 0
    assert [len(s) for s in segments] == [6] * 4 and segments[-1][-1] == 0.0
    assert [s[0] for s in segments] == list(method.schedule.sigmas)
    batch = {k: v[:2] for k, v in trainer.data.val_batches[0].items()}
    x = torch.randn(2, *batch["latents"].shape[1:])
    end, first = method.teacher_segment(x, segments[1], batch)
    y, velocities = x, []
    with torch.no_grad():
        for a, b in zip(segments[1], segments[1][1:], strict=False):
            v = trainer.teacher(y, torch.full((2,), a * 1000.0), batch["text"],
                                batch["text_mask"], batch["pooled_text"])  # fmt: skip
            velocities.append(v)
            y = y + (b - a) * v
    torch.testing.assert_close(end, y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first, velocities[0], rtol=1e-4, atol=1e-5)


def test_dmd2_resumes_exactly_with_its_critic(tiny_job, tmp_path):
    overrides = ("train.steps=2", "train.ckpt_every=1", "distill.fewstep.critic_ratio=1",
                 "train.ema_decay=0.9")  # fmt: skip
    straight = Trainer(_job(tiny_job, "dmd2", *overrides), tmp_path / "straight").fit()
    first = Trainer(_job(tiny_job, "dmd2", *overrides), tmp_path / "resumed").fit(until_step=1)
    assert first.step == 1
    ckpt = first.last_checkpoint
    assert (ckpt / "critic_model.safetensors").is_file()
    assert (ckpt / "critic_optimizer.safetensors").is_file()
    assert (ckpt / "ema.safetensors").is_file()
    second = Trainer(_job(tiny_job, "dmd2", *overrides), tmp_path / "resumed")
    assert second.step == 1
    resumed = second.fit()
    assert resumed.losses == straight.losses[1:]
    a = load_file(str(straight.last_checkpoint / "critic_model.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "critic_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(straight.last_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_export_carries_the_schedule(tiny_job, tmp_path):
    job = _job(tiny_job, "dmd2", "train.steps=1", "train.export=true",
               "distill.fewstep.guidance_scale=2.0")  # fmt: skip
    result = Trainer(job, tmp_path).fit()
    info = json.loads((result.export_dir / "stafinetune.json").read_text())
    strategy = json.loads((result.export_dir / "mask_strategy.json").read_text())
    expected = {"steps": 4, "sigmas": [1.0, 0.75, 0.5, 0.25], "stochastic": True,
                "guidance_scale": 1.0, "baked_guidance_scale": 2.0, "method": "dmd2"}  # fmt: skip
    assert info["sampling"] == expected
    assert strategy["metadata"]["sampling"] == expected
    scheduler = json.loads((result.export_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["stochastic_sampling"] is True and scheduler["shift"] == 1.0
    assert math.isfinite(result.losses[-1])
    # sampling the export: its own schedule, and every step sparse whatever the attention
    # group's dense_first_steps (3 in conf/attention/sta.yaml)
    weights = resolve_weights(str(tmp_path))
    assert sampling_schedule(SampleConfig(), weights) == Schedule((1.0, 0.75, 0.5, 0.25), True)
    assert sampling_schedule(SampleConfig(schedule="euler", steps=2), weights) == Schedule.flow(2)
    sta = dataclasses.replace(job.attention, dense_first_steps=3)
    dit = load_model(job.model, sta, weights, steps=4, device=torch.device("cpu"),
                     dtype=torch.float32)  # fmt: skip
    assert dit.attention_cfg.dense_first_steps == 0


def test_few_step_methods_refuse_dense_first_steps(tiny_job):
    with pytest.raises(ValueError, match="attention.dense_first_steps must be 0"):
        tiny_job("distill=dmd2", "attention.dense_first_steps=2")
    with pytest.raises(ValueError, match="stochastic must be false"):
        tiny_job("distill=trajectory", "attention.dense_first_steps=0",
                 "distill.fewstep.stochastic=true")  # fmt: skip


def test_dmd2_with_gradient_checkpointing_matches_without(tiny_job, tmp_path):
    """Checkpointing recomputes the student's and the critic's blocks; the step is the same."""
    overrides = ("train.steps=1", "distill.fewstep.critic_ratio=1")
    plain = Trainer(_job(tiny_job, "dmd2", *overrides), tmp_path / "plain").fit()
    checkpointed = Trainer(_job(tiny_job, "dmd2", *overrides, "model.gradient_checkpointing=true"),
                           tmp_path / "checkpointed")  # fmt: skip
    assert checkpointed.critic.transformer.is_gradient_checkpointing
    result = checkpointed.fit()
    assert result.losses == pytest.approx(plain.losses, rel=1e-5)
