"""The optimiser side of a parallel strategy: backward, clipping, the update, checkpoints.

``parallelize`` prepares the model; :func:`build_engine` adds the optimiser and scheduler the
way the strategy needs them:

- :class:`TorchEngine` (``ddp``, ``fsdp2``, one process): plain ``loss.backward()``, torch's
  ``clip_grad_norm_`` (DTensor-aware), ``optimizer.step()``; checkpoints as full tensors on
  rank 0 (``ddp``) or sharded through ``torch.distributed.checkpoint`` (``fsdp2``).
- :class:`DeepSpeedEngine` (``zero2``, ``zero3``): ``deepspeed.initialize`` owns the
  optimiser, the scheduler, gradient accumulation and clipping; checkpoints are DeepSpeed's.

The training loop only calls :meth:`backward`, :meth:`clip_grad_norm`, :meth:`step`,
:meth:`zero_grad` and :attr:`lr`, and registers :meth:`checkpoint_parts` in its state. Every
other decision that depends on the strategy is made here too, so the loop has no branch on
it: where per-parameter state such as an EMA lives (:meth:`add_param_state`,
:meth:`local_view`), whether the checkpoints unpickle (:attr:`pickles`), the parameter
counts of partitioned models (:func:`parameter_numel`), the fused optimiser
(:func:`fused_optimizer`) and the process group (:func:`build_dims`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stafinetune.models import VideoDiT

from .dims import ParallelDims
from .parallelize import ParallelModel
from .world import World, init_world

Getter = Callable[[], Any]
Setter = Callable[[Any], None]
SHARDING = ("zero2", "zero3")  # strategies whose optimiser step DeepSpeed owns


def build_dims(
    device: str, *, strategy: str, sp: int, dp_replicate: int, world: World | None = None
) -> ParallelDims:
    """The run's parallel degrees, initialising this process's world from the launcher unless
    ``world`` is given. Every strategy but ``ddp`` needs a process group even alone (its
    collectives run then too)."""
    if world is None:
        world = init_world(device, process_group=strategy != "ddp")
    return ParallelDims(world, strategy=strategy, sp=sp, dp_replicate=dp_replicate)


def fused_optimizer(dims: ParallelDims) -> bool:
    """Whether the optimiser may be torch's fused AdamW (CUDA, unsharded parameters)."""
    return dims.device.type == "cuda" and dims.strategy == "ddp"


def parameter_numel(param: nn.Parameter) -> int:
    """The whole parameter's element count, also when ZeRO-3 holds only a partition here."""
    return int(getattr(param, "ds_numel", param.numel()))


def _full_norm(norm: Any) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor with a pending reduction)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


class TorchEngine:
    """Optimiser step of the torch strategies (see the module docstring)."""

    def __init__(
        self,
        student: ParallelModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dims: ParallelDims,
        grad_accum: int,
    ) -> None:
        self.student, self.optimizer, self.scheduler = student, optimizer, scheduler
        self.dims, self.grad_accum = dims, grad_accum
        self.sharded = dims.strategy == "fsdp2" and dims.distributed

    @property
    def module(self) -> nn.Module:
        return self.student.module

    @property
    def model(self) -> VideoDiT:
        return self.student.model

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return self.student.grad_sync(enabled)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of one micro-batch's loss (averaged over micro-batches)."""
        (loss / self.grad_accum).backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to ``max_norm`` (0: only measure) and return the global gradient norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if max_norm > 0:
            return _full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return _full_norm(
            torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        )

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def checkpoint_parts(self, state: Any, prefix: str = "") -> None:
        """Register model, optimiser and scheduler in a ``TrainState`` (names after ``prefix``:
        a second trained model, e.g. ``critic_``, keeps its own)."""
        main = self.dims.is_main
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                get_optimizer_state_dict,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            model = self.model
            state.sharded[f"{prefix}model"] = (
                lambda: get_model_state_dict(model),
                lambda sd: set_model_state_dict(model, sd),
            )
            state.sharded[f"{prefix}optimizer"] = (
                lambda: get_optimizer_state_dict(model, self.optimizer),
                lambda sd: set_optimizer_state_dict(model, self.optimizer, sd),
            )
        else:
            state.weights[f"{prefix}model"] = (
                lambda: self.model.state_dict() if main else None,
                self.model.load_state_dict,
            )
            state.trees[f"{prefix}optimizer"] = (
                self.optimizer.state_dict, self.optimizer.load_state_dict
            )
        state.trees[f"{prefix}scheduler"] = (self.scheduler.state_dict, self.scheduler.load_state_dict)

    pickles = False  # checkpoints are safetensors, JSON and torch.distributed.checkpoint

    def local_view(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor of ``param`` this rank updates (a DTensor shard under FSDP2)."""
        return param

    def add_param_state(self, state: Any, name: str, get: Getter, set_: Setter) -> None:
        """Register a per-parameter state (an EMA of :meth:`local_view` tensors) in a
        ``TrainState`` where this strategy keeps it: sharded under FSDP2, else on rank 0."""
        if self.sharded:
            state.sharded[name] = (get, set_)
        else:
            main = self.dims.is_main
            state.weights[name] = (lambda: get() if main else None, set_)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's whole state on rank 0 (None elsewhere); every rank must call it."""
        if not self.sharded:
            return self.model.state_dict() if self.dims.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)
        return full if self.dims.is_main else None


