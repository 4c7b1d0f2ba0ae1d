"""STA carried by a diffusers video transformer itself: processors plus two forward hooks.

A :class:`STABinding` attaches to one ``WanTransformer3DModel`` or
``HunyuanVideoTransformer3DModel``. It replaces the processors of the model's STA layers and
registers

- a forward pre-hook that reads what the processors need from the call's own arguments: the
  token canvas from ``hidden_states`` (B, C, T, H, W) and the patch size, the valid text
  lengths from ``encoder_attention_mask`` (HunyuanVideo; HunyuanVideo 1.5 adds its glyph and
  image streams, ``ModelFamily.joint_text_mask``), the denoising step (given by the
  caller, or derived from ``timestep``), hence the windows; it makes that ``ForwardState``
  current in the binding's :class:`AttentionRuntime`;
- a forward hook (``always_call``) that records the final output for a capture store and
  makes the previous state current again, also when the forward raised.

Gradient checkpointing. diffusers recomputes a checkpointed block in backward, after the
forward (and its state) is gone. For the duration of each forward the pre-hook therefore
puts a state-carrying wrapper (:meth:`STABinding.carrying_state`) around the transformer's
``_gradient_checkpointing_func`` (whatever ``enable_gradient_checkpointing`` installed, in
either order with STA): the wrapper hands the checkpoint a function that re-installs the
forward's state around the block, so its recomputation attends as the forward did. The
forward hook puts the original function back; outside a forward the model is untouched.

So the transformer can be called by anything, ``VideoDiT.forward`` or a diffusers pipeline's
denoising loop, and its STA layers know the forward they are in. ``VideoDiT`` and
``stafinetune.enable_sta`` both use this one mechanism.

Step indices. A call inside :meth:`STABinding.at_step` uses the given step (``None``: the
step-independent training windows). Any other call asks the binding's :class:`StepTracker`,
which numbers the calls of a denoising loop by their timesteps: the same timestep as the
previous call is the same step (classifier-free guidance, as a second call or as one call
with a doubled batch), a lower one is the next step, a higher one starts a new generation at
step 0. Transformers of one pipeline (Wan 2.2's ``transformer_2``) share one tracker, so
the step index counts the pipeline's steps, not one model's calls.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .attention import (
    ActivationStore,
    AttentionRuntime,
    ForwardState,
    HunyuanSTAProcessor,
    STAAttention,
    WanSTAProcessor,
)
from .families import family_of
from .offload import ActivationOffloader
from .windows import WindowPlan

BINDING_ATTRIBUTE = "_stafinetune_sta"
# marks a checkpoint function that re-installs the STA state itself (``carrying_state``)
CARRIES_STATE = "_stafinetune_carries_state"
# the processor that carries STA in each family's STA layers
_PROCESSORS = {
    "wan": WanSTAProcessor,
    "hunyuan": HunyuanSTAProcessor,
    "hunyuanvideo15": HunyuanSTAProcessor,  # its blocks are HunyuanVideo's dual-stream ones
}


def token_canvas(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Token canvas (T/pt, H/ph, W/pw) of latents shaped (..., T, H, W); must divide evenly."""
    if len(latent_shape) < 3:
        raise ValueError(f"latent shape must end with (T, H, W), got {tuple(latent_shape)}")
    grid = tuple(int(s) for s in latent_shape[-3:])
    for axis, size, p in zip("THW", grid, patch_size, strict=True):
        if size % p != 0 or size < p:
            raise ValueError(
                f"latent {axis}={size} is not a positive multiple of the patch size "
                f"{p} (patch_size={tuple(patch_size)})"
            )
    return tuple(s // p for s, p in zip(grid, patch_size, strict=True))  # type: ignore[return-value]


def text_lengths(text_mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 CPU valid lengths of a (B, L) text mask (bool, or 0/1 numbers).

    HunyuanVideo's joint attention needs valid tokens first, then padding, and at least one
    valid token per sample (its token refiner averages over them).
    """
    valid = text_mask if text_mask.dtype == torch.bool else text_mask != 0
    lengths = valid.sum(dim=1)  # (B,)
    pos = torch.arange(valid.shape[1], device=valid.device)
    if not torch.equal(valid, pos[None, :] < lengths[:, None]):
        raise ValueError("text_mask must mark valid tokens first, then padding (True...False...)")
    if (lengths == 0).any():
        raise ValueError(
            "text_mask has a sample without any valid text token; HunyuanVideo's text refiner "
            "averages over valid tokens (encode at least the BOS token, also for empty prompts)"
        )
    return lengths.to("cpu", torch.int64)


class StepTracker:
    """Numbers the denoising steps of a pipeline's transformer calls from their timesteps.

    ``observe(t)``: the first call, or a timestep above the previous call's (a new
    generation), is step 0; an equal timestep is the same step (guidance calls); a lower one
    is the next step. ``timestep`` may be (B,) or Wan 2.2's per-token (B, S): the largest
    value is the step's noise level.
    """

    def __init__(self) -> None:
        self.step = 0
        self.last: float | None = None

    def observe(self, timestep: torch.Tensor | float) -> int:
        """The step index of a call with ``timestep``."""
        t = float(torch.as_tensor(timestep).detach().max())  # one host sync per forward
        if self.last is None or t > self.last:
            self.step = 0
        elif t < self.last:
            self.step += 1
        self.last = t
        return self.step

    def reset(self) -> None:
        """Start counting again: the next call is step 0."""
        self.step, self.last = 0, None


class STABinding:
    """STA on one diffusers transformer (see the module docstring).

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` or ``HunyuanVideoTransformer3DModel``.
        plan: windows per (step,) layer and head; ``plan.train is None`` attends densely.
        attention: the attention module the processors call, unless ``source`` is given.
        source: an object whose ``.attention`` is read at every forward instead (a
            ``VideoDiT``, so that a parallel wrapper assigned to ``dit.attention`` is used).
        strict: raise when a window is wider than the canvas's tile grid or a strategy was
            searched for another canvas (``attention.strict_window``); otherwise a pipeline
            canvas differing from the strategy's is reported once with a warning.
        tracker: the step counter of calls outside :meth:`at_step` (shared by the
            transformers of one pipeline); a new one by default.
        owner: who installed it (``"VideoDiT"`` or ``"enable_sta"``), for error messages.
    """

    def __init__(
        self,
        transformer: nn.Module,
        plan: WindowPlan,
        *,
        attention: nn.Module | None = None,
        source: Any = None,
        strict: bool = False,
        tracker: StepTracker | None = None,
        owner: str = "enable_sta",
    ) -> None:
        if (attention is None) == (source is None):
            raise ValueError("STABinding takes exactly one of attention= and source=")
        self.transformer = transformer
        self.family = family_of(transformer)
        self.patch_size = self.family.patch_size(transformer.config)
        self.plan = plan
        self.attention = attention
        self.source = source
        self.strict = strict
        self.tracker = tracker if tracker is not None else StepTracker()
        self.owner = owner
        self.runtime = AttentionRuntime()
        self.store: ActivationStore | None = None
        # moves checkpointed blocks' inputs to the host (``offload.apply_activation_offload``)
        self.offload: ActivationOffloader | None = None
        self._explicit: list[Any] = []
        self._dense = 0  # depth of dense() blocks
        self._warned: set[tuple[int, int, int]] = set()
        self._originals: list[Any] = []
        self._hook_handles: list[Any] = []
        self._checkpoint_fns: list[Callable[..., Any] | None] = []  # restored after each forward
        self._carrier: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        self._arg_positions = _argument_positions(transformer)
        self.layers = self.family.sta_layers(transformer)

    # ----------------------------------------------------------------- install / remove
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return int(self.transformer.config.num_attention_heads)

    def install(self) -> STABinding:
        """Put the STA processors and the hooks on the transformer; returns ``self``."""
        if binding_of(self.transformer) is not None:
            raise ValueError(
                f"this {type(self.transformer).__name__} already carries STA (installed by "
                f"{binding_of(self.transformer).owner})"
            )
        proc = _PROCESSORS[self.family.name]
        self._originals = [attn.processor for attn in self.layers]
        for i, attn in enumerate(self.layers):
            attn.set_processor(proc(self.runtime, i))
        t = self.transformer
        self._hook_handles = [
            t.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            t.register_forward_hook(self._after_forward, always_call=True),
        ]
        setattr(t, BINDING_ATTRIBUTE, self)
        return self

    def remove(self) -> None:
        """Restore the original processors and take the hooks off (the model is as before)."""
        for attn, original in zip(self.layers, self._originals, strict=True):
            attn.set_processor(original)
        for handle in self._hook_handles:
            handle.remove()
        self._originals, self._hook_handles = [], []
        if getattr(self.transformer, BINDING_ATTRIBUTE, None) is self:
            delattr(self.transformer, BINDING_ATTRIBUTE)

    # ----------------------------------------------------------------- per forward
    @contextlib.contextmanager
    def at_step(self, step_index: int | None) -> Iterator[None]:
        """Forwards inside the block use ``step_index`` (``None``: training windows)."""
        self._explicit.append(step_index)
        try:
            yield
        finally:
            self._explicit.pop()

    @contextlib.contextmanager
    def dense(self) -> Iterator[None]:
        """Forwards inside the block attend densely whatever the windows (a LoRA student's
        base model serving as its dense teacher)."""
        self._dense += 1
        try:
            yield
        finally:
            self._dense -= 1

    def module(self) -> nn.Module:
        """The attention module of this forward."""
        return self.attention if self.source is None else self.source.attention

    def _argument(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        pos = self._arg_positions.get(name)
        return args[pos] if pos is not None and pos < len(args) else None

    def forward_state(self, args: tuple, kwargs: dict[str, Any]) -> ForwardState:
        """The ``ForwardState`` of a transformer call with these arguments."""
        hidden = self._argument("hidden_states", args, kwargs)
        if not torch.is_tensor(hidden) or hidden.ndim != 5:
            got = tuple(hidden.shape) if torch.is_tensor(hidden) else type(hidden).__name__
            raise ValueError(f"hidden_states must be latents (B, C, T, H, W), got {got}")
        canvas = token_canvas(hidden.shape, self.patch_size)
        if self._explicit:
            step = self._explicit[-1]
        else:
            timestep = self._argument("timestep", args, kwargs)
            if timestep is None:
                raise ValueError("the transformer was called without a timestep")
            step = self.tracker.observe(timestep)
        try:
            windows = None if self._dense else self.plan.windows_for_step(step)
        except ValueError as err:
            if self._explicit:
                raise
            raise ValueError(
                f"{err}; this is denoising step {step} of the pipeline (counted from the "
                "timesteps): run as many inference steps as the strategy holds"
            ) from None
        if windows is not None:
            self._check_canvas(canvas, warn=not self._explicit)
        text_len: int | torch.Tensor = 0
        if self.family.joint_text:
            mask = self.family.joint_text_mask(lambda name: self._argument(name, args, kwargs))
            if mask is None:
                raise ValueError("HunyuanVideo's STA needs encoder_attention_mask (B, L)")
            text_len = text_lengths(mask)
        return ForwardState(self.module(), canvas, text_len, windows, self.store)

    def _check_canvas(self, canvas: tuple[int, int, int], warn: bool) -> None:
        if self.strict:
            self.plan.check_canvas(canvas, self.module().tile)
        elif warn and self.plan.canvas is not None and canvas != tuple(self.plan.canvas):
            if canvas not in self._warned:
                self._warned.add(canvas)
                warnings.warn(
                    f"{self.plan.source} was searched for the token canvas "
                    f"{list(self.plan.canvas)} but this forward's canvas is {list(canvas)}; "
                    "its windows are used as they are (wider ones cover the whole axis)",
                    stacklevel=4,
                )

    def carrying_state(self, checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``checkpoint_fn(block, *args)`` (a diffusers ``_gradient_checkpointing_func``) that
        recomputes the block under the forward's ``ForwardState`` (without its capture store:
        a recomputation must not record again). With :attr:`offload` set, what the checkpoint
        saves (the block's inputs) goes to host memory until the backward needs it."""
        runtime = self.runtime

        def checkpoint_block(block: Callable[..., Any], *args: Any) -> Any:
            offload = self.offload
            if offload is None:
                return checkpoint_state(block, *args)
            with offload.saving():
                return checkpoint_state(block, *args)

        def checkpoint_state(block: Callable[..., Any], *args: Any) -> Any:
            state = runtime.state
            if state is None:
                return checkpoint_fn(block, *args)
            calls = 0

            def run(*inner: Any) -> Any:
                nonlocal calls
                current = state if calls == 0 else state.without_store()
                calls += 1
                with runtime.use(current):
                    return block(*inner)

            return checkpoint_fn(run, *args)

        setattr(checkpoint_block, CARRIES_STATE, True)
        return checkpoint_block

    def _wrap_checkpointing(self) -> None:
        """Give the transformer a state-carrying checkpoint function for this forward."""
        t = self.transformer
        inner = getattr(t, "_gradient_checkpointing_func", None)
        if inner is None or getattr(inner, CARRIES_STATE, False):
            self._checkpoint_fns.append(None)
            return
        if self._carrier is None or self._carrier[0] is not inner:  # one wrapper per function
            self._carrier = (inner, self.carrying_state(inner))
        t._gradient_checkpointing_func = self._carrier[1]
        self._checkpoint_fns.append(inner)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = None
        try:
            state = self.forward_state(args, kwargs)
        finally:  # the always-called forward hook pops what this pushed, also on errors
            self.runtime.push(state)
            self._wrap_checkpointing()

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        inner = self._checkpoint_fns.pop() if self._checkpoint_fns else None
        if inner is not None:
            self.transformer._gradient_checkpointing_func = inner
        state = self.runtime.pop()
        if state is None or state.store is None or output is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        state.store.final = out.detach() if state.store.detach else out


def _argument_positions(transformer: nn.Module) -> dict[str, int]:
    """Positional index of each named argument of ``transformer.forward``."""
    params = inspect.signature(transformer.forward).parameters
    return {name: i for i, name in enumerate(params)}


def binding_of(transformer: nn.Module) -> STABinding | None:
    """The ``STABinding`` a transformer carries, or ``None``."""
    return getattr(transformer, BINDING_ATTRIBUTE, None)


def build_binding(
    transformer: nn.Module,
    plan: WindowPlan,
    *,
    tile: Sequence[int],
    backend: str = "auto",
    strict: bool = False,
    tracker: StepTracker | None = None,
    fp8: bool = False,
) -> STABinding:
    """A binding with its own ``STAAttention(tile, backend, fp8=fp8)``, installed on
    ``transformer``."""
    attention = STAAttention(tile, backend, fp8=fp8)
    return STABinding(
        transformer, plan, attention=attention, strict=strict, tracker=tracker
    ).install()
