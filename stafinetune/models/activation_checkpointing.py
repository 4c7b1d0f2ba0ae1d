"""Activation checkpointing policies and the compiled checkpoint region of a transformer block.

``full`` checkpointing keeps only each block's inputs and recomputes the whole block in
backward, attention included. ``selective`` keeps the output of every attention call as well
(torch's selective activation checkpointing, ``create_selective_checkpoint_contexts``): the
policy names the registered attention ops (``sta_kernels.forward_ops()``: the Triton
kernel's ``sta_fwd`` with its log-sum-exp, the reference, and the SDPA kernels of the dense
path), so the recomputation replays their saved results instead of running them again. A
captured student (distillation's attention loss) already holds those outputs, so there the
policy costs only the Triton kernel's log-sum-exp, (B, H, S) fp32 per layer.

``compile_checkpointed`` compiles the checkpoint call and the block it runs as one region
(torchtitan's order: checkpointing first, then compile), so the compiler's partitioner plans
the recomputation and honours the same policy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from sta_kernels import forward_ops

from .config import CHECKPOINT_POLICIES


@functools.cache
def attention_ops() -> frozenset[torch._ops.OpOverload]:
    """The ops whose outputs ``selective`` keeps: STA's registered forward ops and SDPA's."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    sdpa = [getattr(aten, name).default for name in names if hasattr(aten, name)]
    return frozenset((*forward_ops(), *sdpa))


def keep_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing policy: save attention outputs, recompute everything else."""
    if op in attention_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_options(policy: str) -> dict[str, Any]:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for ``policy``.

    ``full`` passes no ``context_fn`` at all: dynamo traces the default one only when it is
    left out.
    """
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    options: dict[str, Any] = {"use_reentrant": False}
    if policy == "selective":
        options["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, keep_attention_policy
        )
    return options


def raise_recompile_limit(graphs: int) -> None:
    """Let dynamo keep ``graphs`` compiled graphs per code object (default 8).

    Blocks of one kind share a graph per token canvas (the canvas is a constant of the traced
    code, the layer's windows an input), except in forwards inside ``capture()``: the store
    keys each layer's output by its int index, so there every block compiles its own graph.
    Below the limit dynamo would quietly run the remaining blocks eagerly.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * graphs)


def compile_checkpointed(
    fn: Callable[..., Any], num_layers: int, backend: str = "inductor"
) -> Callable[..., Any]:
    """Compile ``fn(block, *args)`` (a checkpoint of one block) as one region.

    The checkpointed function records the forward's captured attention outputs (a Python
    side effect); eager checkpointing skips that in the recomputation, which is what
    dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint`` does in the compiled one.
    """
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        raise RuntimeError(
            f"model.compile with gradient checkpointing needs a torch whose dynamo can skip a "
            f"checkpointed forward's side effects in the recomputation; torch {torch.__version__} "
            "cannot: turn model.compile or model.gradient_checkpointing off"
        )
    raise_recompile_limit(4 * num_layers)  # per layer: captured forwards, two canvases
    compiled = torch.compile(fn, backend=backend, fullgraph=True)

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
            return compiled(*args)

    return run
