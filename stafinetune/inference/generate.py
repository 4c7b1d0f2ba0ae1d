"""Generate videos from prompts with a base model, a training checkpoint or an export.

The library behind ``stafinetune-sample`` and the compare mode of ``stafinetune-eval``:

- :class:`SampleConfig`: the ``sample`` section (prompts, seeds, steps, guidance, device).
- weights and attention of the sampled model: :mod:`stafinetune.inference.weights`.
- :func:`read_prompts` / :func:`default_prompts`: prompts from a file or from the data.
- :func:`generate`: flow Euler sampling with classifier-free guidance, one fixed seed per
  prompt (``sample.seed + k`` for prompt ``k``), each video timed.
- :func:`write_videos`: decode, write ``videos/<k>_<slug>.mp4`` and ``samples.json``.
- :func:`resolve_prompts` and :func:`sample_model`: the above as the commands run them, with
  bad input raised as :class:`~stafinetune.errors.UserError` (exit code 2).

Under torchrun every rank runs the same calls with the launch's
:class:`~stafinetune.parallel.ParallelDims` (:mod:`stafinetune.parallel.sampling`: sequence
parallelism, guidance on two ranks); only rank 0 writes.

Prompt ``k`` always gets the same noise, so two models (or two runs) given the same prompts
and ``sample.seed`` start every video from the same latents.
"""

# OmegaConf 2.3 structured configs understand typing.Optional, not PEP 604 unions.
# ruff: noqa: UP045
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from stafinetune.build import check_image_states, use_bf16, validation_batches
from stafinetune.config import TrainConfig
from stafinetune.data import (
    DataConfig,
    build_text_encoder,
    build_video_encoder,
    prepare_data,
    resolve_cache_dir,
)
from stafinetune.data.encoders import (
    TextEncoder,
    VideoEncoder,
    build_image_encoder,
    encode_image_condition,
    glyph_condition,
)
from stafinetune.data.synthetic import write_mp4
from stafinetune.data.video import resize_crop
from stafinetune.diffusion.sampling import (
    Schedule,
    sample_latents,
    to_uint8_video,
)
from stafinetune.errors import UserError
from stafinetune.models import AttentionConfig, ModelConfig, VideoDiT
from stafinetune.models.experts import ExpertDiT, window_plans
from stafinetune.models.profiling import AttentionTimer
from stafinetune.parallel.dims import ParallelDims
from stafinetune.parallel.parallelize import sequence_split
from stafinetune.parallel.sampling import build_guidance
from stafinetune.parallel.world import resolve_device

