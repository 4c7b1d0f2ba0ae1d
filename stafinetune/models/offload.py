"""Activation offload: what a training step keeps for backward, parked in host memory.

Two kinds of tensors live from the forward to the backward and grow with the video:

- the inputs of every checkpointed transformer block (gradient checkpointing keeps only those
  and recomputes the rest): one (B, S, hidden) tensor per block, plus the conditioning they
  share;
- the teacher's captured attention outputs, the targets of the distillation's attention loss:
  one (B, S, H, D) tensor per layer, needed by the loss and by its backward.

:class:`ActivationOffloader` moves both to host memory (pinned on a GPU) as they are made and
brings each back when it is needed, so the GPU holds only what is in flight. It works through
autograd's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, as torch's
``save_on_cpu`` does), but overlaps the copies with compute:

- device -> host copies run on a side CUDA stream that first waits for the compute stream;
  ``record_stream`` keeps the allocator from reusing a tensor's memory before its copy ends;
- host -> device copies run on the same side stream, ordered after the copy out; the compute
  stream waits on an event recorded after them;
- each saving region (one checkpointed block, or one target as the loss saves it) is a
  group, numbered in forward order. When the backward asks for a tensor of group ``g``, the
  tensors of group ``g - 1`` (the next the backward needs) start their copy back.

A tensor that several blocks save (the text states, the timestep embedding, RoPE tables) goes
to the host once and comes back once per backward. Copies are exact, so an offloaded step
equals one without offload bit for bit. On the CPU the same path runs with host-to-host copies
(what the tests check); on a GPU it is what saves memory.

``apply_activation_offload`` installs it on a model's gradient checkpointing (any checkpoint
function: ``VideoDiT``'s or diffusers' own, through ``STABinding.carrying_state``); the
distillation's teacher capture and attention loss use :meth:`ActivationOffloader.to_host`,
:meth:`targets` and :meth:`keeping_targets`.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class OffloadStats:
    """Counters of an offloader (the tests check that tensors took the offload path)."""

    offloaded: int = 0  # tensors copied to the host
    offloaded_bytes: int = 0
    reused: int = 0  # saves of a tensor already on the host (shared block inputs)
    fetched: int = 0  # tensors handed back to the device
    prefetched: int = 0  # of those, copies started ahead of their use


class HostCopy:
    """One tensor in host memory, and its copy on the device while one is on its way.

    ``users``: saves not yet unpacked (the device copy is kept for them); ``group``: the
    saving region it was saved in, or None.
    """

    __slots__ = ("host", "device_copy", "event", "users", "group", "__weakref__")

    def __init__(self, host: torch.Tensor, group: int | None) -> None:
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None
        self.users = 0
        self.group = group


def _storage_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values while its storage lives (detached views included)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class ActivationOffloader:
    """Moves saved activations and distillation targets of one device to host memory.

    Args:
        device: the device the model computes on; tensors there are offloaded (a CPU device
            gives host-to-host copies: the same mechanism, no memory saved).
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.stats = OffloadStats()
        self._next_group = 0
        self._groups: dict[int, list[weakref.ref[HostCopy]]] = {}
        # id(tensor) -> (weak ref to it, its version, its host copy): shared block inputs
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, HostCopy]] = {}
        # device copies handed out by targets(), while keeping_targets() is open
        self._known: dict[tuple, tuple[torch.Tensor, HostCopy]] = {}

    # ----------------------------------------------------------------- copies
    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def to_host(self, t: torch.Tensor, group: int | None = None) -> HostCopy:
        """Start copying ``t`` to host memory; returns its :class:`HostCopy`. A tensor not on
        this device (a teacher on the CPU or another GPU) is copied at once."""
        host = torch.empty_like(t, device="cpu", pin_memory=self.cuda)
        if self.cuda and t.device == self.device:
            self.stream.wait_stream(self._compute_stream())  # t is computed
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is not reused before the copy ends
        else:
            host.copy_(t)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += t.numel() * t.element_size()
        return HostCopy(host, group)

    def _start_fetch(self, copy: HostCopy) -> None:
        """Start the host -> device copy of ``copy`` (on the side stream on a GPU)."""
        host = copy.host
        if self.cuda:
            with torch.cuda.stream(self.stream):  # allocated and copied on the side stream
                dev = torch.empty_like(host, device=self.device)
                dev.copy_(host, non_blocking=True)
                copy.event = torch.cuda.Event()
                copy.event.record(self.stream)
        else:
            dev = host.clone()  # host to host: the same path without a device
        copy.device_copy = dev

    def fetch(self, copy: HostCopy) -> torch.Tensor:
        """``copy``'s tensor on the device, ready for the compute stream."""
        if copy.device_copy is None:
            self._start_fetch(copy)
        else:
            self.stats.prefetched += 1
        dev = copy.device_copy
        if self.cuda:
            stream = self._compute_stream()
            stream.wait_event(copy.event)
            dev.record_stream(stream)  # made on the side stream, used and freed on this one
        self.stats.fetched += 1
        return dev

    def prefetch(self, copy: HostCopy) -> None:
        """Start bringing ``copy`` back ahead of its use (no-op if it is on its way)."""
        if copy.device_copy is None:
            self._start_fetch(copy)

    # ----------------------------------------------------------------- saved tensors
    def _new_group(self) -> int:
        group, self._next_group = self._next_group, self._next_group + 1
        self._groups[group] = []
        for g in [g for g, refs in self._groups.items() if g < group - 1]:
            if all(ref() is None for ref in self._groups[g]):  # its graph is gone
                del self._groups[g]
        self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}
        return group

    def _pack_input(self, group: int, t: torch.Tensor) -> Any:
        if isinstance(t, nn.Parameter) or t.device != self.device:
            return t  # weights stay where they are
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            copy = seen[2]
            self.stats.reused += 1
        else:
            copy = self.to_host(t, group)
            self._seen[id(t)] = (weakref.ref(t), t._version, copy)
            self._groups[group].append(weakref.ref(copy))
        copy.users += 1
        return copy

    def _pack_target(self, t: torch.Tensor) -> Any:
        known = self._known.get(_storage_key(t))
        if known is None:
            return t
        copy = known[1]
        if copy.group is None:
            copy.group = self._new_group()
            self._groups[copy.group].append(weakref.ref(copy))
        copy.users += 1
        return copy

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, HostCopy):
            return packed
        dev = self.fetch(packed)
        packed.users -= 1
        packed.device_copy = dev if packed.users > 0 else None  # shared: kept for the others
        for ref in self._groups.get(packed.group - 1, []) if packed.group is not None else []:
            earlier = ref()
            if earlier is not None and earlier.users > 0:
                self.prefetch(earlier)  # the next the backward needs
        return dev

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Tensors autograd saves inside the block (a checkpoint's inputs) go to the host, as
        one prefetch group, and come back when the backward unpacks them."""
        pack = functools.partial(self._pack_input, self._new_group())
        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    # ----------------------------------------------------------------- distillation targets
    def targets(self, copies: Mapping[int, HostCopy]) -> HostTargets:
        """The host copies of the teacher's attention outputs as a mapping the loss reads."""
        return HostTargets(self, copies)

    @contextlib.contextmanager
    def keeping_targets(self) -> Iterator[None]:
        """Within the block, a device copy handed out by :meth:`targets` that autograd saves
        for backward (the attention loss's target) is saved as its host copy, each its own
        prefetch group; every other saved tensor is kept as it is."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack_target, self._unpack):
                yield
        finally:
            self._known.clear()

    def _hand_out(self, copy: HostCopy) -> torch.Tensor:
        dev = self.fetch(copy)
        copy.device_copy = None
        self._known[_storage_key(dev)] = (dev, copy)
        return dev


class HostTargets(Mapping):
    """Layer -> the teacher's attention output (B, S, H, D), kept in host memory: reading
    layer ``i`` brings it to the device and starts bringing the next layer."""

    def __init__(self, offloader: ActivationOffloader, copies: Mapping[int, HostCopy]) -> None:
        self.offloader = offloader
        self.copies = dict(sorted(copies.items()))

    def __getitem__(self, layer: int) -> torch.Tensor:
        copy = self.copies[layer]
        dev = self.offloader._hand_out(copy)
        later = [i for i in self.copies if i > layer]
        if later:
            self.offloader.prefetch(self.copies[later[0]])
        return dev

    def __iter__(self) -> Iterator[int]:
        return iter(self.copies)

    def __len__(self) -> int:
        return len(self.copies)


def apply_activation_offload(model: nn.Module, offloader: ActivationOffloader | None) -> None:
    """Offload the block inputs that ``model``'s gradient checkpointing keeps (``None``: stop).

    ``model``: a ``VideoDiT``, or a diffusers transformer carrying STA (``enable_sta``), with
    gradient checkpointing enabled (``VideoDiT.enable_gradient_checkpointing`` or diffusers'
    ``enable_gradient_checkpointing``): the checkpoint calls run inside
    :meth:`ActivationOffloader.saving`.
    """
    from .binding import binding_of

    transformer = getattr(model, "transformer", model)
    binding = binding_of(transformer)
    if binding is None:
        raise ValueError("activation offload needs a VideoDiT or a transformer carrying STA")
    if offloader is not None and not getattr(transformer, "gradient_checkpointing", False):
        raise ValueError(
            "activation offload moves the block inputs that gradient checkpointing keeps: "
            "enable gradient checkpointing first (model.gradient_checkpointing=true)"
        )
    binding.offload = offloader
