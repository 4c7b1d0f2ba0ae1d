"""Apply parallelism to a single-device model, in one documented order.

Model code stays single-device; this module is the one place that wraps it:

1. sequence parallelism (``parallel.sp > 1``): Ulysses around the STA call (``sequence.py``);
2. activation checkpointing (``model.gradient_checkpointing``, ``model.checkpoint_policy``,
   student only): per block; with ``offload.activations`` the inputs it keeps wait in host
   memory (``models/offload.py``);
3. ``torch.compile`` per transformer block (``model.compile``): with checkpointing, each
   checkpointed block call is compiled as one region (checkpoint and block), so the
   compiler plans the recomputation; without it, each block's forward;
4. the data-parallel wrapper of ``parallel.strategy``: ``ddp`` wraps the model in
   DistributedDataParallel; ``fsdp2`` applies ``fully_shard`` per transformer block and then
   at the root, over the flattened (dp_shard, sp) mesh (with ``dp_replicate`` as the
   replicate dimension of hybrid sharding), so the mean over sp ranks comes from the
   sharding itself; ``zero2``/``zero3`` leave the model to ``deepspeed.initialize``
   (``engine.py``);
5. block swap (``offload.block_swap``) of the frozen block weights (``models/block_swap.py``):
   the teacher's, or a LoRA student's base; last, so the data-parallel wrapper saw the
   weights where they were built.

The result is a :class:`ParallelModel`: the module the loop calls, the unwrapped model (for
capture, export and checkpoints), gradient-synchronisation control for accumulation, and the
sequence split the losses need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stafinetune.models import VideoDiT
from stafinetune.models.activation_checkpointing import raise_recompile_limit
from stafinetune.models.block_swap import apply_block_swap
from stafinetune.models.experts import ExpertDiT, model_parts
from stafinetune.models.offload import ActivationOffloader, apply_activation_offload

from .dims import ParallelDims
from .sequence import SequenceParallel, apply_sequence_parallel


@dataclass
class ParallelModel:
    """A model as the training loop drives it.

    Attributes:
        module: what to call for the forward (the model itself or its data-parallel wrapper).
        model: the unwrapped ``VideoDiT`` (weights, capture, export).
        no_sync: a context that skips the gradient reduction, if the wrapper has one.
        sequence: the sequence split (``parallel.sp > 1``), else None.
    """

    module: nn.Module
    model: VideoDiT
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None
    sequence: SequenceParallel | None = None

    def grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Within the block, backward passes reduce gradients over ranks only if ``enabled``
        (off for all but the last micro-batch of an accumulation)."""
        if enabled or self.no_sync is None:
            return contextlib.nullcontext()
        return self.no_sync()


def apply_compile(model: VideoDiT, *, checkpointed: bool, backend: str = "inductor") -> None:
    """``torch.compile`` each STA block's forward in place (torchtitan's per-block compile).

    With ``checkpointed`` there is nothing left to do: the blocks were compiled together with
    their checkpoint (``enable_gradient_checkpointing(compile=True)``), and the forwards
    without gradients (validation), which diffusers runs without the checkpoint, stay eager.
    Parameters keep their names (the module is not wrapped), so checkpoints and FSDP see the
    same model. Blocks of one kind share one graph per canvas; only forwards inside
    ``capture()`` (distillation's attention loss) compile a graph per block.
    """
    if checkpointed:
        return
    blocks = model.adapter.sta_blocks(model.transformer)
    raise_recompile_limit(4 * len(blocks))  # captured forwards: one graph per block and canvas
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=True)


