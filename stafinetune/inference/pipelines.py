"""Sliding Tile Attention inside diffusers pipelines, in one call.

::

    pipe = WanPipeline.from_pretrained("/models/Wan2.1-T2V-1.3B-Diffusers")
    enable_sta(pipe, strategy="mask_strategy.json")       # the pipeline now runs STA
    video = pipe(prompt, num_inference_steps=50).frames[0]
    disable_sta(pipe)                                      # diffusers' own processors again

``enable_sta`` installs a :class:`~stafinetune.models.binding.STABinding` on the pipeline's
transformer (and Wan 2.2's ``transformer_2``): STA processors on the video self-attention
(Wan) or joint attention (HunyuanVideo) and forward hooks that read the token canvas, the
valid text lengths and the denoising step from each call. The step is counted from the
timesteps of the pipeline's own loop (a new, lower timestep is the next step; classifier-free
guidance calls share their step; a higher timestep starts a new generation), so per-step
windows of a mask strategy and ``dense_first_steps`` follow any pipeline whose scheduler
evaluates the model once per step, with guidance as a second call or a doubled batch (a
second-order scheduler such as Heun's counts each evaluation as a step; use
:func:`sta_step` in such loops).

diffusers' own features work on a transformer carrying STA, enabled before or after it:
``enable_gradient_checkpointing()`` (the recomputation attends as the forward did),
``compile_repeated_blocks()`` (one graph serves every block, as for dense), model,
sequential and group offloading, ``fuse_qkv_projections()``, the cache hooks
(``enable_cache`` with FirstBlockCache, PyramidAttentionBroadcast or FasterCache; FasterCache
needs ``is_guidance_distilled=True`` with these pipelines, STA or not, since they run
guidance as separate calls), ``load_lora_weights`` (also after ``enable_sta``), and
``save_pretrained`` (which writes the plain diffusers model: STA is not part of the format;
call ``enable_sta`` again after ``from_pretrained``).
``set_attention_backend`` applies to the attention STA leaves alone (Wan's text
cross-attention); the STA layers keep STA.

A few-step student's export (``distill=dmd2`` / ``trajectory``) records how it samples in its
mask strategy: ``enable_sta(pipe, strategy=...)`` then also gives the pipeline the student's
scheduler (its levels, and fresh-noise re-noising where it was trained so), and the pipeline
samples as the student did when called with ``num_inference_steps`` equal to the student's
steps and ``guidance_scale=1`` (the guidance is baked in)::

    enable_sta(pipe, strategy="<run>/export/mask_strategy.json")
    video = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).frames[0]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from stafinetune.diffusion.sampling import Schedule
from stafinetune.models.binding import StepTracker, binding_of, build_binding
from stafinetune.models.config import ATTENTION_BACKENDS, check_triple
from stafinetune.models.families import family_of
from stafinetune.models.strategy import MaskStrategy
from stafinetune.models.windows import WindowPlan, strategy_plan

TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")


def _transformers(target: Any) -> list[nn.Module]:
    """The Wan / HunyuanVideo transformers of a pipeline, or ``[target]`` for a transformer."""
    if isinstance(target, nn.Module):
        family_of(target)
        return [target]
    found = [
        getattr(target, name)
        for name in TRANSFORMER_COMPONENTS
        if getattr(target, name, None) is not None
    ]
    if not found:
        raise TypeError(
            f"expected a diffusers pipeline with a transformer, or a transformer; got "
            f"{type(target).__name__}"
        )
    for transformer in found:
        family_of(transformer)
    return found


def _window_tensor(window: Any, num_layers: int, num_heads: int) -> torch.Tensor:
    """(L, H, 3) int64 windows from a triple, one triple per layer, or one per (layer, head)."""
    w = torch.as_tensor(window, dtype=torch.int64)
    if w.shape == (3,):
        w = w.expand(num_layers, num_heads, 3)
    elif w.shape == (num_layers, 3):
        w = w[:, None, :].expand(num_layers, num_heads, 3)
    elif w.shape != (num_layers, num_heads, 3):
        raise ValueError(
            f"enable_sta(window=...) must be (3,), ({num_layers}, 3) or ({num_layers}, "
            f"{num_heads}, 3) windows in tiles for this transformer, got {tuple(w.shape)}"
        )
    if (w < 1).any():
        raise ValueError("enable_sta(window=...) windows must be >= 1 tile on every axis")
    return w.contiguous()


def _plan(
    transformer: nn.Module,
    strategy: MaskStrategy | None,
    source: str,
    window: Any,
    dense_first_steps: int,
) -> WindowPlan:
    layers = len(family_of(transformer).sta_layers(transformer))
    heads = int(transformer.config.num_attention_heads)
    if strategy is not None:
        strategy.validate(layers, heads, source=source)
        return strategy_plan(strategy, dense_first_steps, source)
    return WindowPlan(
        train=_window_tensor(window, layers, heads),
        dense_first_steps=dense_first_steps,
        source="enable_sta(window=...)",
    )


def enable_sta(
    target: Any,
    *,
    strategy: str | os.PathLike[str] | MaskStrategy | None = None,
    tile: Sequence[int] | None = None,
    window: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None = None,
    dense_first_steps: int | None = None,
    backend: str = "auto",
    strict: bool = False,
    fp8: bool = False,
    schedule: bool = True,
    strategy_2: str | os.PathLike[str] | MaskStrategy | None = None,
) -> Any:
    """Turn STA on in a diffusers ``WanPipeline`` / ``WanImageToVideoPipeline`` /
    ``HunyuanVideoPipeline`` / ``HunyuanVideo15Pipeline`` /
    ``HunyuanVideo15ImageToVideoPipeline`` or transformer.

    Give either a mask ``strategy`` (windows per denoising step, layer and head, with its own
    tile) or ``tile`` and ``window``. Calling it again replaces the previous settings.

    Args:
        target: a pipeline whose ``transformer`` (and ``transformer_2``) is a diffusers
            ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel`` or
            ``HunyuanVideo15Transformer3DModel``, or such a transformer. Changed in place.
        strategy: a mask-strategy JSON file (``stafinetune.models.strategy``; a finetune's
            ``export/mask_strategy.json`` or the window search's output) or a ``MaskStrategy``.
            A strategy of several steps needs the pipeline to run exactly that many steps; one
            of a single step applies to every step.
        tile: (tt, th, tw) tile in latent tokens (after patchifying), e.g. (6, 8, 8); taken
            from the strategy when one is given (a different one is an error).
        window: windows in tiles: (wt, wh, ww) for every layer and head, (L, 3) one per STA
            layer or (L, H, 3) one per (layer, head). A window at least as wide as the tile
            grid on every axis attends densely.
        dense_first_steps: denoising steps ``step < dense_first_steps`` run dense. ``None``:
            the strategy's own (``metadata["dense_first_steps"]``, which a finetune's export
            records, so the pipeline samples as the student did), else 0.
        backend: STA kernel: ``auto`` (triton on CUDA bf16/fp16, flex on other CUDA inputs,
            the reference elsewhere), ``triton``, ``flex`` or ``reference``.
        strict: raise when a window is wider than the canvas's tile grid or the strategy was
            searched for another canvas (otherwise that case is warned about once).
        fp8: calls without gradients (the pipeline's sampling) run both attention matmuls
            in float8 e4m3 (``sliding_tile_attention(..., fp8=True)``): a Hopper GPU, bf16,
            head dim 128, tiles of 64-token frames that divide the canvas; ``backend`` auto
            or triton. A call outside that scope fails naming the reason.
        schedule: when the strategy is a few-step student's (its metadata holds
            ``sampling``) and ``target`` is a pipeline, replace the pipeline's scheduler by the
            student's (:func:`student_scheduler`; ``disable_sta`` puts the original back).
        strategy_2: a two-expert pipeline's (Wan 2.2 A14B) ``transformer_2`` windows, e.g. a
            finetune's ``export/mask_strategy_2.json``; None: the same as ``transformer``'s.
            Needs ``strategy`` (with the same tile).
    Returns:
        ``target``.
    """
    if (strategy is None) == (window is None):
        raise ValueError("enable_sta needs either strategy= or window= (with tile=), not both")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"enable_sta(backend=...) must be one of {ATTENTION_BACKENDS}, got {backend!r}"
        )
    if not isinstance(fp8, bool):
        raise ValueError(f"enable_sta(fp8=...) must be True or False, got {fp8!r}")
    if fp8 and backend not in ("auto", "triton"):
        raise ValueError(f"enable_sta(fp8=True) runs the triton backend, not backend={backend!r}")
    loaded: MaskStrategy | None = None
    source = "enable_sta(strategy=...)"
    if strategy is not None:
        if isinstance(strategy, MaskStrategy):
            loaded = strategy
        else:
            loaded, source = MaskStrategy.load(strategy), f"mask strategy {os.fspath(strategy)}"
        if dense_first_steps is None:  # a finetune's export records what the student used
            dense_first_steps = loaded.metadata.get("dense_first_steps", 0)
        given = None if tile is None else check_triple(tile, "enable_sta(tile=...)")
        if given is not None and given != list(loaded.tile):
            raise ValueError(
                f"enable_sta(tile={list(tile)}) differs from the tile {loaded.tile} of the {source}; "
                "windows are counted in tiles, so leave tile= out or make them match"
            )
        tile = loaded.tile
    elif tile is None:
        raise ValueError("enable_sta(window=...) needs tile= (a strategy carries its own)")
    dense_first_steps = 0 if dense_first_steps is None else dense_first_steps
    if (
        isinstance(dense_first_steps, bool)
        or int(dense_first_steps) != dense_first_steps
        or dense_first_steps < 0
    ):
        raise ValueError(
            f"enable_sta(dense_first_steps=...) must be an int >= 0, got {dense_first_steps}"
        )
    tile = check_triple(tile, "enable_sta(tile=...)")
    transformers = _transformers(target)
    strategies = [(loaded, source)] * len(transformers)
    if strategy_2 is not None:
        strategies[1:] = [_second_strategy(strategy_2, loaded, transformers)]
    previous = [_enabled_binding(t) for t in transformers]
    plans = [_plan(t, s, where, window, int(dense_first_steps))
             for t, (s, where) in zip(transformers, strategies, strict=True)]  # fmt: skip
    for binding in previous:  # only once everything is valid: a bad call changes nothing
        if binding is not None:
            binding.remove()
    tracker = StepTracker()  # shared: the pipeline's steps, whichever model runs them
    for transformer, plan in zip(transformers, plans, strict=True):
        build_binding(transformer, plan, tile=tile, backend=backend, strict=strict,
                      tracker=tracker, fp8=fp8)
    _restore_scheduler(target)
    sampling = loaded.metadata.get("sampling") if loaded is not None else None
    if schedule and sampling is not None and hasattr(target, "scheduler"):
        setattr(target, _ORIGINAL_SCHEDULER, target.scheduler)
        target.scheduler = student_scheduler(Schedule.from_dict(sampling))
    return target


_ORIGINAL_SCHEDULER = "_stafinetune_original_scheduler"


def _second_strategy(
    strategy_2: str | os.PathLike[str] | MaskStrategy,
    first: MaskStrategy | None,
    transformers: list[nn.Module],
) -> tuple[MaskStrategy, str]:
    """``enable_sta(strategy_2=...)`` loaded and checked against the first strategy's tile."""
    if first is None or len(transformers) != 2:
        raise ValueError(
            "enable_sta(strategy_2=...) is the windows of a two-expert pipeline's transformer_2: "
            "it needs strategy= and a pipeline with transformer and transformer_2"
        )
    if isinstance(strategy_2, MaskStrategy):
        loaded, source = strategy_2, "enable_sta(strategy_2=...)"
    else:
        loaded, source = MaskStrategy.load(strategy_2), f"mask strategy {os.fspath(strategy_2)}"
    if list(loaded.tile) != list(first.tile):
        raise ValueError(
            f"the tile {loaded.tile} of the {source} differs from strategy='s {first.tile}: "
            "both experts attend through one tile"
        )
    return loaded, source


