"""Apply parallelism to a single-device model, in one documented order.

Model code stays single-device; this module is the one place that wraps it for training:

1. activation checkpointing (``model.gradient_checkpointing``): per transformer block;
2. the data-parallel wrapper of ``parallel.strategy`` over the data-parallel ranks.

The result is a :class:`ParallelModel`: the module the loop calls, the unwrapped model (for
capture, export and checkpoints), and gradient-synchronisation control for accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..models import VideoDiT
from .dims import ParallelDims


@dataclass
class ParallelModel:
    """A model as the training loop drives it.

    Attributes:
        module: what to call for the forward (the model itself or its data-parallel wrapper).
        model: the unwrapped ``VideoDiT`` (weights, capture, export).
        no_sync: the wrapper's context that skips the gradient reduction, if it has one.
    """

    module: nn.Module
    model: VideoDiT
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Within the block, backward passes reduce gradients over ranks only if ``enabled``
        (off for all but the last micro-batch of an accumulation)."""
        if enabled or self.no_sync is None:
            return contextlib.nullcontext()
        return self.no_sync()


def parallelize(
    model: VideoDiT,
    dims: ParallelDims,
    *,
    activation_checkpointing: bool,
    find_unused_parameters: bool = False,
) -> ParallelModel:
    """Make ``model`` ready for distributed training (see the module docstring for the order).

    Args:
        model: the student, already on ``dims.device``.
        dims: the run's parallel degrees.
        activation_checkpointing: recompute each transformer block in backward.
        find_unused_parameters: DDP's option (needed when some trainable weights get no grad).
    """
    if activation_checkpointing:
        model.enable_gradient_checkpointing()
    if dims.strategy == "ddp" and dims.distributed:
        device = dims.device
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
        return ParallelModel(module=ddp, model=model, no_sync=ddp.no_sync)
    return ParallelModel(module=model, model=model)
