"""``ParallelDims``: the parallel degrees of a run and the device mesh built from them.

Made once per process from :class:`~stafinetune.config.ParallelConfig` and the launcher's
:class:`~.world.World`. Ranks are laid out with the sequence-parallel dimension innermost
(torchtitan's order), so the ``sp`` ranks of one group are contiguous and share one
data-parallel coordinate: they read the same samples, timesteps and noise.

    mesh dims:   (dp_replicate, dp_shard, sp)
    dp rank:     rank // sp          dp size: world_size // sp
    sp rank:     rank % sp
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .world import World

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass
class ParallelDims:
    """Degrees of data and sequence parallelism for one run.

    Attributes:
        world: this process's place in the launch.
        strategy: how the student's parameters are replicated or sharded over the dp ranks
            (``ddp``, ``fsdp2``, ``zero2``, ``zero3``).
        sp: sequence-parallel (Ulysses) degree; divides the world size.
        dp_replicate: replica groups for hybrid sharding (``fsdp2``); 1 otherwise.
    """

    world: World
    strategy: str = "ddp"
    sp: int = 1
    dp_replicate: int = 1
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _fsdp_mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        ws = self.world.world_size
        if self.sp < 1 or ws % self.sp:
            raise ValueError(
                f"parallel.sp={self.sp} must divide the number of launched processes ({ws}); "
                f"launch a multiple of {self.sp} processes (launch/torchrun.sh {self.sp} ...)"
            )
        if self.dp_replicate < 1 or self.dp_size % self.dp_replicate:
            raise ValueError(
                f"parallel.dp_replicate={self.dp_replicate} must divide the data-parallel size "
                f"{self.dp_size} (= {ws} processes / parallel.sp={self.sp})"
            )

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def is_main(self) -> bool:
        return self.world.is_main

    @property
    def device(self):  # -> torch.device
        return self.world.device

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: groups of ``sp`` processes that see different samples."""
        return self.world.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel coordinate (equal within an sp group)."""
        return self.world.rank // self.sp

    @property
    def sp_rank(self) -> int:
        """Position inside the sp group: which sequence shard (and head slice) this rank holds."""
        return self.world.rank % self.sp

    @property
    def dp_shard(self) -> int:
        return self.dp_size // self.dp_replicate

    @property
    def distributed(self) -> bool:
        """A process group exists (several processes, or a sharding engine in one)."""
        import torch.distributed as dist

        return dist.is_initialized()

    @property
    def mesh(self) -> DeviceMesh:
        """The (dp_replicate, dp_shard, sp) device mesh (built on first use; needs several ranks)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            if not self.distributed:
                raise RuntimeError("a device mesh needs a process group: launch with torchrun")
            self._mesh = init_device_mesh(
                self.world.device.type,
                (self.dp_replicate, self.dp_shard, self.sp),
                mesh_dim_names=("dp_replicate", "dp_shard", "sp"),
            )
        return self._mesh

    @property
    def sp_group(self):  # -> dist.ProcessGroup
        """The process group of this rank's sp ranks (needs ``sp > 1`` and a process group)."""
        return self.mesh["sp"].get_group()

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh ``fully_shard`` uses: (dp_shard x sp) flattened, with ``dp_replicate`` as
        the replicate dimension when it is above 1 (hybrid sharding)."""
        if self._fsdp_mesh is None:
            flat = self.mesh["dp_shard", "sp"]._flatten("dp_shard_sp")
            self._fsdp_mesh = (
                self.mesh["dp_replicate", "dp_shard_sp"] if self.dp_replicate > 1 else flat
            )
        return self._fsdp_mesh

    def describe(self) -> str:
        """One line for the start-up summary."""
        parts = [
            f"{self.world_size} process(es)",
            f"strategy {self.strategy}",
            f"dp {self.dp_size}",
        ]
        if self.sp > 1:
            parts.append(f"sp {self.sp}")
        if self.dp_replicate > 1:
            parts.append(f"dp_replicate {self.dp_replicate}")
        return ", ".join(parts)
