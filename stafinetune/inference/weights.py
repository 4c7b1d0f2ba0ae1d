"""Where a sampled model comes from, and how it attends while sampling.

- :class:`Weights` / :func:`resolve_weights`: base weights (``model.path``), a training
  checkpoint (``model.safetensors``) or an export (``transformer/`` + ``mask_strategy.json``).
- :func:`inference_attention`: the attention to sample a number of steps with (a one-step
  strategy, as the trainer exports, holds at every step).
- :func:`load_model`: the frozen DiT with those weights and that attention.
- :func:`describe_attention`, :func:`mean_density`, :func:`check_encoders_fit`: what the
  sample and eval commands report and check about it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sta_kernels import density
from stafinetune.build import check_glyph_fits_model
from stafinetune.data import DataConfig
from stafinetune.data.encoders import TextEncoder, glyph_encoder
from stafinetune.diffusion.sampling import Schedule
from stafinetune.models import (
    AttentionConfig,
    MaskStrategy,
    ModelConfig,
    VideoDiT,
    build_model,
    get_flavor,
)
from stafinetune.models.experts import ExpertDiT, plan_at
from stafinetune.safety import safetensors_problem
from stafinetune.training.checkpoint import latest_checkpoint


@dataclass
class Weights:
    """Where a model's weights come from.

    Attributes:
        kind: ``base`` (``model.path`` as configured), ``checkpoint`` (a training
            checkpoint's ``model.safetensors`` over the configured model) or ``export``.
        path: the checkpoint directory or the export folder; None for ``base``.
    """

    kind: str
    path: Path | None = None

    def _export_file(self, name: str) -> Path | None:
        """The file ``name`` of an export folder, if it has one."""
        if self.kind == "export" and self.path is not None:
            file = self.path / name
            return file if file.is_file() else None
        return None

    @property
    def strategy(self) -> Path | None:
        """An export's ``mask_strategy.json`` (the windows it was trained with), if any."""
        return self._export_file("mask_strategy.json")

    @property
    def strategy_2(self) -> Path | None:
        """A two-expert export's ``mask_strategy_2.json`` (the low-noise expert's windows)."""
        return self._export_file("mask_strategy_2.json")

    @property
    def sampling(self) -> dict[str, Any] | None:
        """How a few-step student's export samples (its strategy's ``sampling`` record:
        steps, sigmas, stochastic, baked guidance), or None."""
        if self.strategy is None:
            return None
        return MaskStrategy.load(self.strategy).metadata.get("sampling")

    def describe(self) -> str:
        """One line for tables and logs."""
        return "base model" if self.path is None else f"{self.kind} {self.path}"


def resolve_weights(checkpoint: str | None, field_name: str = "sample.checkpoint") -> Weights:
    """Classify a checkpoint path (see ``SampleConfig.checkpoint``); ValueError naming the field.

    A run directory resolves to its ``export/`` when the run finished (the final weights, EMA
    ones when EMA was on), else to its newest complete checkpoint.
    """
    if checkpoint is None:
        return Weights("base")
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise ValueError(f"{field_name}={checkpoint}: no such directory")
    if (path / "transformer").is_dir():
        return Weights("export", path)
    if (path / "model.safetensors").is_file():
        return Weights("checkpoint", path)
    if (path / "export" / "transformer").is_dir():
        return Weights("export", path / "export")
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path / "checkpoints")
        if newest is not None:
            return Weights("checkpoint", newest)
    raise ValueError(
        f"{field_name}={checkpoint} is neither an export folder (transformer/), a checkpoint "
        "(model.safetensors) nor a run directory holding one (export/ or checkpoints/)"
    )


def inference_attention(attention: AttentionConfig, steps: int) -> AttentionConfig:
    """The attention to sample ``steps`` steps with; ValueError naming the field on a mismatch.

    A mask strategy holding a single step (what the trainer exports: the step-independent
    windows it trained with) applies at every step, as ``attention.head_windows``. A strategy
    with per-step windows must have been searched for exactly ``steps`` steps.
    """
    if attention.mode != "sta":
        return attention
    for name in ("strategy_path", "strategy_path_2"):  # _2: a two-expert model's low expert
        path = getattr(attention, name)
        if path is None:
            continue
        strategy = MaskStrategy.load(path)
        if list(strategy.tile) != list(attention.tile):
            raise ValueError(
                f"attention.tile {list(attention.tile)} differs from the tile {strategy.tile} of "
                f"attention.{name}={path}; set attention.tile={strategy.tile}"
            )
        if strategy.num_steps not in (1, steps):  # one step: applies at every step
            raise ValueError(
                f"sample.steps={steps} but attention.{name}={path} holds windows for "
                f"{strategy.num_steps} denoising steps; sample with as many steps"
            )
    return attention


