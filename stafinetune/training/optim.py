"""Optimiser, learning-rate schedule, EMA of weights and the trainable-parameter selection
(a pattern, or a LoRA adapter)."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from stafinetune.config import TrainConfig
from stafinetune.models import VideoDiT
from stafinetune.models.bf16 import apply_frozen_weights


def select_trainable(model: nn.Module, pattern: str) -> list[str]:
    """Freeze every parameter whose name does not match ``pattern``; return the trainable names.

    Args:
        model: the student.
        pattern: "all", "attention" (attention projections and norms of every block), or a
            regular expression searched in parameter names.
    Raises:
        ValueError: if nothing matches.
    """
    if pattern == "all":
        regex = None
    elif pattern == "attention":
        regex = re.compile(r"(^|\.)(attn\d*|attention)\.")
    else:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"train.trainable={pattern!r} is not a valid regex: {err}") from err
    names = []
    for name, param in model.named_parameters():
        keep = regex is None or regex.search(name) is not None
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"train.trainable={pattern!r} matches no parameter of the model")
    return names


def apply_trainable(model: VideoDiT, cfg: TrainConfig) -> list[str]:
    """Make ``train.trainable``'s parameters the only trainable ones; return their names.

    ``lora`` adds a LoRA adapter (``train.lora_*``, see :mod:`stafinetune.training.lora`) and trains
    only that; with ``train.frozen_weights=fp8`` or ``bf16`` its frozen base layers are then
    stored in that dtype (:func:`stafinetune.models.bf16.apply_frozen_weights`). Anything else is
    :func:`select_trainable`'s pattern.
    """
    if cfg.trainable == "lora":
        from .lora import apply_lora

        names = apply_lora(
            model,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            targets=cfg.lora_targets,
            dropout=cfg.lora_dropout,
            seed=cfg.seed,
        )
        apply_frozen_weights(model, cfg.frozen_weights)
        return names
    return select_trainable(model, cfg.trainable)


def build_optimizer(
    params: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool,
) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for _, param in params:
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # no empty group (a LoRA adapter has no 1-D parameters): DeepSpeed drops empty groups, and
    # the scheduler built on this optimizer then has one learning rate too many
    groups = [group for group in groups if group["params"]]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps.

    Linear warmup over ``warmup`` steps, then constant or cosine decay to ``min_ratio``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule must be constant or cosine, got {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup: int, total: int, schedule: str, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_lambda`; state_dict holds only the step, so it resumes exactly."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_lambda(s, warmup=warmup, total=total, schedule=schedule, min_ratio=min_ratio),
    )


def _whole(param: nn.Parameter) -> torch.Tensor:
    return param


class EMA:
    """Exponential moving average of a module's trainable parameters (kept in fp32).

    ``decay`` ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates so an
    early EMA is not dominated by the initial weights.

    Args:
        model: the student.
        decay: the long-run decay in (0, 1).
        view: the tensor of a parameter that this rank holds and updates: the parameter itself
            (also a sharded DTensor under FSDP2), or ZeRO-3's local partition
            (``lambda p: p.ds_tensor``). The average lives where that tensor lives.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        view: Callable[[nn.Parameter], torch.Tensor] = _whole,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.view = view
        self.updates = 0
        self.shadow = {
            n: view(p).detach().float().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights into the average."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(self.view(param).detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights plus the update count (as a 0-d tensor, for safetensors)."""
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        state = dict(state)
        self.updates = int(state.pop("__updates__"))
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}...")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                target = self.view(param)
                target.copy_(self.shadow[name].to(target.dtype))

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block ``model`` holds the averaged weights; its own come back after."""
        backup = {
            n: self.view(p).detach().clone()
            for n, p in model.named_parameters()
            if n in self.shadow
        }
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        self.view(param).copy_(backup[name])
