"""``VideoDiT``: a diffusers video transformer (Wan 2.1 / HunyuanVideo / 1.5) with STA attention.

The diffusers model is wrapped, never forked: STA enters only through attention processors
on the video self-attention (Wan ``blocks[i].attn1``) or the joint attention (HunyuanVideo
``transformer_blocks[i].attn`` then ``single_transformer_blocks[i].attn``). Those are the
model's "STA layers", indexed 0..num_layers-1 in that order. Wan's text cross-attention and
HunyuanVideo's token refiner keep diffusers' dense processors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .activation_checkpointing import checkpoint_options, compile_checkpointed
from .attention import ActivationStore, STAAttention
from .binding import STABinding, token_canvas
from .config import AttentionConfig, ModelConfig
from .dispatch import load_cost_table
from .families import ImageCondition, ImageDims, ModelFamily, config_getter, get_family
from .flavors import get_flavor
from .windows import WindowPlan, build_window_plan

ATTENTION_FILE = "stafinetune_attention.json"
log = logging.getLogger(__name__)


def model_config_values(model_cfg: ModelConfig) -> dict[str, Any]:
    """The diffusers config of the model ``model_cfg`` names, read without building it (a
    ``model.path`` folder's, with the flavor's say on ``ModelFamily.flavor_keys``)."""
    flavor = get_flavor(model_cfg.flavor)
    if model_cfg.path is None:
        return {**flavor.config, **dict(model_cfg.config_overrides)}
    folder = resolve_transformer_dir(model_cfg.path)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return {**config, **flavor_decides(model_cfg, config)}


def model_patch_size(model_cfg: ModelConfig) -> tuple[int, int, int]:
    """The latent patch of the model ``model_cfg`` names, read without building it."""
    family = get_family(get_flavor(model_cfg.flavor).family)
    return family.patch_size(model_config_values(model_cfg))


def model_image_dims(model_cfg: ModelConfig) -> ImageDims | None:
    """The image inputs of the model ``model_cfg`` names (None: text-to-video), unbuilt."""
    family = get_family(get_flavor(model_cfg.flavor).family)
    config = model_config_values(model_cfg)
    check_image_mode(model_cfg, config)
    return family.image_dims(config, first_frame=model_cfg.image_to_video)


def flavor_decides(model_cfg: ModelConfig, config: Any) -> dict[str, Any]:
    """The values of the family's ``flavor_keys`` where a ``model.path`` folder's ``config``
    differs from ``model.flavor``'s, which win; each difference is logged as a warning.

    HunyuanVideo 1.5's i2v and t2v transformers share one architecture and differ only in
    ``task_type``, which the transformer never reads; folders converted by earlier diffusers
    scripts say ``i2v`` for the 480p t2v model. The flavor is the user's statement. Each
    difference is logged once per process (the config is read at several start-up checks).
    """
    flavor = get_flavor(model_cfg.flavor)
    get = config_getter(config)
    changed = {}
    for key in get_family(flavor.family).flavor_keys:
        if key in flavor.config and get(key) != flavor.config[key]:
            changed[key] = flavor.config[key]
            _warn_flavor_decides(str(model_cfg.path), key, get(key), model_cfg.flavor,
                                 flavor.config[key])  # fmt: skip
    return changed


@functools.cache
def _warn_flavor_decides(path: str, key: str, held: Any, flavor: str, value: Any) -> None:
    log.warning(
        "model.path=%s says %s=%r but model.flavor=%s has %r: following the flavor (the "
        "transformer never reads %s)", path, key, held, flavor, value, key,
    )  # fmt: skip


def check_image_mode(model_cfg: ModelConfig, config: Any) -> None:
    """Fail naming ``model.path`` when the transformer config it holds is image-to-video and
    ``model.flavor`` text-to-video, or the other way round (``ModelFamily.image_dims``: Wan's
    input channels)."""
    if model_cfg.path is None:
        return
    flavor = get_flavor(model_cfg.flavor)
    family = get_family(flavor.family)
    held, named = (family.image_dims(c) is not None for c in (config, flavor.config))
    if held != named:
        kind = {True: "an image-to-video", False: "a text-to-video"}
        raise ValueError(
            f"model.path={model_cfg.path!r} holds {kind[held]} transformer (its config.json) "
            f"but model.flavor={model_cfg.flavor!r} is {kind[named]} model: use the matching "
            "flavor"
        )


class VideoDiT(nn.Module):
    """A diffusers video DiT whose video attention runs through one ``STAAttention`` module.

    Call it as ``dit(latents, timestep, text, text_mask, pooled_text=None, step_index=None)``,
    an image-to-video model with ``image_latents=`` and ``image_embeds=`` too.
    Build it with ``build_model``. Attributes for the trainer: ``family``, ``num_layers``
    (STA layers), ``num_heads``, ``head_dim``, ``patch_size`` (pt, ph, pw), ``in_channels``
    (of the noisy latents; an image-to-video model takes its condition channels on top),
    ``text_dim``, ``pooled_dim`` (None for Wan), ``image_dims`` (``ImageDims``, None for
    text-to-video), ``canvas_for(latent_shape)``.
    """

    def __init__(
        self,
        transformer: nn.Module,
        family: str,
        attention_cfg: AttentionConfig,
        *,
        guidance_scale: float = 6.0,
        image_to_video: bool = False,
    ) -> None:
        super().__init__()
        self.adapter: ModelFamily = get_family(family)
        self.transformer = transformer
        self.family = family
        self.guidance_scale = float(guidance_scale)
        cfg = transformer.config
        self.num_heads: int = int(cfg.num_attention_heads)
        self.head_dim: int = int(cfg.attention_head_dim)
        # image_to_video: the first-frame mode of a text-to-video config (Wan 2.2 TI2V)
        self.image_dims: ImageDims | None = self.adapter.image_dims(cfg, first_frame=image_to_video)
        self.in_channels: int = self.adapter.latent_channels(cfg)  # of the denoised latents
        self.patch_size: tuple[int, int, int] = self.adapter.patch_size(cfg)
        self.text_dim, self.pooled_dim = self.adapter.text_dims(cfg)
        self.num_layers: int = len(self.sta_layers())
        self.attention_cfg: AttentionConfig
        self.attention: nn.Module  # STAAttention, or a parallel wrapper around it
        self._binding: STABinding | None = None
        self.set_attention(attention_cfg)

    # ----------------------------------------------------------------- structure
    def sta_layers(self) -> list[nn.Module]:
        """The diffusers attention modules STA replaces, in STA-layer order."""
        return self.adapter.sta_layers(self.transformer)

    @property
    def plan(self) -> WindowPlan:
        """The windows of every STA layer and head (per step when a strategy gives them)."""
        assert self._binding is not None
        return self._binding.plan

    @plan.setter
    def plan(self, plan: WindowPlan) -> None:
        self.binding.plan = plan

    @property
    def binding(self) -> STABinding:
        """The processors and forward hooks that carry STA on ``self.transformer``."""
        assert self._binding is not None
        return self._binding

    def set_attention(self, attention_cfg: AttentionConfig) -> None:
        """Switch how this model attends (e.g. dense teacher -> STA student), keeping weights.

        Replaces ``self.attention`` with a fresh ``STAAttention``; apply parallel wrappers of
        the attention module after calling this.
        """
        attention_cfg = as_config(attention_cfg, AttentionConfig)
        plan = build_window_plan(attention_cfg, self.num_layers, self.num_heads)
        self._check_backend(attention_cfg)
        self.attention_cfg = attention_cfg
        self.attention = STAAttention(
            attention_cfg.tile, attention_cfg.backend, load_cost_table(attention_cfg.cost_table),
            fp8=attention_cfg.fp8,
        )
        if self._binding is None:
            self._binding = STABinding(
                self.transformer,
                plan,
                source=self,
                strict=attention_cfg.strict_window,
                owner="VideoDiT",
            ).install()
        else:
            self._binding.plan = plan
            self._binding.strict = attention_cfg.strict_window

    def _check_backend(self, attention_cfg: AttentionConfig) -> None:
        """Fail at build time, not at the first forward, when the triton backend cannot run."""
        device = self.sta_layers()[0].to_q.weight.device
        if (
            attention_cfg.mode == "sta"
            and attention_cfg.backend == "triton"
            and device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET") != "1"
        ):
            raise ValueError(
                "attention.backend=triton needs a CUDA device (or TRITON_INTERPRET=1 for the slow "
                "CPU interpreter); use auto or reference on the CPU"
            )
        if attention_cfg.mode == "sta" and attention_cfg.fp8 and (
                device.type == "cpu" or attention_cfg.backend not in ("auto", "triton")):
            raise ValueError(
                "attention.fp8=true runs the triton backend's FP8 kernel on a Hopper GPU; this "
                f"model is on {device.type} with attention.backend={attention_cfg.backend}"
            )

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: the output projection's (the block linears may be stored in FP8,
        ``stafinetune.models.fp8``; some small modules stay fp32)."""
        return self.transformer.proj_out.weight.dtype

    def canvas_for(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token canvas (T/pt, H/ph, W/pw) of latents shaped (..., T, H, W); must divide evenly."""
        return token_canvas(latent_shape, self.patch_size)

    # ----------------------------------------------------------------- forward
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
        """Predict the flow/noise target for noisy ``latents``.

        Args:
            latents: (B, C, T, H, W) noisy latents.
            timestep: (B,) in [0, 1000] (a scalar is broadcast).
            text: (B, L, Dt) text-encoder states, padded to L.
            text_mask: (B, L) bool, True for valid tokens. Wan zeroes the padded embeddings
                (as diffusers' Wan pipeline does); HunyuanVideo masks them in joint attention.
            pooled_text: (B, Dp) pooled text embedding (required by HunyuanVideo, unused by Wan).
            step_index: denoising step for per-step windows and ``dense_first_steps``; ``None``
                in training (the step-independent window per (layer, head)).
            image_latents: (B, Ci, T, H, W) latents of the conditioning video (image-to-video
                models; ``ImageCondition``), required exactly when ``image_dims`` is set.
            image_embeds: (B, N, Di) image-encoder states, when ``image_dims.embed_dim`` is set.
            condition: the family's further conditioning tensors by name (HunyuanVideo 1.5:
                its glyph text, ``ModelFamily.model_inputs``); ``None`` for most models.
        Returns:
            (B, C, T, H, W) in the model's dtype.
        """
        if latents.ndim != 5 or latents.shape[1] != self.in_channels:
            raise ValueError(
                f"latents must be (B, {self.in_channels}, T, H, W), got {tuple(latents.shape)}"
            )
        batch = latents.shape[0]
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(f"text must be (B={batch}, L, {self.text_dim}), got {tuple(text.shape)}")
        if text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be a bool (B, L) = {tuple(text.shape[:2])} tensor, got "
                f"{text_mask.dtype} {tuple(text_mask.shape)}"
            )
        dtype = self.dtype
        timestep = torch.as_tensor(timestep, device=latents.device).float().expand(batch)
        latents = latents.to(dtype)
        text = text.to(dtype)
        kwargs = self.adapter.conditioning(
            self.transformer, text, text_mask, pooled_text, self.guidance_scale
        )
        if image_latents is None and self.image_dims is not None:
            raise ValueError("an image-to-video model needs image_latents (and image_embeds)")
        if image_latents is not None and self.image_dims is None:
            raise ValueError("this text-to-video model takes no image_latents")
        if image_latents is not None:
            first_frame = self.image_dims.first_frame  # type: ignore[union-attr]
            image = ImageCondition(image_latents.to(dtype), image_embeds, first_frame)
            latents, timestep, kwargs = self.adapter.image_inputs(
                self.transformer, latents, timestep, image, kwargs
            )
        kwargs |= self.adapter.model_inputs(self.transformer, latents, timestep, condition)
        # the transformer's own hooks (``self.binding``) derive the canvas, text lengths and
        # windows of this call; the step is the one given here
        with self.binding.at_step(step_index):
            return self.transformer(return_dict=False, **kwargs)[0]  # (B, C, T, H, W)

    # ----------------------------------------------------------------- hooks
    @contextlib.contextmanager
    def capture(
        self,
        layers: Iterable[int] | None = None,
        detach: bool = False,
        inputs: bool = False,
        *,
        store: ActivationStore | None = None,
    ) -> Iterator[ActivationStore]:
        """Collect STA-layer attention outputs and the final output of forwards in the block.

        Args:
            layers: STA layer indices to keep (default: all). Others cost nothing.
            detach: store detached tensors (e.g. for a teacher).
            inputs: also keep each layer's (q, k, v) (for replaying windows in a mask search).
            store: record into this store instead of a new one (``layers``, ``detach`` and
                ``inputs`` are then the store's own). A subclass overriding ``record(layer, o,
                qkv, state)`` sees each layer's output and (q, k, v) as they are computed and
                can reduce them on the fly instead of keeping them (the window search does).
        Yields:
            an ``ActivationStore``: ``store[i]`` (B, S, H, D) per layer, ``store["final"]``.
        Outside ``capture()`` nothing is recorded (one ``is None`` check per layer).
        """
        if store is None:
            store = ActivationStore(layers, detach, inputs)
        elif layers is not None or detach or inputs:
            raise ValueError("capture(store=...) takes layers/detach/inputs from the store")
        binding = self.binding
        previous, binding.store = binding.store, store
        try:
            yield store
        finally:
            binding.store = previous

    # ----------------------------------------------------------------- checkpointing
    def enable_gradient_checkpointing(
        self, policy: str = "full", *, compile: bool = False, backend: str = "inductor"
    ) -> None:
        """Recompute each transformer block in backward; STA state travels with the block.

        The recomputation runs during backward, after ``forward`` returned, so the checkpoint
        function re-installs the forward's ``ForwardState`` (without capture store) around it
        (``STABinding.carrying_state``, which diffusers' own ``enable_gradient_checkpointing``
        gets as well).

        Args:
            policy: ``full`` recomputes the whole block; ``selective`` keeps every attention
                call's output so the recomputation skips attention
                (``activation_checkpointing.py``).
            compile: compile each checkpointed block call (checkpoint and block) as one
                region with ``torch.compile``; the compiler then plans the recomputation.
            backend: the ``torch.compile`` backend (tests use ``aot_eager``).
        """
        options = checkpoint_options(policy)

        def checkpoint_block(block: Any, *args: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(block, *args, **options)

        function = self.binding.carrying_state(checkpoint_block)
        if compile:  # functools.wraps keeps the carrying_state mark on the compiled call
            function = compile_checkpointed(function, self.num_layers, backend)
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=function)

    def disable_gradient_checkpointing(self) -> None:
        """Turn block recomputation off again."""
        self.transformer.disable_gradient_checkpointing()

    # ----------------------------------------------------------------- export
    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write the wrapped transformer in diffusers format (config.json + safetensors).

        The attention configuration goes next to it in ``stafinetune_attention.json``;
        diffusers ignores that file, so the folder loads as a plain diffusers transformer.
        """
        if getattr(self.transformer, "_hf_peft_config_loaded", False):
            raise ValueError(
                "this model holds a LoRA adapter, so its weights are not a plain diffusers "
                "transformer: export it with stafinetune.training.lora.export_lora (adapter, or merged)"
            )
        os.makedirs(path, exist_ok=True)
        self.transformer.save_pretrained(path, safe_serialization=True)
        save_attention_config(path, self.attention_cfg)


def save_attention_config(path: str | os.PathLike[str], attention_cfg: AttentionConfig) -> None:
    """Write ``attention_cfg`` as ``<path>/stafinetune_attention.json`` (diffusers ignores it)."""
    with open(os.path.join(path, ATTENTION_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(attention_cfg), f, indent=1)


def save_transformer_state(
    dit: VideoDiT, state: dict[str, torch.Tensor], path: str | os.PathLike[str]
) -> None:
    """Write ``dit``'s transformer with the weights ``state`` (keys as in ``dit.state_dict()``)
    as a plain diffusers folder, plus ``stafinetune_attention.json``.

    For weights gathered from a sharded model: the module is rebuilt from its config on the
    meta device and takes the tensors as they are, so nothing is allocated twice.
    """
    prefix = "transformer."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    with torch.device("meta"):
        copy = type(dit.transformer).from_config(dit.transformer.config)
    copy.load_state_dict(weights, strict=True, assign=True)
    os.makedirs(path, exist_ok=True)
    copy.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, ATTENTION_FILE), "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(dit.attention_cfg), f, indent=1)


def resolve_transformer_dir(path: str | os.PathLike[str], subfolder: str = "transformer") -> str:
    """The folder holding the transformer's ``config.json``: ``path/<subfolder>`` or ``path``.

    ``subfolder="transformer_2"`` (the low-noise expert of a two-expert pipeline) must exist:
    ``path`` itself is then no fallback.
    """
    path = os.fspath(path)
    candidates = [os.path.join(path, subfolder)] + ([path] if subfolder == "transformer" else [])
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ValueError(
        f"model.path={path!r} holds no diffusers transformer (looked for config.json in "
        + " and ".join(f"<path>{c[len(path):] or ''}" for c in candidates) + ")"
    )


def load_transformer(
    family: str,
    path: str | os.PathLike[str],
    dtype: torch.dtype,
    *,
    allow_pickle: bool = False,
    subfolder: str = "transformer",
) -> nn.Module:
    """Load a diffusers transformer of ``family`` from a local directory (no hub access;
    safetensors only unless ``allow_pickle``); ``subfolder`` as ``resolve_transformer_dir``.
    Raises ValueError naming the folder for a malformed safetensors file or ``config.json``."""
    from stafinetune.safety import check_safetensors_files, load_json_file, weights_loading_kwargs

    folder = resolve_transformer_dir(path, subfolder)
    safe = weights_loading_kwargs(
        folder, "model.path", allow_pickle=allow_pickle, consent="model.allow_pickle_weights"
    )
    check_safetensors_files(folder, "model.path")  # a damaged file: one error, not diffusers'
    cls = get_family(family).transformer_class()
    config = load_json_file(os.path.join(folder, "config.json"))
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name is not None and class_name != cls.__name__:
        raise ValueError(
            f"model.path={os.fspath(path)!r} holds a {class_name}, but model.flavor is a "
            f"{family} flavor ({cls.__name__})"
        )
    return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **safe)