from .weights import (
    Weights,
    check_encoders_fit,
    describe_attention,
    load_model,
    mean_density,
    resolve_weights,
)

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("auto", "euler", "stochastic")
FRESH_NOISE_SEED = 1_000_033  # offset of the generator of a stochastic schedule's fresh noise


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class SampleConfig:
    """How videos are sampled (the ``sample`` section of ``stafinetune-sample`` and
    ``stafinetune-eval``).

    Attributes:
        prompts: a text file, one prompt per line (blank lines skipped); None: the captions
            of the data's fixed validation batches (those the training videos use).
        num_prompts: how many captions to take from the data when ``prompts`` is None.
        checkpoint: the weights: a training run directory (its ``export/``, else its newest
            checkpoint), a checkpoint directory (``model.safetensors``) or an export folder
            (``transformer/`` + ``mask_strategy.json``); None: ``model.path`` as configured
            (the shipped tiny teacher by default).
        schedule: ``auto``: a few-step student's own schedule when the weights are its export
            (steps, levels and re-noising as it was trained), else ``euler``; ``euler``: Euler
            steps at ``steps`` levels shifted by ``shift``; ``stochastic``: the same levels with
            the x0 prediction re-noised by fresh noise between them (how distribution-matched
            students sample, at any step count).
        steps: model evaluations of the ``euler`` / ``stochastic`` schedules.
        shift: timestep shift of the schedule (Wan: 3 to 5 at 480p-720p).
        guidance_scale: classifier-free guidance scale; 1 disables it (one forward a step).
            The tiny teacher was trained without caption dropout: keep 1 for it. A two-expert
            model (Wan 2.2 A14B) uses it for the high-noise expert's steps.
        guidance_scale_2: two-expert models only: the low-noise expert's guidance scale, as
            diffusers' ``WanPipeline(guidance_scale_2=...)``; None: ``guidance_scale``.
        negative_prompt: the unconditional prompt of guidance ("" for plain CFG).
        seed: prompt ``k`` is sampled from noise seeded with ``seed + k``.
        device: ``auto`` (cuda when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 weights and autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``.
        warmup: sample the first prompt once, untimed, before timing (first-call costs such
            as kernel compilation stay out of the latencies).
        fps: frame rate of the written mp4s; None: ``data.fps``, else ``data.synthetic_fps``.
        images: image-to-video models: the conditioning image (first frame) of each prompt,
            one path per prompt in order, or one for all. None with ``prompts`` None: the
            first frames of the data's validation clips the captions come from.
    """

    prompts: Optional[str] = None
    num_prompts: int = 2
    checkpoint: Optional[str] = None
    schedule: str = "auto"
    steps: int = 20
    shift: float = 1.0
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    seed: int = 0
    guidance_scale_2: Optional[float] = None
    device: str = "auto"
    precision: str = "auto"
    warmup: bool = True
    fps: Optional[int] = None
    images: Optional[list[str]] = None

    def __post_init__(self) -> None:
        _check(self.num_prompts >= 1, f"sample.num_prompts must be >= 1, got {self.num_prompts}")
        _check(self.steps >= 1, f"sample.steps must be >= 1, got {self.steps}")
        _check(
            self.schedule in SCHEDULES,
            f"sample.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
        )
        _check(self.shift >= 1.0, f"sample.shift must be >= 1, got {self.shift}")
        _check(
            self.guidance_scale >= 0,
            f"sample.guidance_scale must be >= 0, got {self.guidance_scale}",
        )
        _check(
            self.guidance_scale_2 is None or self.guidance_scale_2 >= 0,
            f"sample.guidance_scale_2 must be >= 0 or null, got {self.guidance_scale_2}",
        )
        _check(
            self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device) is not None,
            f"sample.device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _check(
            self.precision in PRECISIONS,
            f"sample.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _check(self.fps is None or self.fps >= 1, f"sample.fps must be >= 1, got {self.fps}")
        _check(
            self.images is None
            or (len(self.images) > 0 and all(str(p).strip() for p in self.images)),
            f"sample.images must be null or a non-empty list of image paths, got {self.images!r}",
        )
        for name in ("prompts", "checkpoint"):
            value = getattr(self, name)
            _check(
                value is None or bool(str(value).strip()),
                f"sample.{name} must be a path or null, got an empty string",
            )


def video_fps(sample_cfg: SampleConfig, data_cfg: DataConfig) -> int:
    """Frame rate of the written videos: ``sample.fps``, ``data.fps`` or ``data.synthetic_fps``."""
    if sample_cfg.fps is not None:
        return sample_cfg.fps
    if data_cfg.fps is not None:
        return max(1, round(data_cfg.fps))
    return data_cfg.synthetic_fps


