"""Two-expert models (Wan 2.2 A14B): a high-noise and a low-noise transformer and a boundary.

diffusers' ``WanPipeline`` denoises timesteps ``t >= boundary_ratio * 1000`` with its
``transformer`` (the high-noise expert) and the rest with ``transformer_2`` (the low-noise
expert). Here the two are one module, :class:`ExpertDiT`: two ``VideoDiT`` experts under
``experts.high`` / ``experts.low`` whose ``forward`` routes each sample to the expert owning
its timestep. Training, checkpoints, EMA, the data-parallel wrapper and sampling therefore keep
one student object (its state dict holds both experts); each expert keeps its own STA binding
and window plan (``attention.strategy_path`` and ``attention.strategy_path_2``), and both call
one shared ``STAAttention`` (tile and backend are the run's).

``model.expert`` picks what a run trains: ``high`` or ``low`` builds that expert alone (a plain
``VideoDiT``) and draws noise levels only from its range (:func:`expert_sigma_range`); ``both``
builds the ``ExpertDiT``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .attention import ActivationStore
from .config import AttentionConfig, ModelConfig
from .dit import VideoDiT, resolve_transformer_dir, save_transformer_state
from .windows import WindowPlan

NUM_TRAIN_TIMESTEPS = 1000
# the diffusers pipeline folder of each expert, and the mask strategy an export writes for it
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}
STRATEGY_FILES = {"transformer": "mask_strategy.json", "transformer_2": "mask_strategy_2.json"}
_EXPERT_OF = {folder: expert for expert, folder in EXPERT_FOLDERS.items()}


def expert_sigma_range(expert: str | None, boundary_ratio: float | None) -> tuple[float, float]:
    """The noise levels (lo, hi) an expert is trained on: ``high`` [boundary, 1), ``low``
    (0, boundary); ``both`` or a one-transformer model (``expert=None``) the whole (0, 1)."""
    if expert in (None, "both"):
        return 0.0, 1.0
    assert boundary_ratio is not None
    return (float(boundary_ratio), 1.0) if expert == "high" else (0.0, float(boundary_ratio))


def expert_attention(attention_cfg: AttentionConfig, expert: str) -> AttentionConfig:
    """The attention of one expert: the low-noise expert takes ``attention.strategy_path_2``
    when it is set (else the same windows as the high-noise expert)."""
    if expert == "low" and attention_cfg.strategy_path_2 is not None:
        return dataclasses.replace(
            attention_cfg, strategy_path=attention_cfg.strategy_path_2, strategy_path_2=None
        )
    return dataclasses.replace(attention_cfg, strategy_path_2=None)


class ExpertDiT(nn.Module):
    """Two ``VideoDiT`` experts and their boundary, called like one ``VideoDiT``.

    Args:
        high: the high-noise expert (diffusers ``transformer``).
        low: the low-noise expert (diffusers ``transformer_2``), of the same family and shape.
        boundary_ratio: samples with timestep ``t >= boundary_ratio * 1000`` go to ``high``.

    Attributes mirrored from the experts (the trainer's interface): ``family``, ``adapter``,
    ``num_layers`` (STA layers of one expert), ``num_heads``, ``head_dim``, ``patch_size``,
    ``in_channels``, ``text_dim``, ``pooled_dim``, ``guidance_scale``, ``image_dims``.
    """

    def __init__(self, high: VideoDiT, low: VideoDiT, boundary_ratio: float) -> None:
        super().__init__()
        shape = [{k: v for k, v in dict(e.transformer.config).items() if not k.startswith("_")}
                 for e in (high, low)]  # fmt: skip
        if shape[0] != shape[1]:
            raise ValueError("the two experts of a two-expert model must share one config")
        if not 0.0 < boundary_ratio < 1.0:
            raise ValueError(f"boundary_ratio must lie in (0, 1), got {boundary_ratio}")
        self.experts = nn.ModuleDict({"high": high, "low": low})
        self.boundary_ratio = float(boundary_ratio)
        for name in ("family", "adapter", "num_layers", "num_heads", "head_dim", "patch_size",
                     "in_channels", "text_dim", "pooled_dim", "guidance_scale",
                     "image_dims"):  # fmt: skip
            setattr(self, name, getattr(high, name))
        self._share_attention()
        self._capturing = 0

    def _share_attention(self) -> None:
        # one STAAttention for both: the windows come from each expert's own plan
        self.experts["low"].attention = self.experts["high"].attention

    @property
    def high(self) -> VideoDiT:
        """The high-noise expert."""
        return self.experts["high"]  # type: ignore[return-value]

    @property
    def low(self) -> VideoDiT:
        """The low-noise expert."""
        return self.experts["low"]  # type: ignore[return-value]

    @property
    def attention(self) -> nn.Module:
        """The ``STAAttention`` both experts call."""
        return self.high.attention

    @property
    def attention_cfg(self) -> AttentionConfig:
        """The high-noise expert's attention (the low one differs only in its strategy)."""
        return self.high.attention_cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.high.dtype

    @property
    def boundary_timestep(self) -> float:
        """Timesteps at or above this go to the high-noise expert."""
        return self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def canvas_for(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token canvas (T/pt, H/ph, W/pw) of latents shaped (..., T, H, W)."""
        return self.high.canvas_for(latent_shape)

    def is_high(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Whether the high-noise expert denoises each timestep (a float32 comparison, as
        the timesteps the model is called with)."""
        return torch.as_tensor(timestep, dtype=torch.float32) >= self.boundary_timestep

    def set_attention(self, attention_cfg: AttentionConfig) -> None:
        """Switch both experts' attention (``strategy_path_2`` goes to the low-noise expert)."""
        for expert in ("high", "low"):
            self.experts[expert].set_attention(expert_attention(attention_cfg, expert))
        self._share_attention()

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None = None,
        *,
        step_index: int | None = None,
        **inputs: Any,
    ) -> torch.Tensor:
        """``VideoDiT.forward`` of the expert owning each sample's timestep.

        Args:
            latents: (B, C, T, H, W); timestep: (B,) in [0, 1000] (a scalar is broadcast);
            text (B, L, Dt), text_mask (B, L), pooled_text (B, Dp) | None; step_index as
            ``VideoDiT``.
            inputs: ``VideoDiT``'s further conditioning (``image_latents``, ``image_embeds``:
                (B, ...) tensors, or None), split with the batch.
        Returns:
            (B, C, T, H, W) in the model's dtype.
        """
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device).float().expand(batch)  # (B,)
        is_high = self.is_high(t)  # (B,)
        if bool(is_high.all()) or not bool(is_high.any()):
            expert = self.high if bool(is_high[0]) else self.low
            return expert(latents, t, text, text_mask, pooled_text, step_index=step_index, **inputs)
        if self._capturing:
            raise ValueError(
                "capture() on a two-expert model needs every sample of the batch on one side of "
                f"the boundary timestep {self.boundary_timestep:g}"
            )
        outs = []
        for expert, rows in ((self.high, is_high), (self.low, ~is_high)):
            pooled = None if pooled_text is None else pooled_text[rows]
            part = {k: None if v is None else v[rows] for k, v in inputs.items()}
            outs.append(expert(latents[rows], t[rows], text[rows], text_mask[rows], pooled,
                               step_index=step_index, **part))  # fmt: skip
        out = outs[0].new_empty((batch, *outs[0].shape[1:]))  # (B, C, T, H, W)
        out[is_high], out[~is_high] = outs[0], outs[1]
        return out

    @contextlib.contextmanager
    def capture(
        self,
        layers: Iterable[int] | None = None,
        detach: bool = False,
        inputs: bool = False,
        *,
        store: ActivationStore | None = None,
    ) -> Iterator[ActivationStore]:
        """``VideoDiT.capture`` over both experts: the expert that runs a batch records its STA
        layers (0..num_layers-1) into the one store. Every sample of a captured batch must
        belong to one expert (the trainer draws one expert per micro-batch)."""
        if store is None:
            store = ActivationStore(layers, detach, inputs)
        elif layers is not None or detach or inputs:
            raise ValueError("capture(store=...) takes layers/detach/inputs from the store")
        self._capturing += 1
        try:
            with self.high.capture(store=store), self.low.capture(store=store):
                yield store
        finally:
            self._capturing -= 1

    def enable_gradient_checkpointing(
        self, policy: str = "full", *, compile: bool = False, backend: str = "inductor"
    ) -> None:
        """``VideoDiT.enable_gradient_checkpointing`` on both experts."""
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing(policy, compile=compile, backend=backend)

    def disable_gradient_checkpointing(self) -> None:
        for expert in self.experts.values():
            expert.disable_gradient_checkpointing()

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write ``transformer/`` and ``transformer_2/`` (diffusers format) and the pipeline's
        ``model_index.json`` with ``boundary_ratio`` (see :func:`write_model_index`)."""
        for expert, folder in EXPERT_FOLDERS.items():
            self.experts[expert].save_pretrained(os.path.join(path, folder))
        write_model_index(path, self.boundary_ratio, image_to_video=self.image_dims is not None)


def model_parts(dit: nn.Module, expert: str | None = None) -> dict[str, VideoDiT]:
    """Each transformer of a model by its pipeline folder: both experts (``transformer``,
    ``transformer_2``) of an ``ExpertDiT``; for a ``VideoDiT`` ``{"transformer": dit}``, or
    ``{"transformer_2": dit}`` when it is the low-noise expert (``expert="low"``)."""
    if isinstance(dit, ExpertDiT):
        return {folder: dit.experts[e] for e, folder in EXPERT_FOLDERS.items()}  # type: ignore[misc]
    return {EXPERT_FOLDERS.get(expert or "high", "transformer"): dit}  # type: ignore[dict-item]


def window_plans(dit: nn.Module, expert: str | None = None) -> dict[str, WindowPlan]:
    """The window plan of each transformer of ``dit`` (see :func:`model_parts`)."""
    return {folder: part.plan for folder, part in model_parts(dit, expert).items()}


def write_model_index(
    path: str | os.PathLike[str], boundary_ratio: float, *, image_to_video: bool = False
) -> None:
    """A ``WanPipeline`` ``model_index.json`` naming the two experts and the boundary
    (``WanImageToVideoPipeline`` for ``image_to_video`` experts, Wan 2.2 I2V-A14B, which take
    no image encoder); the text encoder, tokenizer, VAE and scheduler are the user's (pass them
    to ``WanPipeline.from_pretrained(path, vae=..., text_encoder=..., tokenizer=...,
    scheduler=...)``)."""
    import diffusers

    index = {
        "_class_name": "WanImageToVideoPipeline" if image_to_video else "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "boundary_ratio": boundary_ratio,
        "expand_timesteps": False,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "scheduler": [None, None],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
        "vae": [None, None],
    }
    if image_to_video:
        index |= {"image_encoder": [None, None], "image_processor": [None, None]}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)


def save_model_state(
    dit: nn.Module,
    state: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    model_cfg: ModelConfig,
) -> None:
    """``save_transformer_state`` for every transformer of a run's model: the weights
    ``state`` (keys as in ``dit.state_dict()``) as diffusers folders under ``path``.

    A one-transformer model writes ``transformer/``. A two-expert flavor writes the trained
    expert(s) into their folders (``transformer/`` high, ``transformer_2/`` low), copies an
    expert the run did not train from ``model.path`` (when set), and once both are there writes
    the pipeline's ``model_index.json`` with the boundary, so the folder loads as a
    ``WanPipeline`` (``WanImageToVideoPipeline`` for image-to-video experts).
    """
    parts = model_parts(dit, model_cfg.expert)
    for folder, part in parts.items():
        prefix = "" if len(parts) == 1 else f"experts.{_EXPERT_OF[folder]}."
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        save_transformer_state(part, weights, os.path.join(path, folder))
    if model_cfg.expert is None:
        return
    missing = set(EXPERT_FOLDERS.values()) - set(parts)
    if missing and model_cfg.path is None:  # random weights: the other expert is nowhere
        return
    for folder in missing:  # the base model's other expert, as it is
        shutil.copytree(resolve_transformer_dir(model_cfg.path, folder),
                        os.path.join(path, folder), dirs_exist_ok=True)  # fmt: skip
    image_to_video = next(iter(parts.values())).image_dims is not None
    write_model_index(path, float(model_cfg.boundary_ratio),  # type: ignore[arg-type]
                      image_to_video=image_to_video)  # fmt: skip


def build_experts(
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    build_one: Callable[[str, AttentionConfig], VideoDiT],
) -> VideoDiT | ExpertDiT:
    """The model of a two-expert flavor as ``model.expert`` says: one expert (``high`` /
    ``low``, a ``VideoDiT``) or both (an ``ExpertDiT``).

    ``build_one(folder, attention_cfg)`` builds one expert (from ``model.path/<folder>`` or
    randomly, high first).
    """
    expert = model_cfg.expert or "both"
    if expert != "both":
        return build_one(EXPERT_FOLDERS[expert], expert_attention(attention_cfg, expert))
    high, low = (build_one(EXPERT_FOLDERS[e], expert_attention(attention_cfg, e))
                 for e in ("high", "low"))  # fmt: skip
    assert model_cfg.boundary_ratio is not None
    return ExpertDiT(high, low, float(model_cfg.boundary_ratio))


def expert_noise(model_cfg: ModelConfig) -> dict[str, Any]:
    """``DistillStep``'s noise-level arguments for ``model.expert``: the trained expert's
    ``sigma_range``, or for ``both`` the ``boundary`` (one expert per micro-batch)."""
    if model_cfg.expert is None:
        return {}
    if model_cfg.expert == "both":
        return {"boundary": float(model_cfg.boundary_ratio)}  # type: ignore[arg-type]
    return {"sigma_range": expert_sigma_range(model_cfg.expert, model_cfg.boundary_ratio)}


def plan_at(dit: nn.Module, timestep: float) -> WindowPlan:
    """The window plan of the transformer that denoises ``timestep`` (in [0, 1000]): the
    model's own, or that of the expert owning it."""
    if isinstance(dit, ExpertDiT):
        return (dit.high if bool(dit.is_high(timestep)) else dit.low).plan
    return dit.plan  # type: ignore[return-value]


@contextlib.contextmanager
def dense_plans(dit: nn.Module, source: str) -> Iterator[None]:
    """Every transformer of ``dit`` attends densely inside the block (its window plans are
    put back after); ``source`` names who asked, for error messages."""
    parts = model_parts(dit)
    saved = [part.plan for part in parts.values()]
    for part in parts.values():
        part.plan = WindowPlan(train=None, source=source)
    try:
        yield
    finally:
        for part, plan in zip(parts.values(), saved, strict=True):
            part.plan = plan


def expert_steps(dit: nn.Module, sigmas: Sequence[float]) -> dict[str, list[int]]:
    """The denoising steps (indices into the levels ``sigmas``) each transformer of ``dit``
    runs, by pipeline folder: all of them for a one-transformer model."""
    if not isinstance(dit, ExpertDiT):
        return {"transformer": list(range(len(sigmas)))}
    high = [i for i, s in enumerate(sigmas) if bool(dit.is_high(float(s) * NUM_TRAIN_TIMESTEPS))]
    low = [i for i in range(len(sigmas)) if i not in high]
    return {"transformer": high, "transformer_2": low}