def cast_like_diffusers(transformer: nn.Module, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` in place, leaving the model's ``_keep_in_fp32_modules`` untouched.

    This is what diffusers' ``from_pretrained(torch_dtype=...)`` does; a plain ``.to(dtype)``
    would also cast the time embedder, the modulation tables and Wan's float64 RoPE tables.
    """
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
            if not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            if any(k in name.split(".") for k in keep):
                continue
            tensor.data = tensor.data.to(dtype)


def reset_rope_buffers(dit: VideoDiT, device: str | torch.device) -> None:
    """Recompute non-persistent buffers (Wan's RoPE tables) on ``device``.

    Needed after ``build_model(device="meta")`` + ``to_empty``: those buffers are not in the
    state dict, so loading weights does not restore them. HunyuanVideo computes RoPE on the fly.
    """
    dit.adapter.reset_buffers(dit.transformer, device)


def as_config(cfg: Any, cls: type) -> Any:
    """Accept a dataclass instance, an OmegaConf node or a plain mapping of ``cls``'s fields."""
    if isinstance(cls, type) and isinstance(cfg, cls):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(cfg, dict):
        return cls(**cfg)
    raise TypeError(f"expected a {cls.__name__}, got {type(cfg).__name__}")


def build_model(
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> VideoDiT:
    """Build the ``VideoDiT`` named by ``model_cfg`` with the attention of ``attention_cfg``.

    A two-expert flavor gives the expert ``model.expert`` names, or for ``both`` an
    ``ExpertDiT`` (``models/experts.py``) with the ``VideoDiT`` interface.

    Without ``model_cfg.path`` the flavor's config is instantiated with random weights directly
    on ``device`` (``"meta"`` builds the real shapes without memory, for benchmarks); with a
    path the weights load from that local diffusers directory and move to ``device``.
    ``model_cfg.gradient_checkpointing`` is applied by ``stafinetune.parallel.parallelize``
    (training only), not here.
    """
    model_cfg = as_config(model_cfg, ModelConfig)
    attention_cfg = as_config(attention_cfg, AttentionConfig)
    flavor = get_flavor(model_cfg.flavor)
    device = torch.device(device)

    def build_one(subfolder: str, attention: AttentionConfig) -> VideoDiT:
        if model_cfg.path is not None:
            transformer = load_transformer(
                flavor.family, model_cfg.path, dtype, allow_pickle=model_cfg.allow_pickle_weights,
                subfolder=subfolder,
            ).to(device)  # fmt: skip
            transformer.register_to_config(**flavor_decides(model_cfg, transformer.config))
            check_image_mode(model_cfg, transformer.config)
        else:
            config = {**flavor.config, **dict(model_cfg.config_overrides)}
            cls = get_family(flavor.family).transformer_class()
            try:
                with device:
                    transformer = cls(**config)
            except TypeError as err:
                raise ValueError(
                    f"model.config_overrides has a key {cls.__name__} rejects: {err}"
                ) from err
            cast_like_diffusers(transformer, dtype)
        return VideoDiT(
            transformer, flavor.family, attention, guidance_scale=model_cfg.guidance_scale,
            image_to_video=model_cfg.image_to_video,
        )  # fmt: skip

    if flavor.experts:  # Wan 2.2 A14B: one expert or both (``models/experts.py``)
        from .experts import build_experts

        return build_experts(model_cfg, attention_cfg, build_one)
    return build_one("transformer", attention_cfg)