# --------------------------------------------------------------------------- prompts
def read_prompts(path: str | Path, field_name: str = "sample.prompts") -> list[str]:
    """The non-blank lines of a text file, stripped; ValueError naming the field if none."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{field_name}={path}: no such file")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{field_name}={path} holds no prompt (one prompt per line)")
    return prompts


def default_prompts(
    data_cfg: DataConfig, num: int, *, verbose: bool = True, rank: int = 0, world_size: int = 1
) -> list[str]:
    """The first ``num`` distinct captions of the fixed validation batches training uses
    (with the training defaults' batch size and seed).

    The synthetic data is generated and encoded if needed (rank ``rank`` of ``world_size``
    processes, every one of which calls this, builds its share); other sources need their
    latent cache built (``stafinetune-preprocess``) or ``sample.prompts``.
    """
    return list(default_samples(data_cfg, num, verbose=verbose, rank=rank, world_size=world_size))


def default_samples(
    data_cfg: DataConfig, num: int, *, verbose: bool = True, rank: int = 0, world_size: int = 1
) -> dict[str, dict[str, torch.Tensor]]:
    """``default_prompts``' captions, each with its clip's image condition (``image_latents``
    (1, C, T, H, W), ``image_embeds`` (1, N, Di); empty for text-to-video data)."""
    if data_cfg.source != "synthetic" and not (resolve_cache_dir(data_cfg) / "cache.json").exists():
        raise ValueError(
            f"sample.prompts is not set and the data's latent cache {resolve_cache_dir(data_cfg)} "
            "is not built: pass sample.prompts=FILE or run stafinetune-preprocess first"
        )
    prepare_data(data_cfg, rank=rank, world_size=world_size, verbose=verbose)
    defaults = TrainConfig()
    batches = validation_batches(
        data_cfg,
        batch_size=defaults.batch_size,
        seed=defaults.seed,
        count=math.ceil(num / defaults.batch_size),
    )
    samples: dict[str, dict[str, torch.Tensor]] = {}
    for b in batches:
        for i, caption in enumerate(b["caption"]):
            image = {k: b[k][i : i + 1] for k in ("image_latents", "image_embeds") if k in b}
            samples.setdefault(caption, image)
    if len(samples) < num:
        raise ValueError(
            f"sample.num_prompts={num} but the data's validation batches hold only "
            f"{len(samples)} distinct captions"
        )
    return dict(list(samples.items())[:num])


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file as a first frame (3, height, width) in [-1, 1], resized to cover the
    frame and centre-cropped exactly as the data's clips are (``data.video.resize_crop``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"sample.images: {path}: no such file")
    with Image.open(file) as img:
        pixels = torch.from_numpy(np.asarray(img.convert("RGB")).copy())  # (h, w, 3) uint8
    return resize_crop(pixels[None], height, width)[:, 0]  # (3, H, W)


def image_conditions(
    sample_cfg: SampleConfig,
    data_cfg: DataConfig,
    prompts: Sequence[str],
    dit: VideoDiT,
    video_encoder: VideoEncoder,
) -> list[dict[str, torch.Tensor]] | None:
    """Each prompt's image condition for an image-to-video ``dit`` (None for text-to-video):
    ``sample.images`` encoded like the data's first frames, or, for the data's own captions,
    their clips' cached conditions. ValueError naming the field when they are missing."""
    if dit.image_dims is None:
        _check(sample_cfg.images is None, "sample.images is set but the model is text-to-video")
        return None
    _check(
        data_cfg.image_encoder is not None,
        "data.image_encoder must be set (tiny, or clip / siglip with data.image_encoder_path; "
        "vae for model.image_to_video; latents for a model without image_dim) for an "
        "image-to-video model",
    )
    _check(
        (data_cfg.image_encoder == "vae") == dit.image_dims.first_frame,
        f"data.image_encoder={data_cfg.image_encoder!r} does not fit the model: "
        "model.image_to_video (Wan 2.2 TI2V) takes data.image_encoder=vae, other "
        "image-to-video models tiny, clip, siglip or latents",
    )
    if not dit.image_dims.first_frame:
        check_image_states(data_cfg.image_encoder, dit.image_dims.embed_dim, "the model")
    if sample_cfg.images is None:
        _check(
            sample_cfg.prompts is None,
            "sample.images must list an image per prompt (or one for all) for an "
            "image-to-video model",
        )
        conditions = default_samples(data_cfg, len(prompts), verbose=False)
        return [conditions[p] for p in prompts]
    paths = list(sample_cfg.images)
    _check(
        len(paths) in (1, len(prompts)),
        f"sample.images lists {len(paths)} images for {len(prompts)} prompts (give one per "
        "prompt, or one for all)",
    )
    image_encoder = build_image_encoder(data_cfg)  # None for vae: the first frame's latent alone
    if image_encoder is not None:
        _check(
            dit.image_dims.embed_dim in (None, image_encoder.image_dim),
            f"data.image_encoder={data_cfg.image_encoder!r} gives image states of width "
            f"{image_encoder.image_dim} but the model takes {dit.image_dims.embed_dim}",
        )
    frames, height, width = data_cfg.all_buckets()[0]
    conditions = []
    for path in paths if len(paths) > 1 else paths * len(prompts):
        image = load_image(path, height, width)  # (3, H, W)
        video = image[None, :, None].expand(-1, -1, frames, -1, -1)  # (1, 3, F, H, W)
        latents, embeds = encode_image_condition(
            video_encoder, image_encoder, video, first_frame=dit.image_dims.first_frame
        )
        conditions.append({"image_latents": latents, "image_embeds": embeds})
    return conditions


def slug(text: str, max_len: int = 48) -> str:
    """A file-name fragment of ``text``: lower-case words joined by ``-``, at most ``max_len``."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:max_len].rstrip("-")
    return out or "prompt"


# --------------------------------------------------------------------------- sampling
@dataclass
class GeneratedVideo:
    """One sampled video.

    Attributes:
        index: the prompt's position ``k``.
        prompt, seed: what it was sampled from (noise seeded with ``seed``).
        latents: (C, T, H, W) float32 on the CPU.
        latency_s: wall clock of the denoising loop (CUDA-synchronised on GPU).
        attention_s: the part of it spent in the attention modules.
    """

    index: int
    prompt: str
    seed: int
    latents: torch.Tensor
    latency_s: float
    attention_s: float
    file: str = ""
    decode_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON row of ``samples.json``."""
        return {
            "index": self.index,
            "prompt": self.prompt,
            "seed": self.seed,
            "file": self.file,
            "latency_s": self.latency_s,
            "attention_s": self.attention_s,
            "decode_s": self.decode_s,
            **self.extra,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling_schedule(sample_cfg: SampleConfig, weights: Weights) -> Schedule:
    """The schedule ``sample.schedule`` names for these weights (see :class:`SampleConfig`)."""
    recorded = weights.sampling
    if sample_cfg.schedule == "auto" and recorded is not None:
        return Schedule.from_dict(recorded)
    stochastic = sample_cfg.schedule == "stochastic"
    return Schedule.flow(sample_cfg.steps, sample_cfg.shift, stochastic=stochastic)


class ExpertGuidance(nn.Module):
    """Classifier-free guidance of a two-expert model with one scale per expert, as diffusers'
    ``WanPipeline`` guides the high-noise expert with ``guidance_scale`` and the low-noise one
    with ``guidance_scale_2``. Called like the model; every sample of a call must belong to
    one expert (a sampler's batch shares its timestep).

    Args:
        dit: the two-expert model.
        high, low: the guidance around ``dit`` at the high-noise and at the low-noise
            expert's scale (``build_guidance``: on this rank or split over two cfg ranks).
    """

    def __init__(self, dit: ExpertDiT, high: nn.Module, low: nn.Module) -> None:
        super().__init__()
        self.dit, self.high, self.low = dit, high, low

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """The guided velocity (B, C, T, H, W) of noisy ``latents`` at ``timestep`` (B,) of
        one expert; the other arguments as ``ClassifierFreeGuidance``'s."""
        is_high = self.dit.is_high(timestep.float().cpu())
        if bool(is_high.any()) != bool(is_high.all()):
            raise ValueError("ExpertGuidance needs every sample of a call on one expert")
        guide = self.high if bool(is_high.all()) else self.low
        return guide(latents, timestep, *args, **kwargs)


def expert_guidance(
    dit: nn.Module,
    negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    scale_2: float | None,
    dims: ParallelDims | None = None,
) -> nn.Module:
    """Classifier-free guidance at ``scale`` (split over the cfg ranks of ``dims`` when it has
    two); with ``scale_2`` (two-expert models only) the low-noise expert's steps take that
    scale (``ExpertGuidance``)."""
    if scale_2 is None:
        return build_guidance(dit, negative, scale, dims)
    if not isinstance(dit, ExpertDiT):
        raise ValueError(
            "sample.guidance_scale_2 is the low-noise expert's guidance of a two-expert model "
            "(model.flavor=wan2.2_t2v_a14b); leave it null for this model"
        )
    return ExpertGuidance(
        dit, build_guidance(dit, negative, scale, dims), build_guidance(dit, negative, scale_2, dims)
    )


def prompt_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The starting latents (1, *shape) of a prompt: CPU normal noise from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, *shape), generator=gen)


