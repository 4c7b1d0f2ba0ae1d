"""The distillation step against an independent computation: loss weights reach the right
terms (in the gradients and in metrics.jsonl), and gradient accumulation over micro-batches
equals one step on the concatenated batch."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stafinetune.build import build_student, build_teacher
from stafinetune.config import DistillConfig, JobConfig, compose_job_config
from stafinetune.models import VideoDiT
from stafinetune.parallel import ParallelDims, ParallelModel, World
from stafinetune.parallel.engine import TorchEngine
from stafinetune.training.distill import DistillStep, draw_noise
from stafinetune.training.trainer import Trainer

CPU = torch.device("cpu")


def _engine(model, grad_accum: int) -> TorchEngine:
    """The engine the trainer drives a single-process student with (its backward divides
    by grad_accum); the optimiser is never stepped here."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dims = ParallelDims(World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    return TorchEngine(ParallelModel(module=model, model=model), optimizer, scheduler, dims,
                       grad_accum)  # fmt: skip


@pytest.fixture(scope="module")
def job() -> JobConfig:
    # the default: STA student and dense teacher from the shipped wan_tiny weights
    return compose_job_config(["train.device=cpu", "logging=none"])


@pytest.fixture(scope="module")
def teacher(job: JobConfig) -> VideoDiT:
    return build_teacher(job, CPU)


def _batch(size: int, seed: int) -> dict[str, torch.Tensor]:
    """Random conditioning and latents in the shapes of the tiny data; text lengths differ
    per sample (valid tokens first)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 17, (size, 1), generator=gen)
    return {
        "latents": torch.randn(size, 16, 5, 16, 16, generator=gen),  # (B, C, T, H, W)
        "text": torch.randn(size, 16, 32, generator=gen),  # (B, L, Dt)
        "text_mask": torch.arange(16)[None, :] < lengths,  # (B, L)
        "pooled_text": torch.randn(size, 32, generator=gen),  # (B, Dp)
    }


def _step(cfg: DistillConfig, teacher: VideoDiT) -> DistillStep:
    return DistillStep(cfg=cfg, teacher=teacher, device=CPU, bf16=False, teacher_bf16=False)


def _grads(model: VideoDiT) -> dict[str, torch.Tensor]:
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
    }


def _reference_terms(
    student: VideoDiT, teacher: VideoDiT, batch: dict, noise: torch.Tensor, sigma: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The three loss terms written out from the definitions (no stafinetune loss code)."""
    x0 = batch["latents"]
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    args = (x_t, sigma * 1000.0, batch["text"], batch["text_mask"], batch["pooled_text"])
    with torch.no_grad(), teacher.capture(detach=True) as t_attn:
        t_out = teacher(*args)
    with student.capture() as s_attn:
        s_out = student(*args)
    layers = range(student.num_layers)
    return {
        "data": ((s_out - (noise - x0)) ** 2).mean(),
        "out": ((s_out - t_out) ** 2).mean(),
        "attn": torch.stack([((s_attn[i] - t_attn[i]) ** 2).mean() for i in layers]).mean(),
    }


def _term_grads(terms: dict[str, torch.Tensor], model: VideoDiT) -> dict[str, dict]:
    """Each term's gradient per parameter (zero where the term does not reach it, e.g. the
    attention term and the layers after the last attention)."""
    names, params = zip(*model.named_parameters(), strict=True)
    out = {}
    for key, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[key] = {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, grads, strict=True)
        }
    return out


