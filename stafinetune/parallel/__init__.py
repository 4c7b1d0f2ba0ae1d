"""Parallelism, applied from outside the model: process set-up, degrees and mesh, wrappers.

init_world(device) -> World            # once per process, from the launcher's environment
ParallelDims(world, strategy, sp, ...)  # degrees, dp coordinates, the device mesh
parallelize(model, dims, ...)           # activation checkpointing, compile, data-parallel wrapper
"""

from .dims import ParallelDims
from .parallelize import ParallelModel, parallelize
from .world import (
    World,
    all_gather_object,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup,
    init_world,
    launched_rank,
    launcher_coordinates,
)

__all__ = [
    "ParallelDims",
    "ParallelModel",
    "World",
    "all_gather_object",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_world",
    "launched_rank",
    "launcher_coordinates",
    "parallelize",
]
