"""The job configuration: typed dataclasses registered in Hydra's ConfigStore.

Each part owns its dataclass next to its code (models, data); this module owns the trainer's
groups and the root :class:`JobConfig`, and registers every schema so that YAML under
``conf/`` only sets values. Hydra stops at :func:`stafinetune.commands.train.main`, which converts the
composed config with :func:`to_job_config` (running every ``__post_init__`` validation) and
passes explicit objects down.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from stafinetune.data.config import DataConfig
from stafinetune.models.config import AttentionConfig, ModelConfig, OffloadConfig
from stafinetune.parallel.world import launched_rank

FROZEN_WEIGHTS = ("none", "bf16", "fp8")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class TrainConfig:
    """Optimisation and loop settings (group ``train``).

    Validation (``val_every``): at step 0, every ``val_every`` optimiser steps and at the
    last step; ``val_every=0`` never validates (no ``val/*`` metrics, sample videos or frame
    strip).
    """

    steps: int = 300  # optimiser steps
    batch_size: int = 4  # per data-parallel rank, per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"  # constant | cosine
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float | None = None  # e.g. 0.999; None disables EMA
    trainable: str = "all"  # all | attention | lora | a regex over parameter names
    lora_rank: int = 16  # LoRA rank r (trainable=lora)
    lora_alpha: float | None = None  # the update is alpha / r * B @ A; None: alpha = r
    lora_targets: list[str] | None = None  # module-name suffixes; None: STA q/k/v/out projections
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_merge_export: bool = False  # also export the merged transformer (export/transformer)
    # how frozen weights are stored: none (as built) | bf16 | fp8 (the separate teacher's
    # and, with trainable=lora, the base's block linears in bf16, lossless under bf16
    # autocast, or in float8 e4m3; stafinetune.models.bf16, stafinetune.models.fp8)
    frozen_weights: str = "none"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 10
    ckpt_every: int = 100  # 0: only the final checkpoint
    keep_last: int = 2  # checkpoints kept on disk
    ckpt_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last; 0 off
    resume: str = "auto"  # auto (latest in this run dir) | never | <checkpoint or run dir>
    # parallel=zero2/zero3 checkpoints are DeepSpeed's pickle files: resuming one from outside
    # this run directory needs this consent (they can run code when loaded)
    trust_checkpoint: bool = False
    val_every: int = 0  # validate at step 0, every N steps and at the end; 0: never
    export: bool = True  # write the final student in diffusers format
    sample_steps: int = 20  # Euler steps of the validation videos; 0: no videos
    num_samples: int = 2  # validation videos (student | teacher side by side)
    sample_shift: float = 1.0  # timestep shift of the sampling schedule

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"train.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.schedule in ("constant", "cosine"),
            f"train.schedule must be constant or cosine, got {self.schedule!r}",
        )
        _check(
            0 <= self.min_lr_ratio <= 1,
            f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}",
        )
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _check(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            f"train.ema_decay must lie in (0, 1) or be null, got {self.ema_decay}",
        )
        _check(self.lora_rank >= 1, f"train.lora_rank must be >= 1, got {self.lora_rank}")
        _check(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"train.lora_alpha must be > 0 or null (= lora_rank), got {self.lora_alpha}",
        )
        _check(
            self.lora_targets is None
            or (len(self.lora_targets) > 0 and all(str(t).strip() for t in self.lora_targets)),
            "train.lora_targets must be null (the STA layers' to_q/to_k/to_v/to_out.0) or a "
            f"non-empty list of module names, got {self.lora_targets}",
        )
        _check(
            0 <= self.lora_dropout < 1,
            f"train.lora_dropout must lie in [0, 1), got {self.lora_dropout}",
        )
        _check(
            not self.lora_merge_export or self.trainable == "lora",
            "train.lora_merge_export=true needs train.trainable=lora, got "
            f"train.trainable={self.trainable!r}",
        )
        _check(
            self.frozen_weights in FROZEN_WEIGHTS,
            f"train.frozen_weights must be one of {', '.join(FROZEN_WEIGHTS)}, "
            f"got {self.frozen_weights!r}",
        )
        _check(
            self.device in ("auto", "cpu", "cuda"),
            f"train.device must be auto, cpu or cuda, got {self.device!r}",
        )
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            f"train.precision must be auto, fp32 or bf16, got {self.precision!r}",
        )
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.ckpt_every >= 0, f"train.ckpt_every must be >= 0, got {self.ckpt_every}")
        _check(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _check(self.ckpt_minutes >= 0, f"train.ckpt_minutes must be >= 0, got {self.ckpt_minutes}")
        _check(self.val_every >= 0, f"train.val_every must be >= 0, got {self.val_every}")
        _check(self.sample_steps >= 0, f"train.sample_steps must be >= 0, got {self.sample_steps}")
        _check(self.num_samples >= 1, f"train.num_samples must be >= 1, got {self.num_samples}")
        _check(
            self.sample_shift >= 1.0, f"train.sample_shift must be >= 1, got {self.sample_shift}"
        )


DISTILL_METHODS = ("per_step", "dmd2", "trajectory")


@dataclass
class FewStepConfig:
    """The few-step student of ``distill.method=dmd2`` / ``trajectory`` (``distill.fewstep``).

    The student samples in ``steps`` model evaluations, every one of them STA, at the levels
    ``sigmas`` (default: ``steps`` evenly spaced levels from 1, shifted by ``shift``; the
    sampler ends at 0), moving between them by re-noising its x0 prediction with fresh noise
    (``stochastic``) or by an Euler step. Guidance is baked in: the teacher gives its
    classifier-free guided prediction at ``guidance_scale`` (1: no guidance) against
    ``negative_prompt``, and the student samples without guidance.

    Attributes:
        steps, shift, sigmas, stochastic: the student's sampling schedule (see above).
        guidance_scale, negative_prompt: the teacher's guidance, baked into the student.
        critic_ratio: ``dmd2``: critic (fake score) updates per student update.
        critic_lr: ``dmd2``: the critic's learning rate; null: ``train.lr``.
        critic_attention: ``dmd2``: ``sta`` (the student's windows) or ``full`` (dense).
        score_t_min, score_t_max: ``dmd2``: range of the noise levels at which the teacher's
            and the critic's predictions of the student's samples are compared.
        teacher_steps: ``trajectory``: Euler steps of the teacher over the whole schedule,
            spread evenly over the student's steps (each segment gets teacher_steps / steps).
    """

    steps: int = 4
    shift: float = 1.0
    sigmas: list[float] | None = None
    stochastic: bool = True
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    critic_ratio: int = 5
    critic_lr: float | None = None
    critic_attention: str = "sta"
    score_t_min: float = 0.02
    score_t_max: float = 0.98
    teacher_steps: int = 20

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"distill.fewstep.steps must be >= 1, got {self.steps}")
        _check(self.shift >= 1.0, f"distill.fewstep.shift must be >= 1, got {self.shift}")
        if self.sigmas is not None:
            levels = list(self.sigmas)
            _check(
                len(levels) == self.steps
                and all(0 < s <= 1 for s in levels)
                and all(a > b for a, b in zip(levels, levels[1:], strict=False)),
                f"distill.fewstep.sigmas must be distill.fewstep.steps={self.steps} levels "
                f"decreasing within (0, 1], got {levels}",
            )
        _check(
            self.guidance_scale >= 1.0,
            f"distill.fewstep.guidance_scale must be >= 1 (1: no guidance), got {self.guidance_scale}",
        )
        _check(
            self.critic_ratio >= 1,
            f"distill.fewstep.critic_ratio must be >= 1, got {self.critic_ratio}",
        )
        _check(
            self.critic_lr is None or self.critic_lr > 0,
            f"distill.fewstep.critic_lr must be > 0 or null (= train.lr), got {self.critic_lr}",
        )
        _check(
            self.critic_attention in ("sta", "full"),
            f"distill.fewstep.critic_attention must be sta or full, got {self.critic_attention!r}",
        )
        _check(
            0 < self.score_t_min < self.score_t_max <= 1,
            "distill.fewstep.score_t_min and score_t_max must satisfy 0 < min < max <= 1, got "
            f"{self.score_t_min} and {self.score_t_max}",
        )
        _check(
            self.teacher_steps >= self.steps and self.teacher_steps % self.steps == 0,
            f"distill.fewstep.teacher_steps must be a multiple of distill.fewstep.steps="
            f"{self.steps}, got {self.teacher_steps}",
        )


@dataclass
class DistillConfig:
    """What the student learns from, and how (group ``distill``: sta, none, dmd2, trajectory).

    ``method``:

    - ``per_step`` (``distill=sta`` and ``distill=none``): at each sampled noise level,
      loss = w_attn * mean over layers of MSE(student STA attention output, teacher dense
      attention output) + w_out * MSE(student output, teacher output) + w_data *
      flow-matching MSE against the data. With w_attn = w_out = 0 no teacher is built (plain
      finetuning).
    - ``dmd2``: a few-step STA student (``fewstep``) by distribution matching: it generates
      from noise in its own steps; the dense teacher's guided prediction of its noised sample
      gives the real score, a trainable critic of the same architecture the fake score, and the
      student moves its sample along their difference (DMD2). The critic learns the student's
      samples by flow matching, ``fewstep.critic_ratio`` updates per student update.
    - ``trajectory``: a few-step student by trajectory segments: on the teacher's own guided
      Euler trajectory from noise, the teacher's steps from a student level to the next are
      the target of the student's one step.

    The per-step terms (w_attn, w_out, w_data) stay usable beside ``dmd2`` / ``trajectory``
    as auxiliary losses on noised data. A teacher needs weights (``teacher_path`` or
    ``model.path``): distilling from the student's own random initialisation is refused unless
    ``allow_random_teacher`` (tests).
    """

    method: str = "per_step"
    w_data: float = 1.0
    w_out: float = 0.0
    w_attn: float = 0.0
    layers: list[int] | None = None  # STA layers in the attention loss; None = all
    timestep_sampling: str = "logit_normal"  # uniform | logit_normal
    timestep_shift: float = 1.0
    teacher_path: str | None = None  # local diffusers dir; None = the student's model.path
    teacher_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    teacher_device: str = "same"  # same (the student's device) | cpu | cuda:N
    allow_random_teacher: bool = False  # distil from random weights when no path is set (tests)
    # dtype the teacher's captured attention outputs are kept in: auto (as computed: bf16
    # under bf16 autocast) | bf16 (halves them when the teacher runs in fp32)
    teacher_attn_dtype: str = "auto"
    fewstep: FewStepConfig = field(default_factory=FewStepConfig)

    @property
    def few_step(self) -> bool:
        """Whether the student is a few-step sampler (``dmd2`` or ``trajectory``)."""
        return self.method in ("dmd2", "trajectory")

    @property
    def needs_teacher(self) -> bool:
        return self.few_step or self.w_attn > 0 or self.w_out > 0

    def __post_init__(self) -> None:
        _check(
            self.method in DISTILL_METHODS,
            f"distill.method must be one of {', '.join(DISTILL_METHODS)}, got {self.method!r}",
        )
        for name in ("w_data", "w_out", "w_attn"):
            value = getattr(self, name)
            _check(value >= 0, f"distill.{name} must be >= 0, got {value}")
        _check(
            self.few_step or self.w_data + self.w_out + self.w_attn > 0,
            "distill.w_data, distill.w_out and distill.w_attn are all 0: nothing to train",
        )
        _check(
            self.timestep_sampling in ("uniform", "logit_normal"),
            f"distill.timestep_sampling must be uniform or logit_normal, got {self.timestep_sampling!r}",
        )
        _check(
            self.timestep_shift >= 1.0,
            f"distill.timestep_shift must be >= 1, got {self.timestep_shift}",
        )
        _check(
            self.teacher_dtype in ("auto", "fp32", "bf16"),
            f"distill.teacher_dtype must be auto, fp32 or bf16, got {self.teacher_dtype!r}",
        )
        _check(
            self.teacher_attn_dtype in ("auto", "bf16"),
            f"distill.teacher_attn_dtype must be auto or bf16, got {self.teacher_attn_dtype!r}",
        )
        _check(
            self.teacher_device in ("same", "cpu") or self.teacher_device.startswith("cuda"),
            f"distill.teacher_device must be same, cpu or cuda[:N], got {self.teacher_device!r}",
        )
        _check(
            self.method != "trajectory" or not self.fewstep.stochastic,
            "distill.method=trajectory trains Euler steps: distill.fewstep.stochastic must be "
            "false",
        )


PARALLEL_STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass
class ParallelConfig:
    """How the launched processes share the work (group ``parallel``: ddp, fsdp2, zero2, zero3).

    Attributes:
        strategy: how the student's parameters live on the data-parallel ranks: ``ddp``
            replicates them (gradients all-reduced); ``fsdp2`` shards them with torch's
            ``fully_shard`` per transformer block; ``zero2`` / ``zero3`` hand the student to
            DeepSpeed (ZeRO stage 2 shards optimiser state and gradients, stage 3 also the
            parameters).
        sp: Ulysses sequence-parallel degree; divides the number of processes and the heads.
        dp_replicate: ``fsdp2`` only: replica groups of hybrid sharding (1: shard over all).
        teacher: ``replicate`` the frozen teacher on every rank, or ``shard`` it
            (``fsdp2``: fully_shard; ``zero3``: a DeepSpeed inference engine).
        deepspeed_config: a DeepSpeed JSON file to start from (``zero2``/``zero3``); the
            micro-batch size, accumulation and clipping always come from ``train``.
        find_unused_parameters: DDP's option, for trainable weights that get no gradient.
    """

    strategy: str = "ddp"
    sp: int = 1
    dp_replicate: int = 1
    teacher: str = "replicate"
    deepspeed_config: str | None = None
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        _check(
            self.strategy in PARALLEL_STRATEGIES,
            f"parallel.strategy must be one of {PARALLEL_STRATEGIES}, got {self.strategy!r}",
        )
        _check(self.sp >= 1, f"parallel.sp must be >= 1, got {self.sp}")
        _check(
            self.dp_replicate >= 1, f"parallel.dp_replicate must be >= 1, got {self.dp_replicate}"
        )
        _check(
            self.dp_replicate == 1 or self.strategy == "fsdp2",
            f"parallel.dp_replicate={self.dp_replicate} (hybrid sharding) needs "
            f"parallel.strategy=fsdp2, got {self.strategy!r}",
        )
        _check(
            self.teacher in ("replicate", "shard"),
            f"parallel.teacher must be replicate or shard, got {self.teacher!r}",
        )
        _check(
            self.teacher == "replicate" or self.strategy in ("fsdp2", "zero3"),
            f"parallel.teacher=shard needs parallel.strategy=fsdp2 or zero3, got {self.strategy!r}",
        )
        _check(
            self.deepspeed_config is None or self.strategy in ("zero2", "zero3"),
            "parallel.deepspeed_config is only read by parallel.strategy=zero2 or zero3, "
            f"got {self.strategy!r}",
        )


@dataclass
class LoggingConfig:
    """Experiment tracking (group ``logging``: wandb or none)."""

    backend: str = "wandb"  # wandb | none
    project: str = "stafinetune"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto (online when a key is configured, else offline) | online | offline
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self) -> None:
        _check(
            self.backend in ("wandb", "none"),
            f"logging.backend must be wandb or none, got {self.backend!r}",
        )
        _check(
            self.mode in ("auto", "online", "offline"),
            f"logging.mode must be auto, online or offline, got {self.mode!r}",
        )


@dataclass
class JobConfig:
    """Root of the composed configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    run_dir: str | None = None  # None: Hydra's output directory of this run
    # keys an experiment needs the user to set (e.g. model.path); checked at start-up
    required: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.distill.needs_teacher:
            _check(
                self.attention.mode == "sta",
                f"{self.distill.method} distillation (or distill.w_attn/w_out > 0) makes an STA "
                f"student from a dense teacher, but attention.mode={self.attention.mode!r}",
            )
            _check(
                self.model.path is not None
                or self.distill.teacher_path is not None
                or self.distill.allow_random_teacher,
                "distilling needs a trained teacher, but neither model.path nor "
                "distill.teacher_path is set: the teacher would be the student's own random "
                f"weights (model.flavor={self.model.flavor}). Set one of them, use distill=none, "
                "or distill.allow_random_teacher=true (for tests)",
            )
        _check(
            not self.distill.few_step or self.attention.dense_first_steps == 0,
            f"distill.method={self.distill.method} trains a student that samples every step with "
            f"STA: attention.dense_first_steps must be 0, got {self.attention.dense_first_steps}",
        )
        frozen = self.train.frozen_weights
        if frozen != "none":
            _check(
                self.distill.needs_teacher or self.train.trainable == "lora",
                f"train.frozen_weights={frozen} stores the frozen teacher and a LoRA base in "
                f"{frozen}, but this run has neither (distill.w_attn = distill.w_out = 0 and "
                f"train.trainable={self.train.trainable!r})",
            )
            _check(
                self.parallel.strategy in ("ddp", "fsdp2"),
                f"train.frozen_weights={frozen} needs parallel.strategy=ddp or fsdp2, got "
                f"{self.parallel.strategy!r}",
            )
        _check(
            self.parallel.sp == 1 or self.distill.teacher_device == "same",
            f"parallel.sp={self.parallel.sp} runs the teacher under the same sequence split, so "
            f"distill.teacher_device must be same, got {self.distill.teacher_device!r}",
        )
        _check(
            not (self.model.expert == "low" and self.train.lora_merge_export),
            "train.lora_merge_export writes export/transformer, the high-noise expert's folder; "
            "with model.expert=low export the adapter alone and load it with diffusers' "
            "load_lora_weights(..., load_into_transformer_2=True)",
        )
        if self.model.image_to_video:  # Wan 2.2 TI2V: (B, S) timesteps, a given first frame
            _check(
                self.distill.method == "per_step",
                "model.image_to_video (a clean first latent frame at timestep 0) supports "
                "distill.method=per_step, whose losses leave that frame out; got "
                f"{self.distill.method!r}",
            )
        if self.model.expert == "both":  # one ExpertDiT student (stafinetune/models/experts.py)
            both = "model.expert=both (one student routing samples to two experts) supports"
            _check(
                self.distill.method == "per_step",
                f"{both} distill.method=per_step, got {self.distill.method!r}; train one "
                "expert at a time (model.expert=high / low) for few-step methods",
            )
            # data-parallel ranks draw their own noise levels, so they may run different
            # experts in one step: DDP skips the unused one, but a sharded wrapper's per-block
            # collectives would pair one expert's blocks with the other's
            _check(
                self.parallel.strategy == "ddp",
                f"{both} parallel.strategy=ddp (with any parallel.sp), got "
                f"{self.parallel.strategy}; train one expert at a time (model.expert=high / "
                "low) to shard it",
            )
            _check(
                self.train.trainable != "lora" and not self.model.compile,
                f"{both} neither train.trainable=lora nor model.compile=true; train one "
                "expert at a time (model.expert=high / low) for those",
            )
        _check_offload(self)


def _check_offload(job: JobConfig) -> None:
    """The ``offload`` levers against the rest of the job (each names the fields it needs)."""
    off, model, par = job.offload, job.model, job.parallel
    lora = job.train.trainable == "lora"
    if off.activations:
        _check(
            model.gradient_checkpointing,
            "offload.activations moves the block inputs that gradient checkpointing keeps: "
            "it needs model.gradient_checkpointing=true",
        )
        _check(
            not model.compile,
            "offload.activations runs autograd's saved-tensor hooks around each checkpointed "
            "block, which torch.compile cannot trace in one graph: set model.compile=false",
        )
    _check(
        not off.teacher_attention or job.distill.w_attn > 0,
        "offload.teacher_attention keeps the attention loss's targets on the host, but "
        "distill.w_attn=0 captures none",
    )
    if off.block_swap is None:
        return
    separate_teacher = job.distill.needs_teacher and not (
        lora and job.distill.teacher_path is None and job.distill.teacher_device == "same"
    )
    _check(
        lora or separate_teacher,
        "offload.block_swap swaps frozen weights (the dense teacher's, or a LoRA student's "
        "base), but this job has none: no teacher (distill.w_attn/w_out are 0) and "
        f"train.trainable={job.train.trainable!r}",
    )
    _check(
        not model.compile,
        "offload.block_swap replaces block weights between calls, which recompiles compiled "
        "blocks: set model.compile=false",
    )
    _check(
        not separate_teacher or par.teacher == "replicate",
        "offload.block_swap moves whole blocks to the GPU, but parallel.teacher=shard splits "
        "them over the GPUs already: use one or the other",
    )
    _check(
        lora or job.distill.teacher_device != "cpu",
        "offload.block_swap swaps the teacher's blocks onto its GPU, but distill.teacher_device"
        "=cpu runs the teacher on the CPU: use one or the other",
    )
    if lora:
        _check(
            par.strategy == "ddp",
            "offload.block_swap with train.trainable=lora swaps the student's frozen base, which "
            f"parallel.strategy={par.strategy} shards or hands to DeepSpeed: use parallel=ddp "
            "(the base is frozen, so sharding it saves nothing an adapter's optimiser needs)",
        )
        _check(
            model.gradient_checkpointing,
            "offload.block_swap with train.trainable=lora swaps the student's base, whose "
            "weights the autograd graph would hold until the backward: it needs "
            "model.gradient_checkpointing=true",
        )


def register_configs() -> None:
    """Register the root and group schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=JobConfig)
    for group, node in (
        ("model", ModelConfig),
        ("attention", AttentionConfig),
        ("data", DataConfig),
        ("train", TrainConfig),
        ("distill", DistillConfig),
        ("parallel", ParallelConfig),
        ("logging", LoggingConfig),
        ("offload", OffloadConfig),
    ):
        cs.store(group=group, name=f"base_{group}", node=node)


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Validate a composed config and turn it into dataclass objects.

    Raises ValueError naming the first bad field, every mandatory (``???``) field left unset,
    or a key that a typed group has no field for (``+train.stepz=10``).
    """
    unknown = _unknown_keys(cfg, "")
    if unknown:
        raise ValueError("; ".join(unknown))
    missing = set(OmegaConf.missing_keys(cfg))
    for key in cfg.get("required", []):
        if OmegaConf.select(cfg, key, default=None, throw_on_missing=False) is None:
            missing.add(key)
    missing = sorted(missing)
    if missing:
        raise ValueError(
            f"mandatory config values are not set: {', '.join(missing)} "
            f"(pass them as overrides, e.g. {missing[0]}=...)"
        )
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def unknown_key_message(full_key: str, schema: type) -> str:
    """The message for a dotted key that the dataclass ``schema`` (its group) has no field
    for, with the closest field as a suggestion::

        unknown config key train.stepz (no such field in TrainConfig; did you mean train.steps?)
    """
    prefix, _, key = str(full_key).rpartition(".")
    names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"unknown config key {full_key} (no such field in {schema.__name__}{hint})"


def _unknown_keys(node: Any, prefix: str) -> list[str]:
    """One message per key of a dataclass-typed node that its dataclass has no field for
    (Hydra's ``+group.key=value`` adds such keys silently); free-form dicts take any key."""
    problems: list[str] = []
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            if not OmegaConf.is_interpolation(node, i):
                problems += _unknown_keys(node[i], f"{prefix}{i}.")
        return problems
    if not isinstance(node, DictConfig):
        return problems
    schema = OmegaConf.get_type(node)
    names = (
        [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    )
    for key in node.keys():
        path = f"{prefix}{key}"
        if names is not None and key not in names:
            problems.append(unknown_key_message(path, schema))
        elif not OmegaConf.is_interpolation(node, key):
            problems += _unknown_keys(node[key], f"{path}.")
    return problems


def compose_job_config(overrides: list[str] | None = None, *, validate: bool = True) -> Any:
    """Compose ``conf/config.yaml`` plus command-line style overrides without running a job.

    For notebooks, scripts and tests: the same composition as ``stafinetune-train``, with no
    output directory. Returns a :class:`JobConfig` (``validate=True``) or the raw DictConfig.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return to_job_config(cfg) if validate else cfg


def conf_dir() -> Path:
    """The ``conf/`` tree: the repository's in an editable install, else the packaged copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml next to {here}")


def _rank_resolver() -> str:
    return str(launched_rank())


def asset_path(name: str) -> str:
    """Absolute path of a file or folder shipped in ``stafinetune/assets``."""
    path = Path(__file__).resolve().parent / "assets" / name
    if not path.exists():
        raise FileNotFoundError(f"stafinetune ships no asset {name!r} (looked at {path})")
    return str(path)


def register_resolvers() -> None:
    """Register the config interpolations.

    ``${stafinetune.rank:}``: the launcher's global rank, for per-rank Hydra outputs.
    ``${stafinetune.asset:NAME}``: a path inside the installed package's ``assets/``.
    """
    if not OmegaConf.has_resolver("stafinetune.rank"):
        OmegaConf.register_new_resolver("stafinetune.rank", _rank_resolver)
    if not OmegaConf.has_resolver("stafinetune.asset"):
        OmegaConf.register_new_resolver("stafinetune.asset", asset_path)


def resolved_dict(job: Any) -> dict[str, Any]:
    """Plain-dict view of a validated job config, any command's (for wandb and the run
    directory)."""
    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)  # type: ignore[return-value]


register_configs()
register_resolvers()
