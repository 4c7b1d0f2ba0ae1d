"""The training loop: step, log, validate, checkpoint, each on its own cadence.

The parts come from elsewhere: models and data from :mod:`stafinetune.build`, parallel
wrappers and the optimiser engine from :mod:`stafinetune.parallel`, the loss computation from
the distillation method (:mod:`.distill` per step, :mod:`.fewstep` for few-step students),
validation from :mod:`.validation`, checkpoints from :mod:`.checkpoint`. :class:`Trainer`
assembles them once and :meth:`Trainer.fit` runs the loop. Everything the loop needs to
continue bit-exactly (weights, optimiser, scheduler, EMA, RNG states, data position, step, a
critic and its optimiser) is in each checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sta_kernels import density
from stafinetune.build import (
    build_critic,
    build_data,
    build_student,
    build_teacher,
    check_attention_backend,
    check_data_fits_model,
    encode_prompt,
    teacher_device,
    use_bf16,
)
from stafinetune.config import JobConfig, resolved_dict
from stafinetune.data import build_video_encoder
from stafinetune.errors import UserError, user_errors
from stafinetune.models import MaskStrategy, WindowPlan
from stafinetune.models.experts import (
    STRATEGY_FILES,
    ExpertDiT,
    expert_noise,
    save_model_state,
    window_plans,
)
from stafinetune.models.offload import ActivationOffloader
from stafinetune.models.profiling import AttentionTimer
from stafinetune.parallel import (
    World,
    all_reduce_mean,
    barrier,
    parallelize,
)
from stafinetune.parallel.engine import (
    build_dims,
    build_engine,
    fused_optimizer,
    parameter_numel,
)
from stafinetune.parallel.parallelize import parallelize_teacher

from .checkpoint import (
    CheckpointManager,
    TrainState,
    rng_state,
    seed_rng,
    set_rng_state,
)
from .distill import DistillStep
from .fewstep import DMD2Distill, FewStepBase, TrajectoryDistill, write_scheduler
from .figures import plot_training_curves
from .lora import (
    BaseModelTeacher,
    adapter_state_dict,
    export_lora,
    load_adapter_state_dict,
)
from .optim import EMA, apply_trainable, build_optimizer, build_scheduler
from .preemption import StopSignals
from .resume import (
    apply_optimizer_settings,
    check_resume_config,
    check_trusted,
    cut_logs,
    optimizer_settings,
    resolve_resume,
    resume_point,
)
from .tracking import build_tracker
from .validation import Validator

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
    """Raised when a loss or gradient norm is NaN/inf; a checkpoint of the last good state exists.

    A UserError: the command prints its message (what to change, where the checkpoint is) in
    one line and exits with code 2.
    """


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # mean total loss per optimiser step
    val_history: list[dict[str, float]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    export_dir: Path | None = None
    tracker_dir: Path | None = None
    stopped_by: str | None = None  # the signal that stopped the run early (e.g. SIGTERM)
    figures: list[Path] = field(default_factory=list)  # PNGs written at the end (rank 0)


class Trainer:
    """Assembles a run from a validated :class:`JobConfig` and trains it.

    Args:
        job: the validated configuration.
        run_dir: where checkpoints, exports, wandb files and the config go (shared by ranks).
        world: this process's place; initialised from the launcher's environment if None.
    """

    def __init__(self, job: JobConfig, run_dir: Path, world: World | None = None) -> None:
        self.job, self.run_dir = job, run_dir
        tcfg, pcfg = job.train, job.parallel
        with user_errors():  # parallel.sp that does not divide the launched processes
            self.dims = build_dims(
                tcfg.device, strategy=pcfg.strategy, sp=pcfg.sp, dp_replicate=pcfg.dp_replicate,
                world=world,
            )  # fmt: skip
        self.device = self.dims.device
        with user_errors():
            check_attention_backend(job.attention, self.device, training=True)
        self.checkpoints = CheckpointManager(
            run_dir / "checkpoints", self.dims, every=tcfg.ckpt_every, keep_last=tcfg.keep_last,
            config=resolved_dict(job),
        )  # fmt: skip
        self.checkpoints.check_writable()  # at start-up, not at the first save hours later
        with user_errors():  # before any data work: the run-directory and resume-config rules
            resumed = resolve_resume(tcfg.resume, self.checkpoints.ckpt_dir, self.dims.is_main)
            resumed = resume_point(run_dir, tcfg.resume, resumed)
            changes = check_resume_config(resumed, self.checkpoints.config) if resumed else []
        seed_rng(tcfg.seed)  # python, numpy and torch: a resume restores them from here
        self.data = build_data(job, self.dims)
        # building the cache draws from the global RNG only when it was missing; what trains
        # from it (LoRA dropout) must not depend on that
        seed_rng(tcfg.seed)
        with user_errors():  # model.path, attention windows and train.trainable
            self.student = build_student(job, self.device)
            for plan in window_plans(self.student, job.model.expert).values():
                plan.check_run_canvases(self.data.canvases, "this run trains on")
            apply_trainable(self.student, tcfg)  # freezes the rest (or adds a LoRA adapter)
            # a LoRA student's frozen base is its teacher (adapter off): no second copy
            shares_base = (
                tcfg.trainable == "lora" and job.distill.needs_teacher
                and job.distill.teacher_path is None and job.distill.teacher_device == "same"
            )  # fmt: skip
            self.teacher = None if shares_base else build_teacher(job, self.device)
            check_data_fits_model(self.data.val_batches[0], self.student, job)
        self.bf16 = use_bf16(tcfg.precision, self.device)
        off = job.offload
        # one offloader for the student's block inputs and the teacher's attention targets:
        # one side stream, one prefetch order through the backward
        self.offloader = (
            ActivationOffloader(self.device) if off.activations or off.teacher_attention else None
        )
        self.engine, sequence, configured = self._trained_engine(self.student, tcfg.lr)
        teacher_module = None
        if shares_base:
            self.teacher = teacher_module = BaseModelTeacher(self.student)
        elif self.teacher is not None:
            with user_errors():  # offload.block_swap beyond the teacher's blocks
                teacher_module = parallelize_teacher(
                    self.teacher, self.dims, shard=pcfg.teacher == "shard", deepspeed=None,
                    compile=job.model.compile,
                    # a teacher on the CPU (beside a LoRA student's swapped base) stays there
                    block_swap=off.block_swap if job.distill.teacher_device != "cpu" else None,
                )  # fmt: skip
        self.ema = None
        if tcfg.ema_decay:
            self.ema = EMA(self.student, tcfg.ema_decay, view=self.engine.local_view)
        self.critic, self.critic_engine = None, None
        self.distill = self._method(teacher_module, sequence)
        # noise and sigmas come from the trainer's own generator (different per dp rank, equal
        # within an sp group), so nothing drawing from the global RNG can shift them on resume
        self.noise_rng = torch.Generator().manual_seed(tcfg.seed + 1 + self.dims.dp_rank)
        few_step = isinstance(self.distill, FewStepBase)
        self.validator = Validator(
            step=self.distill,
            batches=self.data.val_batches,
            every=tcfg.val_every,
            sample_steps=tcfg.sample_steps,
            sample_shift=tcfg.sample_shift,
            num_samples=tcfg.num_samples,
            seed=tcfg.seed,
            decode=build_video_encoder(job.data).decode if tcfg.sample_steps > 0 else None,
            out_dir=run_dir / "samples",
            fps=job.data.synthetic_fps,
            is_main=self.dims.is_main,
            student_label="STA student" if job.attention.mode == "sta" else "student",
            student_schedule=self.distill.schedule if few_step else None,
            guidance=(self.distill.negative, job.distill.fewstep.guidance_scale)
            if few_step and self.distill.negative is not None
            else None,
            progress=job.logging.progress,
        )
        self.checkpoints.check_free_space(self._checkpoint_bytes())
        self.state = self._train_state()
        self.step = 0
        self._data_iter = None
        if resumed is not None:
            with user_errors():
                check_trusted(
                    resumed, run_dir, pickles=self.engine.pickles, trust=tcfg.trust_checkpoint
                )
            with user_errors():  # another world size, a refused pickle file
                self.step = self.checkpoints.load(resumed, self.state)
            apply_optimizer_settings(self.engine.scheduler, configured)
            if self.critic_engine is not None:
                apply_optimizer_settings(self.critic_engine.scheduler, self._critic_configured)
            if self.dims.is_main:
                log.info("resumed from %s at step %d", resumed, self.step)
                if changes:
                    log.warning(
                        "resuming with changed settings (applied from step %d): %s",
                        self.step, "; ".join(str(c) for c in changes),
                    )  # fmt: skip
        if self.dims.is_main:  # metrics.jsonl holds each step once
            cut_logs(run_dir, self.step if resumed is not None else None)

    def _trained_engine(self, model: Any, lr: float) -> tuple[Any, Any, list[dict[str, Any]]]:
        """Parallel wrapping, optimiser, schedule and engine of a trained model (the student,
        or a critic); returns (engine, its sequence split, the optimiser settings a resume
        must not overwrite)."""
        tcfg, pcfg, off = self.job.train, self.job.parallel, self.job.offload
        with user_errors():  # offload.block_swap beyond the model's blocks
            parallel = parallelize(
                model,
                self.dims,
                activation_checkpointing=self.job.model.gradient_checkpointing,
                checkpoint_policy=self.job.model.checkpoint_policy,
                compile=self.job.model.compile,
                bf16=self.bf16,
                # a two-expert student runs one expert per micro-batch: the other gets no gradient
                find_unused_parameters=pcfg.find_unused_parameters or isinstance(model, ExpertDiT),
                offload=self.offloader if off.activations else None,
                # a LoRA base is frozen: it swaps like a teacher (and is one, when shared)
                block_swap=off.block_swap if tcfg.trainable == "lora" else None,
            )
        optimizer = build_optimizer(
            model.named_parameters(), lr=lr, weight_decay=tcfg.weight_decay,
            betas=(tcfg.betas[0], tcfg.betas[1]), eps=tcfg.eps, fused=fused_optimizer(self.dims),
        )  # fmt: skip
        scheduler = build_scheduler(
            optimizer, warmup=tcfg.warmup_steps, total=tcfg.steps, schedule=tcfg.schedule,
            min_ratio=tcfg.min_lr_ratio,
        )  # fmt: skip
        configured = optimizer_settings(optimizer)
        engine = build_engine(
            parallel, optimizer, scheduler, self.dims, batch_size=tcfg.batch_size,
            grad_accum=tcfg.grad_accum, grad_clip=tcfg.grad_clip, bf16=self.bf16,
            deepspeed_file=pcfg.deepspeed_config,
        )  # fmt: skip
        return engine, parallel.sequence, configured

    def _method(self, teacher_module: Any, sequence: Any) -> Any:
        """The distillation method of ``distill.method`` (a few-step one builds its critic)."""
        job, tcfg = self.job, self.job.train
        common = {
            "cfg": job.distill, "teacher": self.teacher, "device": self.device, "bf16": self.bf16,
            "teacher_bf16": use_bf16(tcfg.precision, teacher_device(job.distill, self.device)),
            "teacher_module": teacher_module, "sequence": sequence,
            "target_offload": self.offloader if job.offload.teacher_attention else None,
        }  # fmt: skip
        if job.distill.method == "per_step":
            return DistillStep(**common, **expert_noise(job.model))
        common["control_seed"] = tcfg.seed
        fs = job.distill.fewstep
        if fs.guidance_scale != 1.0:
            common["negative"] = encode_prompt(job.data, fs.negative_prompt)
        if job.distill.method == "trajectory":
            return TrajectoryDistill(**common)
        with user_errors():
            self.critic = build_critic(job, self.device)
            apply_trainable(self.critic, tcfg)  # a LoRA student gets a LoRA critic
        self.critic_engine, _, self._critic_configured = self._trained_engine(
            self.critic, fs.critic_lr or tcfg.lr
        )
        return DMD2Distill(
            **common, critic_engine=self.critic_engine, critic_grad_clip=tcfg.grad_clip
        )

    def _checkpoint_bytes(self) -> int:
        """About how large one checkpoint is: the weights, and Adam's two moments and the EMA
        of the trainable ones in fp32."""
        total = trainable = 0
        models = [self.student] + ([self.critic] if self.critic is not None else [])
        for p in (p for model in models for p in model.parameters()):
            n = parameter_numel(p)
            total += n * p.element_size()
            trainable += n if p.requires_grad else 0
        return total + trainable * 4 * (2 + (self.ema is not None))

    def _train_state(self) -> TrainState:
        """What a checkpoint holds, as (get, set) pairs (the engine adds model and optimiser)."""
        state = TrainState()
        trained = [(self.engine, self.student, "")]
        if self.critic_engine is not None:
            trained.append((self.critic_engine, self.critic, "critic_"))
        main = self.dims.is_main
        for engine, model, prefix in trained:
            engine.checkpoint_parts(state, prefix=prefix)
            if self.job.train.trainable == "lora" and f"{prefix}model" in state.weights:
                # the base weights are frozen: the adapter only
                del state.weights[f"{prefix}model"]
                state.weights[f"{prefix}adapter"] = (
                    lambda m=model: adapter_state_dict(m) if main else None,
                    lambda tensors, m=model: load_adapter_state_dict(m, tensors),
                )
        if self.ema is not None:  # each rank averages the tensors it updates
            self.engine.add_param_state(
                state, "ema", self.ema.state_dict, self.ema.load_state_dict
            )
        state.trees["trainer"] = (lambda: {"step": self.step}, lambda tree: None)
        state.rank["rng"] = (rng_state, set_rng_state)
        state.rank["noise_rng"] = (self.noise_rng.get_state, self.noise_rng.set_state)
        if isinstance(self.distill, FewStepBase):
            control = self.distill.control
            state.rank["fewstep_control"] = (control.get_state, control.set_state)
        state.rank["loader"] = (self.data.loader.state_dict, self.data.loader.load_state_dict)
        return state

    def describe(self) -> str:
        """One paragraph on what this run trains: models, attention, data and where it resumes."""
        sizes = [(parameter_numel(p), p.requires_grad) for p in self.student.parameters()]
        total = sum(n for n, _ in sizes)
        trainable = sum(n for n, grad in sizes if grad)
        att, canvas = self.job.attention, self.data.export_canvas
        plans = window_plans(self.student, self.job.model.expert).values()
        plans = [p.train for p in plans if p.train is not None]
        if att.mode == "sta" and plans:
            windows = torch.cat([w.reshape(-1, 3) for w in plans])  # every expert's heads
            dens = density(canvas, att.tile, windows).mean()
            attention = f"STA tile {att.tile}, mean video density {float(dens):.1%}"
        else:
            attention = "dense"
        teacher = "none"
        if self.teacher is not None:
            t_param = next(self.teacher.parameters())
            teacher = f"dense, {t_param.dtype}, on {t_param.device}"
            if self.job.train.frozen_weights != "none":
                teacher += f", block linears in {self.job.train.frozen_weights}"
            if isinstance(self.teacher, BaseModelTeacher):
                teacher = f"the student's base model (LoRA adapter off), {teacher}"
        canvases = ", ".join(str(c) for c in self.data.canvases)
        where = f"resuming at step {self.step}" if self.step else "starting at step 0"
        return "\n".join(
            [
                f"student  {self.job.model.flavor}: {total / 1e6:.2f}M parameters, "
                f"{trainable / 1e6:.2f}M trainable ({self.job.train.trainable}); {attention}; "
                f"token canvas {canvases}",
                f"teacher  {teacher}",
                f"data     {self.data.cache_dir} ({len(self.data.loader)} batches of "
                f"{self.job.train.batch_size} per epoch per dp rank)",
                f"parallel {self.dims.describe()}; offload {self.job.offload.describe()}",
                f"device   {self.device}, bf16 autocast {'on' if self.bf16 else 'off'}; "
                f"{where} of {self.job.train.steps}",
            ]
        )

    # ------------------------------------------------------------------ one optimiser step
    def _next_batch(self) -> dict[str, Any]:
        if self._data_iter is None:
            self._data_iter = iter(self.data.loader)
        return next(self._data_iter)

    def train_step(self) -> dict[str, float]:
        """Forward, backward and update of one optimiser step; returns its scalar metrics.

        Raises:
            NonFiniteLossError: after saving the state from before this step.
        """
        tcfg = self.job.train
        good_state = self.state.rank_snapshot()  # the state a NaN rolls back to
        self.engine.zero_grad()
        sums, samples, tokens = self.distill.forward_backward(
            self.engine, self._next_batch, self.noise_rng, tcfg.grad_accum
        )
        grad_norm = self.engine.clip_grad_norm(tcfg.grad_clip)  # None: known after the step
        if not (math.isfinite(sums["total"]) and math.isfinite(grad_norm or 0.0)):
            saved = self.checkpoints.save(self.step, self.state, rank_state=good_state)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} (loss {sums['total']}, grad norm "
                f"{grad_norm}; terms {sums}); the last good state is saved in {saved}. "
                "Lower train.lr, enable train.grad_clip or check the data, then resume."
            )
        self.engine.step()
        if grad_norm is None:
            grad_norm = self.engine.last_grad_norm
        if self.ema is not None:
            self.ema.update(self.student)
        self.step += 1
        metrics = {k if k.endswith("grad_norm") else f"loss/{k}": v for k, v in sums.items()}
        metrics.update({"lr": self.engine.lr, "grad_norm": grad_norm,
                        "samples": float(samples), "tokens": float(tokens)})  # fmt: skip
        return metrics

    # ------------------------------------------------------------------ the loop
    def fit(self, until_step: int | None = None) -> TrainResult:
        """Train to ``train.steps`` (or stop early after ``until_step`` steps, for tests and
        time-boxed jobs); returns what the run produced.

        SIGTERM / SIGUSR1 on any rank stops every rank after the current step with a checkpoint
        (``result.stopped_by``); ``train.ckpt_minutes`` adds checkpoints by wall clock.
        """
        tcfg, main = self.job.train, self.dims.is_main
        last = tcfg.steps
        stop = last if until_step is None else min(until_step, last)
        tracker = self._tracker()
        result = TrainResult(run_dir=self.run_dir, step=self.step, tracker_dir=tracker.run_dir)
        attn_modules = [self.student.attention] + ([self.teacher.attention] if self.teacher else [])
        attn_modules = list({id(m): m for m in attn_modules}.values())  # a shared base: once
        # hooks inside compiled blocks would change their graphs: no attention timing there
        timer = AttentionTimer(attn_modules, self.device, enabled=not self.job.model.compile)
        bar = tqdm(total=stop, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (main and self.job.logging.progress))  # fmt: skip
        signals = StopSignals()
        try:
            signals.install()
            if self.step == 0 and self.validator.should_validate(0, last):
                self._validate(tracker, result)
            self.engine.module.train()
            rate = _Rate()
            saved_at, saved_time = None, time.monotonic()
            while self.step < stop:
                logged = (self.step + 1) % tcfg.log_every == 0 or self.step + 1 == stop
                if logged:  # time attention on logged steps only: the others pay nothing
                    self._sync()
                    start = time.perf_counter()
                    timer.start()
                metrics = self.train_step()
                rate.add(metrics.pop("samples"), metrics.pop("tokens"))
                due = 0 < 60 * tcfg.ckpt_minutes <= time.monotonic() - saved_time
                # one collective: the mean loss, and whether any rank was signalled or is due
                flags = [metrics["loss/total"], signals.received is not None, due]
                loss, signalled, due = all_reduce_mean(torch.tensor(flags)).tolist()
                result.losses.append(loss)
                bar.update(1)
                if logged:
                    attn_seconds, step_seconds = timer.stop(), time.perf_counter() - start
                    self._log(tracker, metrics, attn_seconds, step_seconds, rate)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}")
                if signalled:
                    name = signals.received.name if signals.received else "SIGTERM"
                    result.stopped_by = name  # another rank's signal: reported as SIGTERM
                    break
                if self.step < stop and self.validator.should_validate(self.step, last):
                    self._validate(tracker, result)
                if self.step < stop and (due or self.checkpoints.should_save(self.step, last)):
                    result.last_checkpoint = self.checkpoints.save(self.step, self.state)
                    saved_at, saved_time = self.step, time.monotonic()
            bar.close()
            if saved_at != self.step:
                result.last_checkpoint = self.checkpoints.save(self.step, self.state)
            if self.step == last and result.stopped_by is None:
                if self.validator.should_validate(last, last):
                    tracker.summary(self._validate(tracker, result))
                if tcfg.export:
                    result.export_dir = self.export()
                if main:
                    result.figures = self._write_figures(tracker)
        finally:
            signals.restore()
            timer.stop()
            bar.close()
            tracker.finish()
        result.step = self.step
        return result

    def _tracker(self) -> Any:
        return build_tracker(
            self.job.logging, is_main=self.dims.is_main, directory=self.run_dir,
            config=resolved_dict(self.job), resume=self.step > 0,
        )  # fmt: skip

    def _validate(self, tracker: Any, result: TrainResult) -> dict[str, float]:
        metrics = self.validator(self.student, self.step, tracker)
        result.val_history.append({"step": self.step, **metrics})
        tracker.log(metrics, step=self.step)
        return metrics

    def _write_figures(self, tracker: Any) -> list[Path]:
        """``figures/frame_strip.png`` (data, teacher, student at its first and last
        validation) and ``figures/curves.png`` (from ``metrics.jsonl``); logged as images."""
        out = self.run_dir / "figures"
        written = [
            self.validator.frame_strip(out / "frame_strip.png"),
            plot_training_curves(self.run_dir / "metrics.jsonl", out / "curves.png"),
        ]
        written = [path for path in written if path is not None]
        for path in written:
            tracker.log_image(f"figures/{path.stem}", path, self.step)
        return written

    def _log(
        self, tracker: Any, metrics: dict[str, float], attn_s: float, step_s: float, rate: _Rate
    ) -> None:
        """Average the step's metrics over ranks and log them with throughput and memory."""
        row = {k: float(all_reduce_mean(torch.tensor(v))) if k.startswith("loss/") else v
               for k, v in metrics.items()}  # fmt: skip
        samples_per_s, tokens_per_s = (r * self.dims.dp_size for r in rate.take())
        row.update(
            {
                "perf/attn_time_share": attn_s / max(step_s, 1e-9),
                "perf/step_s": step_s,
                "perf/samples_per_s": samples_per_s,
                "perf/tokens_per_s": tokens_per_s,
            }
        )
        if self.device.type == "cuda":
            row["perf/max_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        tracker.log(row, step=self.step)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ export
    def export(self) -> Path:
        """Write the student (EMA weights if EMA is on) as one consolidated diffusers folder
        plus its windows; every rank takes part (sharded weights are gathered to rank 0)."""
        out = self.run_dir / "export"
        ema = self.ema.applied(self.student) if self.ema is not None else contextlib.nullcontext()
        with ema:
            full = self.engine.full_state_dict()
        if self.dims.is_main:
            if self.job.train.trainable == "lora":  # from the gathered weights: FSDP2 shards
                export_lora(self.student, out, merge=self.job.train.lora_merge_export, state=full)
            else:  # transformer/ (and a two-expert model's transformer_2/)
                save_model_state(self.student, full, out, self.job.model)
            if self.job.attention.mode == "sta":
                for folder, plan in window_plans(self.student, self.job.model.expert).items():
                    self._export_strategy(plan, out / STRATEGY_FILES[folder])
            info = {"step": self.step, "ema": self.ema is not None,
                    "config": resolved_dict(self.job)}  # fmt: skip
            if isinstance(self.distill, FewStepBase):
                info["sampling"] = self._sampling()
                write_scheduler(out / "scheduler", self.distill.schedule)
            (out / "stafinetune.json").write_text(json.dumps(info, indent=2))
        barrier()
        return out

    def _export_strategy(self, plan: WindowPlan, path: Path) -> None:
        """The windows ``plan`` the student (or one of its experts) was trained with, as a
        mask-strategy file for inference."""
        MaskStrategy.from_plan(
            plan,
            canvas=self.data.export_canvas,
            tile=self.job.attention.tile,
            metadata={
                "source": "stafinetune.training.trainer export",
                "step": self.step,
                # sampling steps kept dense; enable_sta(strategy=...) applies it by default
                "dense_first_steps": plan.dense_first_steps,
                **({"sampling": self._sampling()} if isinstance(self.distill, FewStepBase) else {}),
                # the windows were trained on every bucket's canvas: each may be sampled
                "canvases": [list(c) for c in self.data.canvases],
            },
        ).save(path)

    def _sampling(self) -> dict[str, Any]:
        """How a few-step student samples: its schedule, and the guidance baked into it (it
        samples with guidance scale 1, one forward a step)."""
        fs = self.job.distill.fewstep
        return {
            **self.distill.schedule.to_dict(),
            "guidance_scale": 1.0,
            "baked_guidance_scale": fs.guidance_scale,
            "method": self.job.distill.method,
        }


class _Rate:
    """This rank's samples and video tokens per second since the last :meth:`take`."""

    def __init__(self) -> None:
        self.start, self.samples, self.tokens = time.perf_counter(), 0.0, 0.0

    def add(self, samples: float, tokens: float) -> None:
        self.samples += samples
        self.tokens += tokens

    def take(self) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rates = (self.samples / elapsed, self.tokens / elapsed)
        self.start, self.samples, self.tokens = now, 0.0, 0.0
        return rates