def _max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max |got - want| over all parameters, relative to max |want|."""
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    return max(float((got[n] - want[n]).abs().max()) for n in want) / scale


@pytest.mark.parametrize(
    "w_data, w_out, w_attn", [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.5, 2.0, 0.25)]
)
def test_gradient_is_the_weighted_sum_of_independent_term_gradients(
    job: JobConfig, teacher: VideoDiT, w_data: float, w_out: float, w_attn: float
):
    cfg = dataclasses.replace(job.distill, w_data=w_data, w_out=w_out, w_attn=w_attn)
    batch = _batch(2, seed=1)
    noise, sigma = draw_noise(batch["latents"], cfg, torch.Generator().manual_seed(5))

    reference = build_student(job, CPU)
    want_terms = _reference_terms(reference, teacher, batch, noise, sigma)
    per_term = _term_grads(want_terms, reference)
    want = {
        n: w_data * per_term["data"][n] + w_out * per_term["out"][n] + w_attn * per_term["attn"][n]
        for n in per_term["data"]
    }
    # the terms pull differently, so a weight applied to the wrong term changes the gradient
    assert _max_rel_err(per_term["out"], per_term["attn"]) > 0.1

    student = build_student(job, CPU)
    sums, _, _ = _step(cfg, teacher).forward_backward(
        _engine(student, grad_accum=1),
        lambda: batch,
        torch.Generator().manual_seed(5),
        grad_accum=1,
    )
    for key in ("data", "out") + (("attn",) if w_attn > 0 else ()):
        assert sums[key] == pytest.approx(float(want_terms[key].detach()), rel=1e-5), key
    total = w_data * sums["data"] + w_out * sums["out"] + w_attn * sums.get("attn", 0.0)
    assert sums["total"] == pytest.approx(total, rel=1e-5)
    # fp32 forward/backward of the same graph: agreement to float rounding
    assert _max_rel_err(_grads(student), want) < 1e-5


def test_two_micro_batches_equal_one_step_on_the_concatenated_batch(
    job: JobConfig, teacher: VideoDiT
):
    # Every term is a mean over equally sized samples (data and output MSE over elements,
    # attention MSE over elements per layer, then over layers), so the mean of the two
    # half-batch losses equals the loss of the whole batch in exact arithmetic, and so does
    # the gradient once each micro-batch's is divided by grad_accum. The optimiser cannot be
    # the judge: AdamW and grad clipping both hide a gradient scaled by a constant.
    cfg = dataclasses.replace(job.distill, w_data=0.5, w_out=1.0, w_attn=2.0)
    whole = _batch(4, seed=2)
    halves = [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]

    accumulated = build_student(job, CPU)
    feed = iter(halves)
    sums, samples, _ = _step(cfg, teacher).forward_backward(
        _engine(accumulated, grad_accum=2),
        lambda: next(feed),
        torch.Generator().manual_seed(9),
        grad_accum=2,
    )
    assert samples == 4

    # the noise and sigmas forward_backward drew for each micro-batch, concatenated
    gen = torch.Generator().manual_seed(9)
    drawn = [draw_noise(h["latents"], cfg, gen) for h in halves]
    noise = torch.cat([n for n, _ in drawn])
    sigma = torch.cat([s for _, s in drawn])
    single = build_student(job, CPU)
    terms = _step(cfg, teacher).losses(single, single, whole, noise, sigma)
    terms["total"].backward()

    for key in ("data", "out", "attn", "total"):
        assert sums[key] == pytest.approx(float(terms[key].detach()), rel=1e-5), key
    # fp32 with different batch sizes sums in a different order: 1e-5 of the largest entry
    # (a gradient scaled by 2 is off by 1.0)
    assert _max_rel_err(_grads(accumulated), _grads(single)) < 1e-5


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss/total" in row]


@pytest.mark.parametrize("w_out, w_attn", [(0.0, 1.0), (1.0, 0.0)])
def test_logged_total_is_the_weighted_sum_of_logged_terms(
    tiny_job: Callable[..., JobConfig], tmp_path: Path, w_out: float, w_attn: float
):
    job = tiny_job("train.steps=2", f"distill.w_out={w_out}", f"distill.w_attn={w_attn}")
    w_data = job.distill.w_data
    Trainer(job, tmp_path).fit()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        # an attention term is only computed (and logged) when it is weighted
        assert ("loss/attn" in row) == (w_attn > 0)
        terms = (
            w_data * row["loss/data"] + w_out * row["loss/out"] + w_attn * row.get("loss/attn", 0.0)
        )
        # metrics pass through fp32 tensors when averaged over ranks
        assert row["loss/total"] == pytest.approx(terms, rel=1e-6)
        assert row["loss/data"] > 0 and row["loss/out"] > 0
        if w_attn > 0:  # the two teacher terms differ, so swapped weights would show
            assert abs(row["loss/out"] - row["loss/attn"]) > 0.1 * row["loss/total"]
