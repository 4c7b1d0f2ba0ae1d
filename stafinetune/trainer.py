"""The training job: STA student, optional dense teacher, flow matching and distillation.

One linear loop (:meth:`Trainer.fit`): draw a batch, noise it at a sampled sigma, run the
student (and, when distilling, the frozen dense teacher on the same input), sum the loss
terms, step the optimiser, then log, validate and checkpoint on their schedules. Everything
the loop needs to continue bit-exactly (weights, optimiser, scheduler, EMA, RNG states, data
position, step) is in each checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from sta_kernels import density

from . import checkpoint as ckpt
from .config import JobConfig, resolved_dict
from .data import build_train_loader, build_video_encoder, prepare_data
from .data.synthetic import write_mp4
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from .flow_matching import add_noise, sample_sigmas, velocity_target
from .losses import distillation_losses
from .models import MaskStrategy, build_model
from .models.dit import cast_like_diffusers
from .optim import EMA, build_optimizer, build_scheduler, select_trainable
from .profiling import AttentionTimer
from .sampling import sample_latents, to_uint8_video
from .tracking import build_tracker

log = logging.getLogger(__name__)

# (student, step, tracker) -> scalar metrics; a validator may also log files to the tracker
Validator = Callable[[nn.Module, int, Any], dict[str, float]]


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss or gradient norm is NaN/inf; a checkpoint of the last good state exists."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # total loss per optimiser step (rank 0)
    val_history: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    export_dir: Path | None = None
    tracker_dir: Path | None = None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class Trainer:
    """Builds every part of a run from a validated :class:`JobConfig` and trains it.

    Args:
        job: the validated configuration.
        run_dir: where checkpoints, exports, wandb files and the config go (shared by ranks).
        dist: this process's place; initialised from the launcher's environment if None.
    """

    def __init__(self, job: JobConfig, run_dir: Path, dist: DistInfo | None = None) -> None:
        self.job = job
        self.run_dir = run_dir
        self.dist = dist or init_distributed(job.train.device)
        self.device = self.dist.device
        tcfg = job.train
        self.use_bf16 = tcfg.precision == "bf16" or (
            tcfg.precision == "auto" and self.device.type == "cuda"
        )

        torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
        self.cache_dir = self._prepare_data()
        self.loader = build_train_loader(
            job.data,
            batch_size=tcfg.batch_size,
            seed=tcfg.seed,
            dp_rank=self.dist.rank,
            dp_size=self.dist.world_size,
        )
        self.student = build_model(
            job.model, job.attention, device=self.device, dtype=torch.float32
        )
        select_trainable(self.student, tcfg.trainable)  # freezes the rest
        self.teacher = self._build_teacher() if job.distill.needs_teacher else None
        self.ema = EMA(self.student, tcfg.ema_decay) if tcfg.ema_decay else None
        self.optimizer = build_optimizer(
            self.student.named_parameters(),
            lr=tcfg.lr,
            weight_decay=tcfg.weight_decay,
            betas=(tcfg.betas[0], tcfg.betas[1]),
            eps=tcfg.eps,
            fused=self.device.type == "cuda",
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup=tcfg.warmup_steps,
            total=tcfg.steps,
            schedule=tcfg.schedule,
            min_ratio=tcfg.min_lr_ratio,
        )
        self.model: nn.Module = self.student
        if self.dist.world_size > 1:
            self.model = DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=job.parallel.find_unused_parameters,
            )
        # noise and sigmas come from the trainer's own generator (different per rank), so
        # libraries drawing from the global RNG (DataLoader seeds) cannot shift them on resume
        self.noise_rng = torch.Generator().manual_seed(tcfg.seed + 1 + self.dist.rank)
        self.step = 0
        self.ckpt_dir = run_dir / "checkpoints"
        self.validators: list[Validator] = []
        self._val_batches = self._fixed_validation_batches()
        self._check_data_fits_model(self._val_batches[0])
        self.validators.append(self._gap_validator)
        if tcfg.sample_steps > 0:
            self.video_encoder = build_video_encoder(job.data)
            self.validators.append(self._sample_validator)
        self._data_iter: Iterator[dict[str, Any]] | None = None
        self._resume()
        if self.dist.is_main:
            print(self.describe(), flush=True)

    def describe(self) -> str:
        """One paragraph on what this run trains: models, attention, data and where it resumes."""
        total = sum(p.numel() for p in self.student.parameters())
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        canvas = self.student.canvas_for(tuple(self._val_batches[0]["latents"].shape))
        att = self.job.attention
        if att.mode == "sta" and self.student.plan.train is not None:
            dens = density(canvas, att.tile, self.student.plan.train.reshape(-1, 3)).mean()
            attention = f"STA tile {att.tile}, mean video density {float(dens):.1%}"
        else:
            attention = "dense"
        teacher = "none"
        if self.teacher is not None:
            t_param = next(self.teacher.parameters())
            teacher = f"dense, {t_param.dtype}, on {t_param.device}"
        return "\n".join(
            [
                f"student  {self.job.model.flavor}: {total / 1e6:.2f}M parameters, "
                f"{trainable / 1e6:.2f}M trainable ({self.job.train.trainable}); {attention}; "
                f"token canvas {canvas}",
                f"teacher  {teacher}",
                f"data     {self.cache_dir} ({len(self.loader)} batches of "
                f"{self.job.train.batch_size} per epoch per rank, {self.dist.world_size} rank(s))",
                f"device   {self.device}, bf16 autocast {'on' if self.use_bf16 else 'off'}; "
                f"{'resuming at step ' + str(self.step) if self.step else 'starting at step 0'} "
                f"of {self.job.train.steps}",
            ]
        )

    # ------------------------------------------------------------------ building blocks
    def _prepare_data(self) -> Path:
        # every rank encodes its share of the missing cache shards; all return once it is whole
        return prepare_data(
            self.job.data,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            verbose=self.dist.is_main,
        )

    def _build_teacher(self) -> nn.Module:
        dcfg = self.job.distill
        model_cfg = self.job.model
        if dcfg.teacher_path is not None:
            model_cfg = dataclasses.replace(model_cfg, path=dcfg.teacher_path)
        dense = dataclasses.replace(self.job.attention, mode="full")
        if dcfg.teacher_device == "same":
            device = self.device
        else:
            device = torch.device(dcfg.teacher_device)
        use_bf16 = dcfg.teacher_dtype == "bf16" or (
            dcfg.teacher_dtype == "auto" and device.type == "cuda"
        )
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        if dcfg.teacher_path is None and model_cfg.path is None:
            # no pretrained weights anywhere: the teacher is the student's initial weights
            teacher = build_model(model_cfg, dense, device=device, dtype=torch.float32)
            teacher.load_state_dict(self.student.state_dict())
            cast_like_diffusers(teacher.transformer, dtype)  # keeps diffusers' fp32 modules
        else:
            teacher = build_model(model_cfg, dense, device=device, dtype=dtype)
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.use_bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _fixed_validation_batches(self) -> list[dict[str, Any]]:
        """Two batches with fixed noise and sigmas, drawn from an independent loader stream."""
        loader = build_train_loader(
            self.job.data,
            batch_size=self.job.train.batch_size,
            seed=self.job.train.seed + 1_000_003,
        )
        gen = torch.Generator().manual_seed(self.job.train.seed + 7)
        batches = []
        for batch, _ in zip(loader, range(2), strict=False):
            x0 = batch["latents"]
            sigma = torch.linspace(0.1, 0.9, x0.shape[0])
            noise = torch.randn(x0.shape, generator=gen)
            batches.append({**batch, "sigma": sigma, "noise": noise})
        return batches

    def _check_data_fits_model(self, batch: dict[str, Any]) -> None:
        """Fail at start-up, naming the fields, when the data cannot feed the model."""
        latents, text = batch["latents"], batch["text"]
        dit = self.student
        if latents.shape[1] != dit.in_channels:
            raise ValueError(
                f"the data gives {latents.shape[1]} latent channels (data.video_encoder="
                f"{self.job.data.video_encoder!r}) but model.flavor={self.job.model.flavor!r} "
                f"takes {dit.in_channels}"
            )
        if text.shape[-1] != dit.text_dim:
            raise ValueError(
                f"the data gives text states of width {text.shape[-1]} (data.text_encoder="
                f"{self.job.data.text_encoder!r}) but model.flavor={self.job.model.flavor!r} "
                f"takes {dit.text_dim}"
            )
        try:
            dit.canvas_for(tuple(latents.shape))
        except ValueError as err:
            raise ValueError(f"data.height/width/num_frames do not fit the model: {err}") from err

    # ------------------------------------------------------------------ forward pieces
    def _model_inputs(
        self,
        batch: dict[str, Any],
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Any]:
        def cast(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return {
            "latents": cast(x_t),
            "timestep": cast(sigma * 1000.0),
            "text": cast(batch["text"]),
            "text_mask": batch["text_mask"].to(device),
            "pooled_text": cast(batch["pooled_text"]),
        }

    @torch.no_grad()
    def _teacher_forward(
        self, batch: dict[str, Any], x_t: torch.Tensor, sigma: torch.Tensor, capture: bool
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
        assert self.teacher is not None
        device = next(self.teacher.parameters()).device
        dtype = next(self.teacher.parameters()).dtype
        inputs = self._model_inputs(batch, x_t, sigma, device, dtype)
        with self._autocast(device):
            if capture:
                with self.teacher.capture(layers=self.job.distill.layers, detach=True) as store:
                    out = self.teacher(**inputs)
                attn = {i: a.to(self.device) for i, a in store.layers.items()}
            else:
                out, attn = self.teacher(**inputs), None
        return out.to(self.device, torch.float32), attn

    def _losses(
        self, model: nn.Module, batch: dict[str, Any], noise: torch.Tensor, sigma: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        dcfg = self.job.distill
        x0 = batch["latents"]
        x_t = add_noise(x0, noise, sigma)
        target = velocity_target(x0, noise)
        want_attn = dcfg.w_attn > 0
        teacher_out = teacher_attn = None
        if self.teacher is not None:
            teacher_out, teacher_attn = self._teacher_forward(batch, x_t, sigma, capture=want_attn)
        inputs = self._model_inputs(batch, x_t, sigma, self.device)
        with self._autocast(self.device):
            if want_attn:
                with _unwrap(model).capture(layers=dcfg.layers) as store:
                    pred = model(**inputs)
                student_attn = store.layers
            else:
                pred, student_attn = model(**inputs), None
        return distillation_losses(
            student_out=pred.float(),
            target=target,
            teacher_out=teacher_out,
            student_attn=student_attn,
            teacher_attn=teacher_attn,
            w_data=dcfg.w_data,
            w_out=dcfg.w_out,
            w_attn=dcfg.w_attn,
            layers=dcfg.layers,
        )

    @torch.no_grad()
    def _gap_validator(self, model: nn.Module, step: int, tracker: Any) -> dict[str, float]:
        """Flow-matching loss and student-teacher gap on fixed batches, noise and sigmas."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        for batch in self._val_batches:
            batch = _to_device(batch, self.device)
            terms = self._losses(model, batch, batch["noise"], batch["sigma"])
            for key in ("data", "out", "attn"):
                if key in terms:
                    sums[key] = sums.get(key, 0.0) + float(terms[key])
        model.train(was_training)
        names = {"data": "val/flow_loss", "out": "val/student_teacher_mse", "attn": "val/attn_mse"}
        return {names[k]: v / len(self._val_batches) for k, v in sums.items()}

    @torch.no_grad()
    def _sample_validator(self, model: nn.Module, step: int, tracker: Any) -> dict[str, float]:
        """Generate videos from fixed noise and captions with the student (and the teacher).

        Writes ``samples/step_XXXXXXXX_k.mp4`` (student left, teacher right when distilling),
        logs them to the tracker and returns ``val/sample_gap_mse``: the mean squared
        difference between the student's and the teacher's generated latents from the same
        noise, the gap a user would see in the videos.
        """
        if not self.dist.is_main:
            return {}
        tcfg = self.job.train
        batch = self._val_batches[0]
        n = min(tcfg.num_samples, batch["latents"].shape[0])
        gen = torch.Generator().manual_seed(tcfg.seed + 11)
        noise = torch.randn(batch["latents"][:n].shape, generator=gen)
        cond = [batch["text"][:n], batch["text_mask"][:n], batch["pooled_text"][:n]]
        was_training = model.training
        model.eval()
        bf16 = self.use_bf16 and self.device.type == "cuda"
        args = {"steps": tcfg.sample_steps, "shift": tcfg.sample_shift}
        latents = [
            sample_latents(
                model,
                noise.to(self.device),
                *(c.to(self.device) for c in cond),
                autocast_bf16=bf16,
                **args,
            )
        ]
        model.train(was_training)
        metrics: dict[str, float] = {}
        if self.teacher is not None:
            device = next(self.teacher.parameters()).device
            teacher_bf16 = self.use_bf16 and device.type == "cuda"
            latents.append(
                sample_latents(
                    self.teacher,
                    noise.to(device),
                    *(c.to(device) for c in cond),
                    autocast_bf16=teacher_bf16,
                    **args,
                ).to(self.device)
            )
            metrics["val/sample_gap_mse"] = float(torch.mean((latents[0] - latents[1]) ** 2))
        videos = [self.video_encoder.decode(lat.cpu()) for lat in latents]  # each (n, 3, F, H, W)
        out_dir = self.run_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            frames = to_uint8_video(torch.cat([v[k] for v in videos], dim=-1))  # (F, H, W*m, 3)
            path = out_dir / f"step_{step:08d}_{k}.mp4"
            write_mp4(path, frames.numpy(), fps=self.job.data.synthetic_fps)
            tracker.log_video(f"samples/{k}", path, step, caption=batch["caption"][k])
        return metrics

    def validate(self, tracker: Any) -> dict[str, float]:
        """Run every registered validator on the unwrapped student (rank-0 values are logged)."""
        metrics: dict[str, float] = {}
        for validator in self.validators:
            metrics.update(validator(self.student, self.step, tracker))
        return metrics

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict[str, Any]:
        return {
            "rng": ckpt.rng_state(),
            "noise_rng": self.noise_rng.get_state(),
            "loader": self.loader.state_dict(),
        }

    def _save(self, rank_state: dict[str, Any] | None = None) -> Path:
        main = self.dist.is_main
        return ckpt.save_checkpoint(
            self.ckpt_dir,
            self.step,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            model_state=self.student.state_dict() if main else None,
            ema_state=self.ema.state_dict() if (main and self.ema) else None,
            optimizer_state=self.optimizer.state_dict() if main else None,
            trainer_state={"scheduler": self.scheduler.state_dict(), "step": self.step},
            rank_state=rank_state or self._rank_state(),
            keep_last=self.job.train.keep_last,
        )

    def _resume(self) -> None:
        path = ckpt.resolve_resume(self.job.train.resume, self.ckpt_dir, self.dist.is_main)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, rank=self.dist.rank, world_size=self.dist.world_size)
        self.student.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"train.ema_decay is set but checkpoint {path} has no EMA weights")
            self.ema.load_state_dict(state["ema"])
        self.loader.load_state_dict(state["rank"]["loader"])
        ckpt.set_rng_state(state["rank"]["rng"])
        self.noise_rng.set_state(state["rank"]["noise_rng"])
        self.step = state["step"]
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ export
    def export(self) -> Path:
        """Write the student (EMA weights if EMA is on) in diffusers format plus its windows."""
        out = self.run_dir / "export"
        if self.dist.is_main:
            if self.ema is not None:
                backup = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
                self.ema.copy_to(self.student)
            self.student.save_pretrained(out / "transformer")
            if self.job.attention.mode == "sta":
                self._export_strategy(out / "mask_strategy.json")
            (out / "stafinetune.json").write_text(
                json.dumps(
                    {
                        "step": self.step,
                        "ema": self.ema is not None,
                        "config": resolved_dict(self.job),
                    },
                    indent=2,
                )
            )
            if self.ema is not None:
                self.student.load_state_dict(backup)
        barrier()
        return out

    def _export_strategy(self, path: Path) -> None:
        """The windows the student was trained with, as a mask-strategy file for inference."""
        plan = self.student.plan
        canvas = list(self.student.canvas_for(tuple(self._val_batches[0]["latents"].shape)))
        tile = list(self.job.attention.tile)
        grid = torch.tensor([math.ceil(c / t) for c, t in zip(canvas, tile, strict=True)])
        train = torch.minimum(plan.train, grid)  # a window wider than the grid is the whole axis
        steps = train[None] if plan.steps is None else torch.minimum(plan.steps, grid)
        candidates = torch.unique(torch.cat([steps.reshape(-1, 3), train.reshape(-1, 3)]), dim=0)
        MaskStrategy.from_tensor(
            steps,
            canvas=canvas,
            tile=tile,
            candidates=candidates.tolist(),
            train_windows=train,
            metadata={"source": "stafinetune.trainer export", "step": self.step},
        ).save(path)

    # ------------------------------------------------------------------ the loop
    def _next_batch(self) -> dict[str, Any]:
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        return next(self._data_iter)

    def fit(self, until_step: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or stop early after ``until_step`` steps, for tests and
        time-boxed jobs); returns what the run produced."""
        tcfg, dcfg = self.job.train, self.job.distill
        main = self.dist.is_main
        stop = tcfg.steps if until_step is None else min(until_step, tcfg.steps)
        tracker = build_tracker(
            self.job.logging.backend,
            is_main=main,
            directory=self.run_dir,
            config=resolved_dict(self.job),
            project=self.job.logging.project,
            entity=self.job.logging.entity,
            name=self.job.logging.name,
            group=self.job.logging.group,
            tags=self.job.logging.tags,
            mode=self.job.logging.mode,
        )
        result = TrainResult(run_dir=self.run_dir, step=self.step, tracker_dir=tracker.run_dir)
        tokens_per_sample = math.prod(
            self.student.canvas_for(tuple(self._val_batches[0]["latents"].shape))
        )
        if self.step == 0 and self._val_batches:
            metrics = self.validate(tracker)
            result.val_history.append({"step": 0, **metrics})
            tracker.log(metrics, step=0)
        attn_modules = [self.student.attention] + (
            [self.teacher.attention] if self.teacher is not None else []
        )
        attn_timer = AttentionTimer(attn_modules, self.device)
        bar = tqdm(
            total=stop,
            initial=self.step,
            desc="train",
            disable=not (main and self.job.logging.progress),
            dynamic_ncols=True,
        )
        self.model.train()
        window_start = time.perf_counter()
        window_samples = 0
        last_ckpt: Path | None = None
        try:
            while self.step < stop:
                good_state = self._rank_state()  # the state a NaN would roll back to
                # time attention on the steps that get logged only: the others pay nothing
                timed = (self.step + 1) % tcfg.log_every == 0 or self.step + 1 == stop
                if timed:
                    self._sync()
                    step_start = time.perf_counter()
                    attn_timer.start()
                self.optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for micro in range(tcfg.grad_accum):
                    batch = _to_device(self._next_batch(), self.device)
                    x0 = batch["latents"]
                    noise = torch.randn(x0.shape, generator=self.noise_rng).to(self.device)
                    sigma = sample_sigmas(
                        x0.shape[0],
                        sampling=dcfg.timestep_sampling,
                        shift=dcfg.timestep_shift,
                        generator=self.noise_rng,
                    ).to(self.device)
                    sync = micro == tcfg.grad_accum - 1 or not isinstance(
                        self.model, DistributedDataParallel
                    )
                    ctx = contextlib.nullcontext() if sync else self.model.no_sync()
                    with ctx:
                        terms = self._losses(self.model, batch, noise, sigma)
                        (terms["total"] / tcfg.grad_accum).backward()
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0.0) + float(value.detach()) / tcfg.grad_accum
                    window_samples += x0.shape[0]
                params = [p for p in self.student.parameters() if p.requires_grad]
                if tcfg.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip))
                else:
                    grad_norm = float(
                        torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in params if p.grad is not None])
                        )
                    )
                if not (math.isfinite(sums["total"]) and math.isfinite(grad_norm)):
                    last_ckpt = self._save(good_state)
                    raise NonFiniteLossError(
                        f"non-finite loss at step {self.step + 1} (loss {sums['total']}, grad norm "
                        f"{grad_norm}; terms {sums}); the last good state is saved in {last_ckpt}. "
                        "Lower train.lr, enable train.grad_clip or check the data, then resume."
                    )
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.student)
                self.step += 1
                if timed:
                    attn_seconds = attn_timer.stop()  # synchronises CUDA
                    step_seconds = time.perf_counter() - step_start
                loss_mean = float(all_reduce_mean(torch.tensor(sums["total"])))
                result.losses.append(loss_mean)
                bar.update(1)
                if self.step % tcfg.log_every == 0 or self.step == stop:
                    elapsed = time.perf_counter() - window_start
                    rate = window_samples * self.dist.world_size / max(elapsed, 1e-9)
                    metrics = {
                        f"loss/{k}": float(all_reduce_mean(torch.tensor(v)))
                        for k, v in sums.items()
                    }
                    metrics.update(
                        {
                            "perf/attn_time_share": attn_seconds / max(step_seconds, 1e-9),
                            "perf/step_s": step_seconds,
                            "lr": self.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "perf/samples_per_s": rate,
                            "perf/tokens_per_s": rate * tokens_per_sample,
                        }
                    )
                    if self.device.type == "cuda":
                        metrics["perf/max_mem_gib"] = (
                            torch.cuda.max_memory_allocated(self.device) / 2**30
                        )
                    tracker.log(metrics, step=self.step)
                    bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{metrics['lr']:.2e}")
                    window_start, window_samples = time.perf_counter(), 0
                if tcfg.val_every and self.step % tcfg.val_every == 0 and self.step != stop:
                    metrics = self.validate(tracker)
                    result.val_history.append({"step": self.step, **metrics})
                    tracker.log(metrics, step=self.step)
                if tcfg.ckpt_every and self.step % tcfg.ckpt_every == 0 and self.step != stop:
                    last_ckpt = self._save()
            bar.close()
            last_ckpt = self._save()
            if self.step == tcfg.steps:
                metrics = self.validate(tracker)
                result.val_history.append({"step": self.step, **metrics})
                tracker.log(metrics, step=self.step)
                tracker.summary(metrics)
                if tcfg.export:
                    result.export_dir = self.export()
        finally:
            attn_timer.stop()
            bar.close()
            tracker.finish()
        result.step = self.step
        result.last_checkpoint = last_ckpt
        return result
