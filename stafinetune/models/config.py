"""Typed configuration of the model adapters: which DiT to build and how it attends.

Both dataclasses are Hydra/OmegaConf structured configs (plain types, lists not tuples) and
validate themselves in ``__post_init__`` with messages that name the field
(``model.flavor``, ``attention.window``). YAML under ``conf/model`` and ``conf/attention``
only sets their values.

Window precedence for ``attention.mode == "sta"`` (most specific wins):
``strategy_path`` > ``head_windows`` > ``layer_windows`` > ``window``.
"""

# OmegaConf 2.3 structured configs understand typing.Optional, not PEP 604 unions.
# ruff: noqa: UP045
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from sta_kernels.geometry import as_triple

ATTENTION_MODES = ("full", "sta")
CHECKPOINT_POLICIES = ("full", "selective")
EXPERTS = ("high", "low", "both")  # model.expert of a two-expert flavor (Wan 2.2 A14B)
ATTENTION_BACKENDS = ("auto", "triton", "flex", "reference")


def check_triple(value: Any, name: str) -> list[int]:
    """Return ``value`` as a list of three positive ints or raise ``ValueError`` naming ``name``."""
    return list(as_triple(value, name))


@dataclass
class ModelConfig:
    """Which video DiT to build.

    Attributes:
        flavor: a name from ``stafinetune.models.flavors.FLAVORS``: ``wan_tiny`` (the embedded
            default), ``hunyuan_tiny``, ``hunyuanvideo15_tiny`` (tests), ``wan_i2v_tiny``
            (image-to-video tests), ``wan2.1_t2v_1.3b``, ``wan2.1_t2v_14b``,
            ``wan2.1_i2v_14b_480p`` / ``_720p``, ``hunyuanvideo_13b``,
            ``hunyuanvideo15_480p_t2v``, ``hunyuanvideo15_720p_t2v``,
            ``hunyuanvideo15_720p_i2v``, ``wan2.2_ti2v_5b``, ``wan2.2_t2v_a14b``,
            ``wan2.2_i2v_a14b`` (published shapes).
        path: local diffusers-format directory (a pipeline root with ``transformer/`` or the
            transformer folder itself, safetensors weights). ``None`` builds the flavor with
            random weights (or on the meta device for benchmarks). Nothing is fetched from a hub.
        gradient_checkpointing: recompute each transformer block in backward (works with STA).
        checkpoint_policy: what a checkpointed block keeps: ``full`` only its inputs (the
            whole block is recomputed); ``selective`` also every attention call's output, so
            the recomputation skips the attention kernels (needs ``gradient_checkpointing``).
        compile: ``torch.compile`` each transformer block (with checkpointing: the checkpoint
            and its block as one region). Applied by ``stafinetune.parallel.parallelize``.
        guidance_scale: HunyuanVideo's embedded guidance (the model receives it times 1000);
            ignored by Wan and HunyuanVideo 1.5.
        config_overrides: values merged over the flavor's diffusers config when building
            without ``path`` (e.g. ``{num_layers: 4}`` for a short benchmark).
        allow_pickle_weights: load ``.bin``/``.pt`` weights from ``path`` (and the teacher's
            path) when no safetensors are there; pickle files can run code, so this is off.
        expert: two-expert flavors only (Wan 2.2 A14B): which expert the run trains and
            distils, ``high`` (``transformer/``, timesteps >= the boundary), ``low``
            (``transformer_2/``, below it) or ``both`` (one model routing each sample to the
            expert of its timestep); null means ``both``. Sampling always uses both.
        boundary_ratio: two-expert flavors only: the switch between the experts as a fraction
            of the 1000 training timesteps; null takes the flavor's published value (0.875
            for ``wan2.2_t2v_a14b``, 0.9 for ``wan2.2_i2v_a14b``).
        image_to_video: flavors with a first-frame image-to-video mode only (Wan 2.2 TI2V):
            condition on each clip's first frame, whose clean latent (``data.image_encoder=vae``)
            replaces the first latent frame at timestep 0; false runs text-to-video. The same
            weights do both.
    """

    flavor: str = "wan_tiny"
    path: Optional[str] = None
    gradient_checkpointing: bool = False
    checkpoint_policy: str = "full"
    compile: bool = False
    guidance_scale: float = 6.0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    allow_pickle_weights: bool = False
    expert: Optional[str] = None
    boundary_ratio: Optional[float] = None
    image_to_video: bool = False

    def __post_init__(self) -> None:
        from .flavors import FLAVORS

        if self.flavor not in FLAVORS:
            raise ValueError(f"model.flavor must be one of {sorted(FLAVORS)}, got {self.flavor!r}")
        flavor = FLAVORS[self.flavor]
        if not flavor.experts and (self.expert is not None or self.boundary_ratio is not None):
            raise ValueError(
                f"model.expert and model.boundary_ratio apply to two-expert flavors (Wan 2.2 "
                f"A14B); model.flavor={self.flavor!r} is one transformer: set them to null"
            )
        if flavor.experts:
            if self.expert is None:
                self.expert = "both"
            if self.expert not in EXPERTS:
                raise ValueError(f"model.expert must be one of {EXPERTS}, got {self.expert!r}")
            if self.boundary_ratio is None:
                self.boundary_ratio = flavor.boundary_ratio
            if not 0.0 < float(self.boundary_ratio) < 1.0:  # type: ignore[arg-type]
                raise ValueError(
                    f"model.boundary_ratio must lie in (0, 1), got {self.boundary_ratio}"
                )
        if self.image_to_video and not flavor.first_frame_i2v:
            raise ValueError(
                f"model.image_to_video applies to flavors with a first-frame image-to-video "
                f"mode (Wan 2.2 TI2V); model.flavor={self.flavor!r} has none: set it to false"
            )
        if self.path is not None and not str(self.path).strip():
            raise ValueError("model.path must be a local directory or null, got an empty string")
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            raise ValueError(
                f"model.checkpoint_policy must be one of {CHECKPOINT_POLICIES}, "
                f"got {self.checkpoint_policy!r}"
            )
        if self.checkpoint_policy == "selective" and not self.gradient_checkpointing:
            raise ValueError(
                "model.checkpoint_policy=selective needs model.gradient_checkpointing=true"
            )
        if not self.guidance_scale >= 0:
            raise ValueError(f"model.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.path is not None and self.config_overrides:
            raise ValueError(
                "model.config_overrides only applies to randomly initialised flavors; "
                "it must be empty when model.path is set"
            )


@dataclass
class AttentionConfig:
    """How the video self-attention (Wan) / joint attention (HunyuanVideo) is computed.

    Attributes:
        mode: ``full`` (dense SDPA) or ``sta`` (Sliding Tile Attention).
        backend: STA kernel backend: ``auto`` (triton on CUDA, reference elsewhere),
            ``triton``, ``flex`` or ``reference``.
        tile: (tt, th, tw) tile shape in latent tokens. The default (1, 2, 2) suits the embedded
            ``wan_tiny`` canvas (5, 8, 8) -> 5 x 4 x 4 tiles; real Wan/Hunyuan use (6, 8, 8).
        window: (wt, wh, ww) in tiles for every layer and head. With the default tile on the
            (5, 8, 8) canvas, (3, 3, 3) keeps 3/5 * 3/4 * 3/4 = 33.75% of the video pairs.
        layer_windows: one triple per STA layer (overrides ``window``).
        head_windows: per layer, one triple per head (overrides ``layer_windows``).
        strategy_path: a mask-strategy JSON (``stafinetune.models.strategy``) giving windows per
            (denoising step, layer, head); overrides the above.
        dense_first_steps: denoising steps ``step_index < dense_first_steps`` run dense.
        strict_window: fail when a window is wider than the canvas's tile grid (instead of
            clipping it to the whole axis).
        cost_table: a per-head attention cost table measured on the training device
            (``benchmarks/dispatch_table.py``); layers mixing heads whose window covers the
            canvas with sparse heads then run the covering heads through SDPA where that is
            faster. Without it such layers run STA for every head. (Layers whose every head
            covers the canvas always run SDPA.)
        fp8: sampling only: the sparse attention runs its two matmuls in float8 e4m3
            (``sliding_tile_attention(..., fp8=True)``): on a Hopper GPU with bf16, head dim
            128 and tiles of 64-token frames that divide the canvas; calls with gradients
            (training) stay bf16. About 5e-2 relative difference from the bf16 kernel.
        strategy_path_2: two-expert models (Wan 2.2 A14B): the low-noise expert's
            (``transformer_2``) mask strategy; ``strategy_path`` is then the high-noise
            expert's. Null: the low-noise expert takes the high-noise expert's windows.
    """

    mode: str = "sta"
    backend: str = "auto"
    tile: list[int] = field(default_factory=lambda: [1, 2, 2])
    window: list[int] = field(default_factory=lambda: [3, 3, 3])
    layer_windows: Optional[list[list[int]]] = None
    head_windows: Optional[list[list[list[int]]]] = None
    strategy_path: Optional[str] = None
    dense_first_steps: int = 0
    strict_window: bool = False
    cost_table: Optional[str] = None
    fp8: bool = False
    strategy_path_2: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.fp8, bool):
            raise ValueError(f"attention.fp8 must be true or false, got {self.fp8!r}")
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention.mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention.backend must be one of {ATTENTION_BACKENDS}, got {self.backend!r}"
            )
        check_triple(self.tile, "attention.tile")
        check_triple(self.window, "attention.window")
        if self.layer_windows is not None:
            if len(self.layer_windows) == 0:
                raise ValueError("attention.layer_windows must be null or a non-empty list")
            for i, w in enumerate(self.layer_windows):
                check_triple(w, f"attention.layer_windows[{i}]")
        if self.head_windows is not None:
            if len(self.head_windows) == 0:
                raise ValueError("attention.head_windows must be null or a non-empty list")
            heads = {len(layer) for layer in self.head_windows}
            if len(heads) != 1 or 0 in heads:
                raise ValueError(
                    "attention.head_windows must give the same (non-zero) number of heads in "
                    f"every layer, got {[len(layer) for layer in self.head_windows]}"
                )
            for i, layer in enumerate(self.head_windows):
                for h, w in enumerate(layer):
                    check_triple(w, f"attention.head_windows[{i}][{h}]")
        if self.strategy_path is not None and not str(self.strategy_path).strip():
            raise ValueError("attention.strategy_path must be a file path or null, got ''")
        if self.strategy_path_2 is not None and not str(self.strategy_path_2).strip():
            raise ValueError("attention.strategy_path_2 must be a file path or null, got ''")
        if self.cost_table is not None and not str(self.cost_table).strip():
            raise ValueError("attention.cost_table must be a file path or null, got ''")
        if int(self.dense_first_steps) != self.dense_first_steps or self.dense_first_steps < 0:
            raise ValueError(
                f"attention.dense_first_steps must be an int >= 0, got {self.dense_first_steps}"
            )


