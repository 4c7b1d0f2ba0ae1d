"""Build the parts of a run from their config slices: data, student, teacher, critic,
validation batches.

Every command (train, and the search / sample / eval commands) makes its models and data
here, so they all see the same student, the same teacher and the same fixed batches. Nothing
here trains, logs or checkpoints, and nothing here knows about process groups beyond the
data-parallel coordinates it is handed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stafinetune.config import DistillConfig, JobConfig
from stafinetune.data import DataConfig, TrainLoader, build_train_loader, prepare_data
from stafinetune.errors import user_errors
from stafinetune.models import AttentionConfig, ModelConfig, VideoDiT, build_model
from stafinetune.models.bf16 import apply_frozen_weights
from stafinetune.models.dit import (
    cast_like_diffusers,
    model_image_dims,
    model_patch_size,
    token_canvas,
)
from stafinetune.models.experts import model_parts
from stafinetune.models.families import ImageDims
from stafinetune.models.flavors import get_flavor
from stafinetune.parallel import ParallelDims

log = logging.getLogger(__name__)

# Seed offsets of the independent random streams derived from ``train.seed``.
VALIDATION_LOADER_SEED = 1_000_003
VALIDATION_NOISE_SEED = 7


def use_bf16(precision: str, device: torch.device) -> bool:
    """The one bf16 decision: ``auto`` means bf16 on CUDA and fp32 elsewhere.

    ``precision`` is ``train.precision`` or ``distill.teacher_dtype`` (``auto``/``fp32``/``bf16``).
    """
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``bf16``; nothing otherwise (CPU runs stay fp32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_attention_backend(
    attention_cfg: AttentionConfig, device: torch.device, *, training: bool
) -> None:
    """Fail at start-up when the STA backend cannot run the job on ``device``.

    torch's ``flex_attention`` has no CPU backward: ``flex`` trains only on CUDA (it samples
    on the CPU). The triton backend's own device check happens when the model is built.
    """
    if (
        attention_cfg.mode == "sta"
        and attention_cfg.backend == "flex"
        and device.type == "cpu"
        and training
    ):
        raise ValueError(
            "attention.backend=flex cannot train on the CPU (torch's flex_attention has no CPU "
            "backward); use attention.backend=auto or reference on the CPU, flex or triton on CUDA"
        )


def check_data_geometry(data_cfg: DataConfig, model_cfg: ModelConfig) -> list[tuple[int, int, int]]:
    """Token canvas of every data bucket; fails before any encoding when one cannot feed the model.

    Returns:
        One (T, Hc, Wc) token canvas per bucket of ``data_cfg``, in bucket order.
    """
    check_image_fits_model(None, model_image_dims(model_cfg), data_cfg, model_cfg)
    patch = model_patch_size(model_cfg)
    canvases = []
    for bucket, grid in zip(data_cfg.all_buckets(), data_cfg.latent_grids(), strict=True):
        try:
            canvases.append(token_canvas(grid, patch))
        except ValueError as err:
            raise ValueError(
                f"data bucket {bucket} (data.num_frames/height/width or data.buckets) gives "
                f"latents of {list(grid)} (T, H, W), which model.flavor={model_cfg.flavor!r} "
                f"cannot patch: {err}"
            ) from None
    return canvases


def check_data_fits_model(batch: dict[str, Any], dit: VideoDiT, job: JobConfig) -> None:
    """Fail at start-up, naming the fields, when a batch's channels or text width mismatch."""
    latents, text = batch["latents"], batch["text"]
    if latents.shape[1] != dit.in_channels:
        raise ValueError(
            f"the data gives {latents.shape[1]} latent channels (data.video_encoder="
            f"{job.data.video_encoder!r}) but model.flavor={job.model.flavor!r} "
            f"takes {dit.in_channels}"
        )
    if text.shape[-1] != dit.text_dim:
        raise ValueError(
            f"the data gives text states of width {text.shape[-1]} (data.text_encoder="
            f"{job.data.text_encoder!r}) but model.flavor={job.model.flavor!r} "
            f"takes {dit.text_dim}"
        )
    check_image_fits_model(batch.get("image_embeds"), dit.image_dims, job.data, job.model)
    text_2 = batch.get("text_2")  # (B, L2, D2): a text encoder with a glyph stream
    check_glyph_fits_model(None if text_2 is None else text_2.shape[-1], dit, job.data, job.model)


def check_glyph_fits_model(
    glyph_dim: int | None, dit: VideoDiT, data_cfg: DataConfig, model_cfg: ModelConfig
) -> None:
    """Fail naming ``data.text_encoder`` when the data's glyph-text states of width
    ``glyph_dim`` (None: a text encoder without a glyph stream) do not fit ``dit``."""
    if glyph_dim is None:
        return
    transformer = getattr(dit, "transformer", None)
    width = None if transformer is None else dit.adapter.glyph_dim(transformer.config)
    if width is None:
        raise ValueError(
            f"data.text_encoder={data_cfg.text_encoder!r} gives glyph-text states, but "
            f"model.flavor={model_cfg.flavor!r} takes none: use that model's text encoder"
        )
    if glyph_dim != width:
        raise ValueError(
            f"the data gives glyph-text states of width {glyph_dim} (data.text_encoder_2_path="
            f"{data_cfg.text_encoder_2_path!r}) but model.flavor={model_cfg.flavor!r} takes {width}"
        )


