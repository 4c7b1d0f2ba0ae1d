"""Process-group set-up and rank helpers: the one place that reads the launcher's environment.

Model code never touches process groups. Every command calls :func:`init_world` once at
start-up and passes the resulting :class:`World` (or the :class:`~.dims.ParallelDims` built
from it) down explicitly.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """Global rank given by the launcher (torchrun, deepspeed, accelerate and slurm's torchrun
    all set ``RANK``)."""
    return int(os.environ.get("RANK", "0"))


def launcher_coordinates() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) without one."""
    rank, world_size = launched_rank(), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"the launcher set RANK={rank} outside WORLD_SIZE={world_size}")
    return rank, world_size, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str, field: str = "train.device") -> torch.device:
    """The torch device of a config's ``device`` field, the one rule of every command.

    ``auto``: CUDA when visible, else the CPU. ``cuda``: this process's GPU (``LOCAL_RANK``
    under a launcher). ``cuda:N``: that GPU. A CUDA device without a visible GPU is a
    ``ValueError`` naming ``field``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={device} but no CUDA device is visible")
        if device == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device(device)
    return torch.device("cpu")


def init_world(
    device: str = "auto",
    *,
    process_group: bool = False,
    timeout_minutes: int = 30,
    field: str = "train.device",
) -> World:
    """Initialise the default process group when launched with several processes.

    Args:
        device: "auto" (CUDA if available), "cpu" or "cuda" (validated by ``TrainConfig``).
        process_group: create one even for a single process (sharding engines run their
            collectives then too; without a launcher a local rendezvous is used).
        timeout_minutes: collective timeout.
        field: the config field ``device`` came from (for error messages).
    Returns:
        This process's :class:`World`. Single-process runs need no launcher.
    """
    rank, world_size, local_rank = launcher_coordinates()
    dev = resolve_device(device, field)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if process_group and world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if (world_size > 1 or process_group) and not dist.is_initialized():
        # on GPUs NCCL carries the tensors, gloo the few CPU ones (logged scalars, metadata)
        dist.init_process_group(
            backend="cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def barrier() -> None:
    """Synchronise all ranks (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity in a single process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` in a single
    process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_initialized():
        dist.destroy_process_group()
