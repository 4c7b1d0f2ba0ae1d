"""Sampling on several processes: Ulysses sequence parallelism and guidance parallelism.

``stafinetune-sample`` and the compare mode of ``stafinetune-eval`` run under torchrun with
exactly ``parallel.sp x parallel.cfg`` processes, laid out as a :class:`ParallelDims` whose
data-parallel ranks are guidance's two branches::

    mesh dims:  (dp_replicate = 1, dp_shard = cfg, sp)
    cfg rank:   rank // sp  (0: the conditional forward, 1: the negative one)
    sp rank:    rank % sp

- ``sp``: the ranks of an sp group split every forward's video tokens as in training
  (:mod:`.sequence`); each of them gets the whole output back.
- ``cfg = 2``: classifier-free guidance's batch of 2B (the prompts, then the negative prompt)
  is split over the two cfg ranks; :class:`GuidanceParallel` all-gathers the two velocities
  and combines them on every rank.

Every rank starts a prompt from the same noise (seeded from the prompt's seed, as in one
process) and combines the same gathered velocities, so every rank holds the same latents
after every step; only rank 0 writes videos and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from stafinetune.diffusion.sampling import ClassifierFreeGuidance, image_kwargs

from .dims import ParallelDims
from .sequence import gather_along
from .world import World, init_world

GUIDANCE_DEGREES = (1, 2)


@dataclass
class SampleParallelConfig:
    """The ``parallel`` section of ``stafinetune-sample`` and ``stafinetune-eval``.

    Attributes:
        sp: Ulysses sequence-parallel degree: the ranks split each forward's video tokens
            (divides the model's attention heads).
        cfg: guidance parallelism: 2 runs classifier-free guidance's conditional and
            negative forwards on two ranks (needs ``sample.guidance_scale != 1``); 1: one
            rank runs both, as one batch.
    The launch has exactly ``sp * cfg`` processes.
    """

    sp: int = 1
    cfg: int = 1

    def __post_init__(self) -> None:
        if self.sp < 1:
            raise ValueError(f"parallel.sp must be >= 1, got {self.sp}")
        if self.cfg not in GUIDANCE_DEGREES:
            raise ValueError(f"parallel.cfg must be 1 or 2, got {self.cfg}")

    @property
    def processes(self) -> int:
        """How many processes the launch must have."""
        return self.sp * self.cfg

    def check_guidance(self, guidance_scale: float) -> None:
        """``parallel.cfg=2`` needs guidance to split: ValueError naming both fields if
        ``guidance_scale`` is 1 (one forward a step, nothing for the second rank)."""
        if self.cfg == 2 and guidance_scale == 1.0:
            raise ValueError(
                "parallel.cfg=2 runs classifier-free guidance's two forwards on two ranks, but "
                "sample.guidance_scale=1 runs no guidance: set sample.guidance_scale (e.g. 5) "
                "or parallel.cfg=1"
            )


def sampling_dims(cfg: SampleParallelConfig, world: World, device: str = "auto") -> ParallelDims:
    """The degrees of a sampling launch (see the module docstring); ``device``:
    ``sample.device``.

    Raises:
        ValueError: naming ``parallel.sp`` and ``parallel.cfg`` when the launch does not have
            exactly ``sp * cfg`` processes, or ``sample.device`` when it names one GPU for
            every rank.
    """
    if world.world_size > 1 and device.startswith("cuda:"):
        raise ValueError(
            f"sample.device={device} puts every rank on one GPU: under torchrun use "
            "sample.device=cuda (or auto), each rank then takes its own (LOCAL_RANK)"
        )
    if world.world_size != cfg.processes:
        raise ValueError(
            f"parallel.sp={cfg.sp} x parallel.cfg={cfg.cfg} needs exactly {cfg.processes} "
            f"process(es), but {world.world_size} were launched: launch "
            f"torchrun --nproc-per-node {cfg.processes} -m stafinetune ..., or set "
            "parallel.sp and parallel.cfg so that their product is the number of processes"
        )
    return ParallelDims(world, sp=cfg.sp)


def init_sampling(cfg: SampleParallelConfig, device: str) -> ParallelDims:
    """Join the launch (a process group when it has several processes) and check its size.

    Args:
        cfg: the ``parallel`` section.
        device: ``sample.device``.
    Raises:
        ValueError: naming the field, for a device that is not there, one GPU named for
            every rank, or a launch of the wrong size.
    """
    return sampling_dims(cfg, init_world(device, field="sample.device"), device)


class GuidanceParallel(ClassifierFreeGuidance):
    """:class:`ClassifierFreeGuidance` with its conditional forward on cfg rank 0 and its
    negative forward on cfg rank 1.

    Called like the wrapped DiT on every rank with the same arguments; each rank runs one
    forward of batch B, the two velocities are all-gathered over the cfg group and combined
    as in one process, so every rank returns the same guided velocity.

    Args:
        dit, negative, scale: as for :class:`ClassifierFreeGuidance` (``scale != 1``).
        group: the two ranks of this rank's cfg group (conditional first).
        rank: this rank's position in it.
    """

    def __init__(
        self,
        dit: nn.Module,
        negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scale: float,
        *,
        group: dist.ProcessGroup,
        rank: int,
    ) -> None:
        super().__init__(dit, negative, scale)
        if self.scale == 1.0:
            raise ValueError("guidance parallelism needs a guidance scale other than 1")
        self.group, self.rank = group, rank

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None = None,
        *,
        step_index: int | None = None,
        image_latents: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        condition: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The guided velocity (B, C, T, H, W) for noisy ``latents`` (B, C, T, H, W); both
        branches see the image condition of an image-to-video model, the negative one its
        own prompt's glyph stream (``condition``)."""
        if self.rank == 1:
            text, text_mask, neg_pooled = self.negative_inputs(latents.shape[0], text)
            pooled_text = None if pooled_text is None else neg_pooled
            condition = self.negative_condition(condition)
        out = self.dit(latents, timestep, text, text_mask, pooled_text, step_index=step_index,
                       **image_kwargs(image_latents, image_embeds, condition))  # fmt: skip
        both = gather_along(out, 0, self.group)  # (2B, C, T, H, W): conditional, negative
        cond, neg = both.chunk(2)
        return self.combine(cond, neg)


def build_guidance(
    dit: nn.Module,
    negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    dims: ParallelDims | None = None,
) -> ClassifierFreeGuidance:
    """Guidance around ``dit``: split over the cfg ranks of ``dims`` when it has two, else
    both forwards on this rank (:class:`ClassifierFreeGuidance`)."""
    if dims is None or dims.dp_size == 1:
        return ClassifierFreeGuidance(dit, negative, scale)
    return GuidanceParallel(
        dit, negative, scale, group=dims.mesh["dp_shard"].get_group(), rank=dims.dp_rank
    )