def check_image_fits_model(
    image_embeds: torch.Tensor | None,
    dims: ImageDims | None,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
) -> None:
    """Fail naming ``data.image_encoder`` when the data's image condition (its image states
    (B, N, Di), None before encoding) does not fit the model's image inputs ``dims`` (None:
    a text-to-video model)."""
    flavor = model_cfg.flavor
    if dims is None and data_cfg.image_encoder is not None:
        ti2v = " (or model.image_to_video=true)" if get_flavor(flavor).first_frame_i2v else ""
        raise ValueError(
            f"model.flavor={flavor!r} is a text-to-video model: set data.image_encoder=null{ti2v}"
        )
    if dims is not None and data_cfg.image_encoder is None:
        raise ValueError(
            f"model.flavor={flavor!r} is an image-to-video model: set data.image_encoder "
            "(tiny, or clip / siglip with data.image_encoder_path; latents for a model without "
            "image states)"
        )
    first_frame = dims is not None and dims.first_frame
    if first_frame != (data_cfg.image_encoder == "vae"):
        raise ValueError(
            f"data.image_encoder={data_cfg.image_encoder!r}: "
            + ("model.image_to_video conditions on the first frame's latent alone: set "
               "data.image_encoder=vae" if first_frame else
               f"vae (the first frame's latent alone) is for model.image_to_video=true "
               f"(Wan 2.2 TI2V), not model.flavor={flavor!r}")
        )  # fmt: skip
    if dims is not None and not first_frame:
        check_image_states(data_cfg.image_encoder, dims.embed_dim, f"model.flavor={flavor!r}")
    if dims is None or dims.embed_dim is None:
        return
    if data_cfg.image_encoder == "tiny" and data_cfg.image_dim != dims.embed_dim:
        raise ValueError(
            f"data.image_dim={data_cfg.image_dim}: the tiny image encoder gives image states of "
            f"width {data_cfg.image_dim} but model.flavor={flavor!r} takes {dims.embed_dim} "
            "(its image_embed_dim / image_dim)"
        )
    if image_embeds is not None and image_embeds.shape[-1] != dims.embed_dim:
        raise ValueError(
            f"the data gives image states of width {image_embeds.shape[-1]} (data.image_encoder="
            f"{data_cfg.image_encoder!r}) but model.flavor={flavor!r} takes {dims.embed_dim}"
        )


def check_image_states(image_encoder: str | None, embed_dim: int | None, model: str) -> None:
    """Fail naming ``data.image_encoder`` when the image states a condition-latents
    image-to-video model (``model``, as the error names it) takes (width ``embed_dim``; None:
    none, Wan 2.2 I2V-A14B) do not match the data's: ``latents`` encodes none, ``tiny``,
    ``clip`` and ``siglip`` do."""
    if (embed_dim is None) == (image_encoder == "latents"):
        return
    raise ValueError(
        f"data.image_encoder={image_encoder!r}: {model} takes "
        + ("no image states (no image_dim): set data.image_encoder=latents" if embed_dim is None
           else f"image states of width {embed_dim}: set data.image_encoder=tiny, clip or siglip")
    )  # fmt: skip


@dataclass
class RunData:
    """The data side of a run.

    Attributes:
        cache_dir: the prepared latent cache.
        loader: this dp rank's training stream (resumable).
        val_batches: fixed batches with their own ``noise`` (B, C, T, H, W) and ``sigma`` (B,).
        canvases: token canvas of every bucket.
    """

    cache_dir: Path
    loader: TrainLoader
    val_batches: list[dict[str, Any]]
    canvases: list[tuple[int, int, int]]

    @property
    def export_canvas(self) -> tuple[int, int, int]:
        """The largest bucket's canvas: what an exported mask strategy is written for."""
        return max(self.canvases, key=lambda c: c[0] * c[1] * c[2])


def validation_batches(
    data_cfg: DataConfig, *, batch_size: int, seed: int, count: int = 2
) -> list[dict[str, Any]]:
    """``count`` batches with fixed noise and sigmas, from a loader stream independent of training."""
    loader = build_train_loader(data_cfg, batch_size=batch_size, seed=seed + VALIDATION_LOADER_SEED)
    gen = torch.Generator().manual_seed(seed + VALIDATION_NOISE_SEED)
    batches = []
    for batch, _ in zip(loader, range(count), strict=False):
        x0 = batch["latents"]
        sigma = torch.linspace(0.1, 0.9, x0.shape[0])  # (B,)
        noise = torch.randn(x0.shape, generator=gen)  # (B, C, T, H, W)
        batches.append({**batch, "sigma": sigma, "noise": noise})
    return batches