@torch.no_grad()
def generate(
    dit: VideoDiT | ExpertDiT,
    prompts: Sequence[str],
    text_encoder: TextEncoder,
    *,
    latent_shape: Sequence[int],
    seed: int,
    schedule: Schedule,
    guidance_scale: float = 1.0,
    negative_prompt: str = "",
    bf16: bool = False,
    warmup: bool = True,
    progress: bool = True,
    desc: str = "sampling",
    dims: ParallelDims | None = None,
    images: Sequence[dict[str, torch.Tensor]] | None = None,
    guidance_scale_2: float | None = None,
) -> list[GeneratedVideo]:
    """Sample one video per prompt; prompt ``k`` starts from noise seeded with ``seed + k``.

    Args:
        dit: the model (on its device, eval mode).
        prompts: the prompts, encoded by ``text_encoder`` (the data's).
        latent_shape: (C, T, H, W) of one video's latents.
        schedule: the sampler's levels and steps; step ``i`` passes ``step_index=i``. A
            stochastic schedule's fresh noise for prompt ``k`` comes from its own generator,
            seeded from ``seed + k`` too.
        guidance_scale, negative_prompt: classifier-free guidance (1: off).
        guidance_scale_2: a two-expert model's low-noise expert's scale (None: the same).
        bf16: bf16 autocast (CUDA only).
        warmup: sample the first prompt once, untimed, first.
        dims: the launch's degrees (:mod:`stafinetune.parallel.sampling`): with two cfg
            ranks guidance's two forwards run one on each; ``dit`` carries the sp split
            already. Every rank of the launch calls this with the same arguments.
        images: an image-to-video model's condition per prompt (``image_conditions``).
    Returns:
        the videos in prompt order, latents (C, T, H, W) on the CPU, each with its latency
        (the same latents on every rank).
    """
    device = next(dit.parameters()).device
    text, mask, pooled = text_encoder.encode(list(prompts))  # (N, L, Dt), (N, L), (N, Dp)
    glyph = glyph_condition(text_encoder, list(prompts))  # (N, L2, D2), (N, L2) or None
    negative = text_encoder.encode([negative_prompt])
    negative_glyph = glyph_condition(text_encoder, [negative_prompt])
    if negative_glyph is not None:
        negative = (*negative, negative_glyph)
    if guidance_scale != 1.0 and dit.adapter.joint_text and not bool(negative[1].any()):
        raise ValueError(
            f"sample.negative_prompt={negative_prompt!r} encodes to no text token, which "
            "HunyuanVideo cannot take: use a text encoder that adds a BOS token, or another prompt"
        )
    model = expert_guidance(dit, negative, guidance_scale, guidance_scale_2, dims)
    autocast_bf16 = bf16 and device.type == "cuda"
    timer = AttentionTimer([dit.attention], device)

    def run(k: int) -> torch.Tensor:
        noise = prompt_noise(latent_shape, seed + k).to(device)
        cond = (text[k : k + 1].to(device), mask[k : k + 1].to(device))
        fresh = torch.Generator().manual_seed(seed + k + FRESH_NOISE_SEED)
        image = {} if images is None else {n: None if t is None else t.to(device)
                                           for n, t in images[k].items()}  # fmt: skip
        condition = None  # the prompt's glyph stream (1, ...) of a text encoder with one
        if glyph is not None:
            condition = {n: t[k : k + 1].to(device) for n, t in glyph.items()}
        return sample_latents(
            model, noise, *cond, pooled[k : k + 1].to(device), schedule=schedule,
            generator=fresh, autocast_bf16=autocast_bf16, condition=condition, **image,
        )  # fmt: skip

    if warmup and prompts:
        run(0)
    videos = []
    for k in tqdm(range(len(prompts)), desc=desc, unit="video", disable=not progress):
        _sync(device)
        start = time.perf_counter()
        timer.start()
        latents = run(k)
        attention_s = timer.stop()  # synchronises CUDA
        latency_s = time.perf_counter() - start
        videos.append(
            GeneratedVideo(
                index=k,
                prompt=prompts[k],
                seed=seed + k,
                latents=latents[0].float().cpu(),
                latency_s=latency_s,
                attention_s=attention_s,
            )
        )
    return videos


