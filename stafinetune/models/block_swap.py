"""Block swap: a model's frozen block weights in host memory, brought to the GPU block by block.

A dense teacher (or the frozen base of a LoRA student) is read, never trained. :class:`BlockSwap`
keeps the frozen weights of its first ``resident`` transformer blocks on the device and those
of the others in host memory (pinned on a GPU). A forward pre-hook on each swapped block puts
its weights on the device before it runs, and starts copying the next swapped block's weights
on a side CUDA stream while it computes; a forward hook (``always_call``) sends the block back
to its host copy afterwards. In a backward (a checkpointed block recomputed) the next block is
the previous one, so that one is prefetched instead.

How the weights move: each swapped parameter keeps its ``nn.Parameter`` object, whose data
becomes the host copy. While the block runs, its module holds a fresh ``nn.Parameter`` over the
device copy instead; the object is put back afterwards. Autograd keeps what it saved (the
device copy, for a block recomputed in backward) until the block's backward is done, so a
frozen base under a trainable adapter is exact too; there gradient checkpointing must be on,
or the autograd graph would hold every block's weights until the backward anyway.

Only parameters with ``requires_grad=False`` move (a LoRA adapter stays on the device); buffers
stay. Forwards equal the resident model's bit for bit. On a CPU device the same hooks copy
host to host (what the tests check); the memory saved is on a GPU: all but ``resident`` + 2
blocks' frozen weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

Slot = tuple[nn.Module, str, nn.Parameter]  # (module, parameter name, the host-side parameter)


@dataclass
class SwapStats:
    """Counters of a block swap (the tests check that blocks took the swap path)."""

    loads: int = 0  # swapped blocks put on the device for a forward
    prefetched: int = 0  # of those, copies started ahead of their use
    releases: int = 0


def in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread (a checkpointed block
    recomputed): the next block is then the previous one."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Frozen weights of ``blocks[resident:]`` in host memory, swapped in per forward.

    Args:
        blocks: the transformer blocks in forward order (``ModelFamily.blocks``).
        resident: how many leading blocks keep their weights on the device.
        device: where the blocks compute.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], resident: int, device: str | torch.device
    ) -> None:
        if not 0 <= resident < len(blocks):
            raise ValueError(
                f"offload.block_swap={resident} must lie in [0, {len(blocks)}) for a model of "
                f"{len(blocks)} blocks (that many stay on the device; null turns it off)"
            )
        self.blocks = list(blocks)
        self.resident = resident
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.stats = SwapStats()
        self._slots: dict[int, list[Slot]] = {}
        self._inflight: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._handles: list[Any] = []

    @property
    def swapped(self) -> range:
        """The indices of the swapped blocks."""
        return range(self.resident, len(self.blocks))

    def install(self) -> BlockSwap:
        """Move the swapped blocks' frozen weights to host memory and hook the blocks."""
        for i in self.swapped:
            slots = []
            for module in self.blocks[i].modules():
                for name, param in module._parameters.items():
                    if param is None or param.requires_grad:
                        continue
                    if param.device != self.device:
                        raise ValueError(
                            f"offload.block_swap: block {i}'s {name} is on {param.device}, not on "
                            f"the model's device {self.device}"
                        )
                    host = torch.empty_like(param, device="cpu", pin_memory=self.cuda)
                    host.copy_(param.detach())
                    param.data = host
                    slots.append((module, name, param))
            if not slots:
                raise ValueError(
                    f"offload.block_swap: block {i} has no frozen weights to swap (a fully "
                    "trained model has none: swap the teacher or a LoRA base)"
                )
            self._slots[i] = slots
        for i, block in enumerate(self.blocks):
            if i >= self.resident - 1:  # the last resident block prefetches the first swapped
                self._handles += [
                    block.register_forward_pre_hook(lambda m, a, i=i: self._hook_before(i)),
                    block.register_forward_hook(
                        lambda m, a, o, i=i: self._after(i), always_call=True
                    ),
                ]
        return self

    def remove(self) -> None:
        """Take the hooks off and put every swapped weight back on the device."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._inflight.clear()
        for slots in self._slots.values():
            for module, name, param in slots:
                module._parameters[name] = param
                param.data = param.data.to(self.device)
        self._slots = {}

    # ----------------------------------------------------------------- per block
    def _start_load(self, i: int) -> None:
        hosts = [param.data for _, _, param in self._slots[i]]
        if self.cuda:
            with torch.cuda.stream(self.stream):  # allocated and copied on the side stream
                devs = [torch.empty_like(h, device=self.device) for h in hosts]
                for dev, host in zip(devs, hosts, strict=True):
                    dev.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:  # host to host: the same path without a device
            devs, event = [h.clone() for h in hosts], None
        self._inflight[i] = (devs, event)

    def _hook_before(self, i: int) -> None:
        # outside any dispatch mode: under selective checkpointing the block's forward runs
        # in one that records each op to replay it in the recomputation, and these copies
        # differ between the two (the recomputation prefetches the previous block)
        with _disable_current_modes():
            self._before(i)

    def _before(self, i: int) -> None:
        if i in self._slots:
            if i in self._inflight:
                self.stats.prefetched += 1
            else:
                self._start_load(i)
            devs, event = self._inflight.pop(i)
            if self.cuda:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
            for (module, name, _), dev in zip(self._slots[i], devs, strict=True):
                if self.cuda:
                    dev.record_stream(stream)  # made on the side stream, used on this one
                module._parameters[name] = nn.Parameter(dev, requires_grad=False)
            self.stats.loads += 1
        following = i - 1 if in_backward() else i + 1
        if following in self._slots and following not in self._inflight:
            self._start_load(following)

    def _after(self, i: int) -> None:
        if i in self._slots:
            for module, name, param in self._slots[i]:
                module._parameters[name] = param  # back to the host copy
            self.stats.releases += 1


def apply_block_swap(model: nn.Module, resident: int) -> BlockSwap:
    """Swap the frozen weights of ``model``'s (a ``VideoDiT``) transformer blocks past the
    first ``resident`` between host memory and the model's device (``offload.block_swap``);
    the swap is kept as ``model.block_swap``."""
    blocks = model.adapter.blocks(model.transformer)
    device = next(blocks[0].parameters()).device
    swap = BlockSwap(blocks, resident, device).install()
    model.block_swap = swap
    return swap