def load_model(
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    weights: Weights,
    *,
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> VideoDiT:
    """The DiT to sample with, frozen and in eval mode.

    An export brings its transformer (both experts of a two-expert flavor, from
    ``transformer/`` and ``transformer_2/``) and (for ``attention.mode=sta`` without a
    ``strategy_path`` of its own) its windows (``mask_strategy.json``, and
    ``mask_strategy_2.json`` for the low-noise expert), and a few-step student's export its dense
    first steps too (none: it samples every step with STA); a checkpoint's ``model.safetensors`` is loaded
    over the configured model. Without any weights (``model.path`` null) the flavor is built
    with random weights drawn from ``seed``. Raises ValueError naming the field at fault.
    """
    if weights.kind == "export":
        assert weights.path is not None
        experts = get_flavor(model_cfg.flavor).experts  # the export root holds both folders
        model_cfg = dataclasses.replace(
            model_cfg, path=str(weights.path if experts else weights.path / "transformer"),
            config_overrides={},
        )  # fmt: skip
        strategy = weights.strategy
        if attention_cfg.mode == "sta" and attention_cfg.strategy_path is None and strategy:
            loaded = MaskStrategy.load(strategy)
            changes: dict[str, Any] = {"strategy_path": str(strategy), "tile": list(loaded.tile)}
            if weights.strategy_2 is not None and attention_cfg.strategy_path_2 is None:
                changes["strategy_path_2"] = str(weights.strategy_2)
            if "sampling" in loaded.metadata:  # a few-step student: every step as it trained
                changes["dense_first_steps"] = int(loaded.metadata.get("dense_first_steps", 0))
            attention_cfg = dataclasses.replace(attention_cfg, **changes)
    attention_cfg = inference_attention(attention_cfg, steps)
    if model_cfg.path is not None:
        dit = build_model(model_cfg, attention_cfg, device=device, dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dit = build_model(model_cfg, attention_cfg, device="cpu", dtype=dtype).to(device)
    if weights.kind == "checkpoint":
        assert weights.path is not None
        problem = safetensors_problem(weights.path / "model.safetensors")
        if problem is not None:
            raise ValueError(f"the checkpoint {weights.path} is damaged: {problem}")
        state = load_file(str(weights.path / "model.safetensors"))
        try:
            dit.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise ValueError(
                f"the checkpoint {weights.path} does not fit model.flavor={model_cfg.flavor!r} "
                f"(model.path={model_cfg.path}): {first}"
            ) from None
    dit.requires_grad_(False)
    return dit.eval()


def describe_attention(
    attention: AttentionConfig, weights: Weights, dense_first_steps: int | None = None
) -> str:
    """How a model attends, in a few words (for tables): dense, or STA and where its windows
    come from; ``dense_first_steps``: the model's own when it differs from the config's (a
    few-step export samples every step sparse)."""
    if attention.mode == "full":
        return "dense"
    if attention.strategy_path is not None:
        where = f"strategy {attention.strategy_path}"
    elif weights.strategy is not None:
        where = f"export's strategy {weights.strategy}"
    elif attention.head_windows is not None:
        where = "attention.head_windows"
    elif attention.layer_windows is not None:
        where = "attention.layer_windows"
    else:
        where = f"window {list(attention.window)}"
    dense = attention.dense_first_steps if dense_first_steps is None else dense_first_steps
    return f"STA, {where}" + (f", first {dense} steps dense" if dense else "")


def mean_density(dit: VideoDiT | ExpertDiT, canvas: Sequence[int], schedule: Schedule) -> float:
    """Attended fraction of the video query/key pairs, mean over layers, heads and the
    schedule's denoising steps (1.0 for dense attention and dense steps); a two-expert model
    counts each step with the windows of the expert that runs it."""
    total = 0.0
    tile = dit.attention_cfg.tile
    for i, sigma in enumerate(schedule.sigmas):
        windows = plan_at(dit, sigma * 1000.0).windows_for_step(i)  # (L, H, 3) or None (dense)
        if windows is None:
            total += 1.0
        else:
            total += float(density(tuple(canvas), tuple(tile), windows.reshape(-1, 3)).mean())
    return total / schedule.steps


def check_encoders_fit(
    dit: VideoDiT,
    text_encoder: TextEncoder,
    video_encoder: Any,
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
) -> None:
    """ValueError naming the fields when the data's encoders do not fit the model's inputs."""
    if text_encoder.text_dim != dit.text_dim:
        raise ValueError(
            f"data.text_encoder={data_cfg.text_encoder!r} gives text states of width "
            f"{text_encoder.text_dim} but model.flavor={model_cfg.flavor!r} takes {dit.text_dim}"
        )
    if video_encoder.latent_channels != dit.in_channels:
        raise ValueError(
            f"data.video_encoder={data_cfg.video_encoder!r} decodes {video_encoder.latent_channels}"
            f" latent channels but model.flavor={model_cfg.flavor!r} makes {dit.in_channels}"
        )
    glyph = glyph_encoder(text_encoder)
    check_glyph_fits_model(None if glyph is None else glyph.text_2_dim, dit, data_cfg, model_cfg)