def build_data(job: JobConfig, dims: ParallelDims) -> RunData:
    """Check the geometry, prepare the cache (every rank encodes its share) and open the loaders.

    Raises:
        UserError: a geometry the model cannot patch, a missing or empty source, no usable
            sample, a batch larger than every bucket.
    """
    with user_errors():  # config checks only: encoding errors stay bugs
        canvases = check_data_geometry(job.data, job.model)
    cache_dir = prepare_data(
        job.data, rank=dims.rank, world_size=dims.world_size, verbose=dims.is_main
    )
    with user_errors():
        loader = build_train_loader(
            job.data,
            batch_size=job.train.batch_size,
            seed=job.train.seed,
            dp_rank=dims.dp_rank,
            dp_size=dims.dp_size,
        )
    val = validation_batches(job.data, batch_size=job.train.batch_size, seed=job.train.seed)
    return RunData(cache_dir=cache_dir, loader=loader, val_batches=val, canvases=canvases)


def build_seeded(
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> VideoDiT:
    """Build a model; without ``model.path`` its random weights depend on ``seed`` alone.

    Random weights are drawn on the CPU and then moved, so a student on a GPU and a teacher on
    the CPU (or another GPU) built from the same seed hold the same weights.
    """
    if model_cfg.path is not None:
        return build_model(model_cfg, attention_cfg, device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = build_model(model_cfg, attention_cfg, device="cpu", dtype=torch.float32)
    for part in model_parts(dit).values():  # one transformer, or two experts
        cast_like_diffusers(part.transformer, dtype)  # keeps diffusers' fp32 modules
    return dit.to(device)


def build_student(job: JobConfig, device: torch.device) -> VideoDiT:
    """The student in fp32 (autocast lowers the compute precision), attending as ``attention``."""
    return build_seeded(
        job.model, job.attention, seed=job.train.seed, device=device, dtype=torch.float32
    )


def teacher_device(distill_cfg: DistillConfig, student_device: torch.device) -> torch.device:
    """Where the teacher runs: ``distill.teacher_device`` (``same``: the student's device)."""
    if distill_cfg.teacher_device == "same":
        return student_device
    return torch.device(distill_cfg.teacher_device)


def teacher_model_config(job: JobConfig) -> ModelConfig:
    """Where the teacher's weights come from: ``distill.teacher_path``, else ``model.path``."""
    if job.distill.teacher_path is not None:
        return dataclasses.replace(job.model, path=job.distill.teacher_path, config_overrides={})
    return job.model


def build_teacher(job: JobConfig, student_device: torch.device) -> VideoDiT | None:
    """The frozen dense teacher, or None when no loss term needs it.

    Its weights: ``distill.teacher_path``, else ``model.path``, else (only with
    ``distill.allow_random_teacher``, which the config check demands) the student's initial
    weights (the same flavor built from the same seed). ``train.frozen_weights=fp8`` / ``bf16``
    stores its blocks' linear layers in that dtype (:mod:`stafinetune.models.fp8`,
    :mod:`stafinetune.models.bf16`).
    """
    dcfg = job.distill
    if not dcfg.needs_teacher:
        return None
    model_cfg = teacher_model_config(job)
    if model_cfg.path is None:
        log.warning(
            "model.path is not set: the dense teacher is the student's own random initial "
            "weights (model.flavor=%s), which teaches nothing useful outside tests",
            model_cfg.flavor,
        )
    device = teacher_device(dcfg, student_device)
    dtype = torch.bfloat16 if use_bf16(dcfg.teacher_dtype, device) else torch.float32
    dense = dataclasses.replace(job.attention, mode="full")
    teacher = build_seeded(model_cfg, dense, seed=job.train.seed, device=device, dtype=dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    apply_frozen_weights(teacher, job.train.frozen_weights)
    return teacher


def build_critic(job: JobConfig, device: torch.device) -> VideoDiT:
    """The trainable critic (fake score) of ``distill=dmd2``: the teacher's weights in fp32,
    attending as ``distill.fewstep.critic_attention`` says (the student's windows or dense)."""
    attention = job.attention
    if job.distill.fewstep.critic_attention == "full":
        attention = dataclasses.replace(attention, mode="full")
    return build_seeded(
        teacher_model_config(job), attention, seed=job.train.seed, device=device,
        dtype=torch.float32,
    )  # fmt: skip


def encode_prompt(data_cfg: DataConfig, prompt: str) -> tuple[Any, ...]:
    """``prompt`` through the data's text encoder: ``(text (1, L, Dt), mask (1, L), pooled
    (1, Dp))`` on the CPU (e.g. the negative prompt of classifier-free guidance), and a
    fourth item, its glyph stream (``text_2``, ``text_2_mask``), for a text encoder with one."""
    from stafinetune.data import build_text_encoder
    from stafinetune.data.encoders import glyph_condition

    encoder = build_text_encoder(data_cfg)
    with torch.no_grad():
        text, mask, pooled = encoder.encode([prompt])
    glyph = glyph_condition(encoder, [prompt])
    return (text.float().cpu(), mask.cpu(), pooled.float().cpu(), *([glyph] if glyph else []))