def _apply_fsdp(model: VideoDiT, dims: ParallelDims, bf16: bool, reshard: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    mesh = dims.fsdp_mesh
    for block in model.adapter.blocks(model.transformer):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sequence_split(model: VideoDiT | ExpertDiT, dims: ParallelDims) -> SequenceParallel | None:
    """Apply the sp split of ``dims`` to ``model``, to each expert of a two-expert one (the
    ranks of an sp group share their timesteps, so they route to the same expert); None when
    ``sp == 1``."""
    if dims.sp == 1:
        return None
    sp = SequenceParallel(dims.sp_group, dims.sp, dims.sp_rank)
    for part in model_parts(model).values():
        apply_sequence_parallel(part, sp)
    return sp


def parallelize(
    model: VideoDiT,
    dims: ParallelDims,
    *,
    activation_checkpointing: bool,
    checkpoint_policy: str = "full",
    compile: bool = False,
    bf16: bool = False,
    find_unused_parameters: bool = False,
    offload: ActivationOffloader | None = None,
    block_swap: int | None = None,
) -> ParallelModel:
    """Make the student ready for distributed training (see the module docstring for the order).

    Args:
        model: the student, already on ``dims.device``.
        dims: the run's parallel degrees.
        activation_checkpointing: recompute each transformer block in backward.
        checkpoint_policy: ``full`` or ``selective`` (keep attention outputs).
        compile: ``torch.compile`` each transformer block.
        bf16: ``fsdp2`` computes in bf16 (parameters kept in fp32, gradients reduced in fp32).
        find_unused_parameters: DDP's option (needed when some trainable weights get no grad).
        offload: moves the checkpointed blocks' inputs to host memory (needs
            ``activation_checkpointing``, not ``compile``).
        block_swap: keep this many blocks' frozen weights on the device, swap the others in
            (a LoRA student's base; ``ddp`` or one process, with checkpointing).
    """
    if offload is not None and (compile or not activation_checkpointing):
        raise ValueError("activation offload needs activation checkpointing without compile")
    if block_swap is not None and (dims.strategy != "ddp" or not activation_checkpointing):
        raise ValueError("block swap of a trained model needs parallel=ddp and checkpointing")
    sequence = sequence_split(model, dims)
    if activation_checkpointing:
        model.enable_gradient_checkpointing(checkpoint_policy, compile=compile)
        apply_activation_offload(model, offload)
    if compile:
        apply_compile(model, checkpointed=activation_checkpointing)
    parallel = ParallelModel(module=model, model=model, sequence=sequence)
    if dims.strategy == "ddp" and dims.distributed:
        device = dims.device
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
        parallel = ParallelModel(module=ddp, model=model, no_sync=ddp.no_sync, sequence=sequence)
    elif dims.strategy == "fsdp2" and dims.distributed:
        _apply_fsdp(model, dims, bf16, reshard=True)
        parallel.no_sync = lambda: _fsdp_no_sync(model)
    if block_swap is not None:
        apply_block_swap(model, block_swap)
    return parallel


def parallelize_teacher(
    teacher: VideoDiT,
    dims: ParallelDims,
    *,
    shard: bool,
    deepspeed: dict | None = None,
    compile: bool = False,
    block_swap: int | None = None,
) -> nn.Module:
    """The frozen teacher under the student's sequence split, replicated or sharded.

    ``shard`` with ``fsdp2``: ``fully_shard`` per block (parameters gathered per block in the
    forward); with ``zero3``: a DeepSpeed inference engine without optimiser (``deepspeed``
    is its config). ``compile``: ``torch.compile`` each block's forward first. ``block_swap``
    (a replicated teacher): keep this many blocks on the device, swap the others in. Returns
    what to call; ``teacher`` itself keeps ``capture()``.
    """
    if block_swap is not None and (shard or compile):
        raise ValueError("block swap needs a replicated teacher without compile")
    sequence_split(teacher, dims)
    if compile:
        apply_compile(teacher, checkpointed=False)
    if block_swap is not None:
        apply_block_swap(teacher, block_swap)
    if not (shard and dims.distributed):
        return teacher
    if dims.strategy == "fsdp2":
        _apply_fsdp(teacher, dims, bf16=False, reshard=True)
        return teacher
    import deepspeed as ds

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": next(teacher.parameters()).dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        **(deepspeed or {}),
    }
    config["zero_optimization"] = {"stage": 3}
    engine, *_ = ds.initialize(model=teacher, config=config)
    return engine