def write_videos(
    videos: Sequence[GeneratedVideo],
    decode: Callable[[torch.Tensor], torch.Tensor],
    out_dir: Path,
    *,
    fps: int,
    settings: dict[str, Any],
) -> Path:
    """Decode and write ``out_dir/videos/<k>_<slug>.mp4`` (k zero-padded) and
    ``out_dir/samples.json`` (``settings`` plus one row per video: prompt, seed, file,
    latencies). ``decode`` maps (1, C, T, H, W) latents to (1, 3, F, H, W) in [-1, 1].

    Returns:
        the videos folder; each video's ``file`` and ``decode_s`` are filled in.
    """
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(videos) - 1)))
    for video in videos:
        start = time.perf_counter()
        frames = to_uint8_video(decode(video.latents[None])[0].float().cpu())  # (F, H, W, 3)
        video.decode_s = time.perf_counter() - start
        video.file = f"{video.index:0{width}d}_{slug(video.prompt)}.mp4"
        write_mp4(video_dir / video.file, frames.numpy(), fps=fps)
    payload = {**settings, "samples": [v.record() for v in videos]}
    (out_dir / "samples.json").write_text(json.dumps(payload, indent=2) + "\n")
    return video_dir


def model_dtype(precision: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """(weight dtype, bf16 autocast) of ``sample.precision`` on ``device``."""
    bf16 = use_bf16(precision, device)
    return (torch.bfloat16 if bf16 else torch.float32), bf16


# --------------------------------------------------------------------------- commands
def resolve_prompts(
    sample_cfg: SampleConfig,
    data_cfg: DataConfig,
    *,
    verbose: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[str]:
    """``sample.prompts``' lines, or the data's captions (every rank of ``world_size``
    calls this); UserError naming the field."""
    try:
        if sample_cfg.prompts is not None:
            return read_prompts(sample_cfg.prompts)
        return default_prompts(
            data_cfg, sample_cfg.num_prompts, verbose=verbose, rank=rank, world_size=world_size
        )
    except ValueError as err:
        raise UserError(str(err)) from None


def sample_model(
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    data_cfg: DataConfig,
    sample_cfg: SampleConfig,
    prompts: list[str],
    out_dir: Path,
    *,
    checkpoint: str | None,
    checkpoint_field: str = "sample.checkpoint",
    progress: bool = True,
    name: str = "sampling",
    dims: ParallelDims | None = None,
) -> tuple[list[GeneratedVideo], dict[str, Any]]:
    """Load one model, sample every prompt with ``sample_cfg``'s seeds and write the videos.

    What both commands run: ``stafinetune-sample`` once, the compare mode of
    ``stafinetune-eval`` once per model (same prompts, same seeds).

    Args:
        checkpoint: the weights (``sample.checkpoint`` or a compared model's own).
        checkpoint_field: the config field ``checkpoint`` came from (for error messages).
        out_dir: receives ``videos/`` and ``samples.json`` (from rank 0 only).
        dims: the launch's degrees (None: one process); every rank calls this.
    Returns:
        (the videos with their latents and latencies, the settings written to samples.json).
    Raises:
        UserError naming the field, for weights or windows that do not fit.
    """
    try:
        device = resolve_device(sample_cfg.device, "sample.device")
        dtype, bf16 = model_dtype(sample_cfg.precision, device)
        weights = resolve_weights(checkpoint, checkpoint_field)
        schedule = sampling_schedule(sample_cfg, weights)
        dit: VideoDiT = load_model(
            model_cfg, attention_cfg, weights, steps=schedule.steps, device=device,
            dtype=dtype, seed=sample_cfg.seed,
        )  # fmt: skip
        if dims is not None:  # parallel.sp > 1: Ulysses around the attention call
            sequence_split(dit, dims)  # both experts of a two-expert model
        grid = data_cfg.latent_grids()[0]  # (T, H, W) of the data's first bucket
        canvas = dit.canvas_for(grid)
        for plan in window_plans(dit).values():  # each expert's of a two-expert model
            plan.check_run_canvases([canvas], "sampling uses")
        text_encoder, video_encoder = build_text_encoder(data_cfg), build_video_encoder(data_cfg)
        check_encoders_fit(dit, text_encoder, video_encoder, data_cfg, model_cfg)
        images = image_conditions(sample_cfg, data_cfg, prompts, dit, video_encoder)
        videos = generate(
            dit, prompts, text_encoder,
            latent_shape=(dit.in_channels, *grid), seed=sample_cfg.seed, schedule=schedule,
            guidance_scale=sample_cfg.guidance_scale,
            guidance_scale_2=sample_cfg.guidance_scale_2,
            negative_prompt=sample_cfg.negative_prompt, bf16=bf16, warmup=sample_cfg.warmup,
            progress=progress, desc=name, dims=dims, images=images,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(str(err)) from None
    settings = {
        "weights": weights.describe(),
        "flavor": model_cfg.flavor,
        "attention": describe_attention(
            attention_cfg, weights, dense_first_steps=dit.attention_cfg.dense_first_steps
        ),
        "video_density": mean_density(dit, canvas, schedule),
        "dense_first_steps": dit.attention_cfg.dense_first_steps,
        "steps": schedule.steps,
        "sigmas": list(schedule.sigmas),
        "stochastic": schedule.stochastic,
        "guidance_scale": sample_cfg.guidance_scale,
        "guidance_scale_2": sample_cfg.guidance_scale_2,
        "negative_prompt": sample_cfg.negative_prompt,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "canvas": list(canvas),
        "parallel": {"sp": 1, "cfg": 1} if dims is None else {"sp": dims.sp, "cfg": dims.dp_size},
    }
    if images is not None:
        settings["images"] = sample_cfg.images or "the data's first frames"
    del dit
    if dims is None or dims.is_main:
        write_videos(
            videos, video_encoder.decode, out_dir, fps=video_fps(sample_cfg, data_cfg),
            settings=settings,
        )  # fmt: skip
    return videos, settings