def student_scheduler(schedule: Schedule) -> Any:
    """A diffusers ``FlowMatchEulerDiscreteScheduler`` that samples at ``schedule``'s levels.

    It re-noises the x0 prediction with fresh noise between levels when the schedule is
    stochastic (``stochastic_sampling``), else takes Euler steps. Whatever levels the
    pipeline asks for, it sets the schedule's own; a pipeline run with another number of
    steps is refused, naming the student's.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, stochastic_sampling=schedule.stochastic
    )
    set_levels = scheduler.set_timesteps

    def set_timesteps(
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        asked = num_inference_steps
        if asked is None:
            given = sigmas if sigmas is not None else timesteps
            asked = None if given is None else len(given)
        if asked is not None and asked != schedule.steps:
            raise ValueError(
                f"this few-step student samples in {schedule.steps} steps: call the pipeline "
                f"with num_inference_steps={schedule.steps} (asked for {asked})"
            )
        set_levels(device=device, sigmas=list(schedule.sigmas))

    scheduler.set_timesteps = set_timesteps
    return scheduler


def _restore_scheduler(target: Any) -> None:
    """Put back the scheduler ``enable_sta`` replaced, if it did."""
    original = getattr(target, _ORIGINAL_SCHEDULER, None)
    if original is not None:
        target.scheduler = original
        delattr(target, _ORIGINAL_SCHEDULER)


def _enabled_binding(transformer: nn.Module) -> Any:
    """The binding ``enable_sta`` put on ``transformer``, or None; refuses a ``VideoDiT``'s."""
    binding = binding_of(transformer)
    if binding is not None and binding.owner != "enable_sta":
        raise ValueError(
            f"this {type(transformer).__name__} belongs to a {binding.owner}, which manages its "
            "attention itself: use its set_attention(...) instead of enable_sta/disable_sta"
        )
    return binding


def disable_sta(target: Any) -> Any:
    """Undo :func:`enable_sta`: the original processors, no hooks; returns ``target``.

    A transformer without STA is left as it is.
    """
    for transformer in _transformers(target):
        binding = _enabled_binding(transformer)
        if binding is not None:
            binding.remove()
    _restore_scheduler(target)
    return target


@contextlib.contextmanager
def sta_step(target: Any, step_index: int | None) -> Iterator[None]:
    """Calls inside the block use denoising step ``step_index`` instead of counting timesteps.

    For hand-written sampling loops that call the transformer in an order the timestep
    counting does not follow. ``None`` selects the step-independent (training) windows.
    """
    with contextlib.ExitStack() as stack:
        for transformer in _transformers(target):
            binding = binding_of(transformer)
            if binding is None:
                raise ValueError(
                    f"this {type(transformer).__name__} has no STA: call enable_sta first"
                )
            stack.enter_context(binding.at_step(step_index))
        yield