@dataclass
class OffloadConfig:
    """Memory levers of training (group ``offload``); each leaves every number unchanged.

    Attributes:
        activations: the block inputs that gradient checkpointing keeps go to pinned host
            memory in the forward and come back, prefetched a block ahead, in the backward
            (``models/offload.py``); needs ``model.gradient_checkpointing``.
        teacher_attention: the teacher's captured attention outputs (the attention loss's
            targets) wait in pinned host memory and come back one layer at a time when the
            loss and its backward read them; needs ``distill.w_attn > 0``.
        block_swap: null (off), or how many leading transformer blocks of the frozen weights
            stay on the GPU: the dense teacher's, and under ``train.trainable=lora`` the
            student's base; the other blocks wait in pinned host memory and each is copied in,
            a block ahead, while the previous one computes (``models/block_swap.py``).
    """

    activations: bool = False
    teacher_attention: bool = False
    block_swap: Optional[int] = None

    def describe(self) -> str:
        """The levers that are on, for the run's start-up summary (``none`` if none is)."""
        on = [name.replace("_", " ") for name in ("activations", "teacher_attention")
              if getattr(self, name)]  # fmt: skip
        if self.block_swap is not None:
            on.append(f"block swap (resident blocks: {self.block_swap})")
        return ", ".join(on) or "none"

    def __post_init__(self) -> None:
        for name in ("activations", "teacher_attention"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"offload.{name} must be true or false, got {value!r}")
        if self.block_swap is not None and (
            isinstance(self.block_swap, bool) or int(self.block_swap) != self.block_swap
            or self.block_swap < 0
        ):  # fmt: skip
            raise ValueError(
                "offload.block_swap must be null (off) or the number of blocks kept on the GPU "
                f"(an int >= 0), got {self.block_swap!r}"
            )