# --------------------------------------------------------------------- DeepSpeed
_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def deepspeed_config(
    *,
    stage: int,
    batch_size: int,
    grad_accum: int,
    grad_clip: float,
    bf16: bool,
    user_file: str | None = None,
) -> dict[str, Any]:
    """DeepSpeed's JSON config from the train fields (or a user's file, checked against them).

    The micro-batch size, accumulation and clipping always come from ``train.*``; a user file
    that sets them to other values is refused, naming the key.
    """
    config: dict[str, Any] = {}
    if user_file is not None:
        path = Path(user_file)
        if not path.is_file():
            raise FileNotFoundError(f"parallel.deepspeed_config={user_file!r} is not a file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"parallel.deepspeed_config={user_file!r} is not JSON ({err})"
            ) from err
    owned = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
    }
    for key in _OWNED_KEYS:
        if key in config and config[key] != owned[key]:
            raise ValueError(
                f"parallel.deepspeed_config sets {key}={config[key]!r} but the train config gives "
                f"{owned[key]!r} (train.batch_size / train.grad_accum / train.grad_clip decide it)"
            )
    config.update(owned)
    zero = dict(config.get("zero_optimization", {}))
    if zero.get("stage", stage) != stage:
        raise ValueError(
            f"parallel.deepspeed_config has zero_optimization.stage={zero['stage']} but "
            f"parallel.strategy asks for stage {stage}"
        )
    zero["stage"] = stage
    config["zero_optimization"] = zero
    config.setdefault("bf16", {"enabled": bf16})
    config.setdefault("steps_per_print", 2**31 - 1)
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    return config


class DeepSpeedEngine:
    """Optimiser step through a DeepSpeed engine (ZeRO-2/3; see the module docstring)."""

    def __init__(
        self,
        model: VideoDiT,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        dims: ParallelDims,
        config: dict[str, Any],
    ) -> None:
        import deepspeed

        self.dims, self.stage = dims, int(config["zero_optimization"]["stage"])
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self._model = model

    @property
    def module(self) -> nn.Module:
        return self.engine

    @property
    def model(self) -> VideoDiT:
        return self._model

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces at its accumulation boundary

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """DeepSpeed divides by the accumulation steps itself and counts micro-steps in
        ``step()``, so every micro-batch but the last steps here."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()

    def clip_grad_norm(self, max_norm: float) -> float | None:
        """DeepSpeed clips inside ``step()``; the norm is known only after it (see :meth:`step`)."""
        return None

    def step(self) -> None:
        self.engine.step()

    @property
    def last_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def checkpoint_parts(self, state: Any, prefix: str = "") -> None:
        """DeepSpeed writes model, optimiser and scheduler in its own format, into
        ``<checkpoint>/<prefix>engine``."""

        def save(folder: Path) -> None:
            self.engine.save_checkpoint(str(folder), tag="engine", save_latest=False)

        def load(folder: Path) -> None:
            path, _ = self.engine.load_checkpoint(
                str(folder), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed engine checkpoint under {folder}")

        state.engines[f"{prefix}engine"] = (save, load)

    pickles = True  # DeepSpeed's checkpoints are pickle files its loader unpickles

    def local_view(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor of ``param`` this rank updates (ZeRO-3: its local partition)."""
        return param.ds_tensor if self.stage == 3 else param

    def add_param_state(self, state: Any, name: str, get: Getter, set_: Setter) -> None:
        """Register a per-parameter state in a ``TrainState``: ZeRO-3 partitions are each
        rank's own, ZeRO-2's whole parameters are saved by rank 0."""
        if self.stage == 3:
            state.rank[name] = (get, set_)
        else:
            main = self.dims.is_main
            state.weights[name] = (lambda: get() if main else None, set_)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's whole state on rank 0 (None elsewhere); every rank must call it."""
        if self.stage < 3:
            return self.model.state_dict() if self.dims.is_main else None
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.dims.is_main:
                return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return None


def build_engine(
    student: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    dims: ParallelDims,
    *,
    batch_size: int,
    grad_accum: int,
    grad_clip: float,
    bf16: bool,
    deepspeed_file: str | None = None,
) -> TorchEngine | DeepSpeedEngine:
    """The engine of ``dims.strategy``; for ``zero2``/``zero3`` DeepSpeed's config is made
    from the train settings (and ``parallel.deepspeed_config``'s file, checked against them)."""
    if dims.strategy in SHARDING:
        config = deepspeed_config(
            stage=int(dims.strategy[-1]), batch_size=batch_size, grad_accum=grad_accum,
            grad_clip=grad_clip, bf16=bf16, user_file=deepspeed_file,
        )  # fmt: skip
        return DeepSpeedEngine(student.model, optimizer, scheduler, dims, config)
    return TorchEngine(student, optimizer, scheduler, dims, grad_accum)
