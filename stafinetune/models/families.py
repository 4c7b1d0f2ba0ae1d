"""Model families: what the framework needs to know of each diffusers video DiT.

A family adapter answers, for one diffusers transformer class:

- which modules STA replaces (``sta_layers``) and which repeated blocks are the units of
  activation checkpointing, compile and sharding (``blocks``, ``sta_blocks``);
- how the token canvas follows from the latents (``patch_size``) and whether text tokens
  follow the video tokens in the attention sequence (``joint_text``);
- where sequence parallelism splits and gathers the sequence (``sequence_seams``);
- its text inputs (``text_dims``) and its diffusers pipeline class (LoRA export);
- an image-to-video model's condition (``image_dims``, ``image_inputs``) and inputs beyond
  the noisy latents and the text (``latent_channels``, ``model_inputs``,
  ``joint_text_mask``: HunyuanVideo 1.5's glyph text).

Every other module asks the family instead of testing the family's name, so a new model is
one class here (plus its processor in ``binding.py`` and its flavors in ``flavors.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# diffusers' Wan cross-attention splits image from text tokens by this text length
WAN_TEXT_TOKENS = 512


def config_getter(config: Any) -> Any:
    """Field access for a diffusers config (FrozenDict or attribute object) or a plain dict."""
    return config.get if isinstance(config, dict) else lambda key: getattr(config, key)


@dataclass(frozen=True)
class ImageDims:
    """What an image-to-video transformer takes besides the noisy latents.

    Attributes:
        condition_channels: channels concatenated after the noisy latents (Wan 2.1 I2V: 4 mask
            channels + 16 latents of the conditioning video = 20), 0 for none.
        embed_dim: width of the image encoder's states (Wan 2.1 I2V: CLIP ViT-H, 1280), or
            None when the model takes no image embeddings.
        first_frame: the condition is the clean latent of the first frame alone (B, C, 1, H,
            W), which replaces the first latent frame, whose tokens get timestep 0 (Wan 2.2
            TI2V, diffusers' ``expand_timesteps``); the losses leave that frame out.
    """

    condition_channels: int
    embed_dim: int | None
    first_frame: bool = False


@dataclass
class ImageCondition:
    """The image condition of a batch, as cached by the data pipeline.

    Attributes:
        latents: (B, C, T, H, W) VAE latents of the conditioning video (the first frame, then
            zeros for Wan 2.1 I2V), or (B, C, 1, H, W) of the first frame alone
            (``ImageDims.first_frame``), normalised like the training latents.
        embeds: (B, N, Di) image-encoder states of the first frame, or None.
        first_frame: ``latents`` replace the first latent frame (``ImageDims.first_frame``).
    """

    latents: torch.Tensor
    embeds: torch.Tensor | None = None
    first_frame: bool = False


@dataclass(frozen=True)
class SequenceSeams:
    """Where Ulysses sequence parallelism splits and gathers a transformer's video sequence.

    Attributes:
        rope: the module whose outputs (the RoPE tables) are split along ``rope_dim``.
        rope_dim: the sequence dimension of those tables.
        first_block: the block whose ``hidden_states`` input is split (after patch embedding).
        output: the module whose output (B, S, C) is gathered back (the output projection).
        token_timestep: the transformer's argument that may hold one timestep per video token
            (B, S) (Wan 2.2 TI2V), split like the video tokens before the time embedding so
            that every block's modulation and the output norm see this rank's tokens' (as
            diffusers' ``_cp_plan`` splits it); a (B,) timestep passes as it is. None: the
            family takes (B,) timesteps only.
    """

    rope: nn.Module
    rope_dim: int
    first_block: nn.Module
    output: nn.Module
    token_timestep: str | None = None


class ModelFamily:
    """One diffusers DiT family; subclasses fill in the answers (see the module docstring)."""

    name: str = ""
    joint_text: bool = False  # text tokens follow the video tokens in the attention sequence
    # config keys the transformer never reads but the family does, which the flavor decides
    # over a model.path folder's config.json (HunyuanVideo 1.5: task_type)
    flavor_keys: tuple[str, ...] = ()

    def transformer_class(self) -> type[nn.Module]:
        """The diffusers transformer class."""
        raise NotImplementedError

    def pipeline_class(self) -> type:
        """The diffusers text-to-video pipeline class (saves LoRA weights in its format)."""
        raise NotImplementedError

    def patch_size(self, config: Any) -> tuple[int, int, int]:
        """(pt, ph, pw) latent patch of a transformer config (mapping or diffusers config)."""
        raise NotImplementedError

    def text_dims(self, config: Any) -> tuple[int, int | None]:
        """(text embedding width, pooled text width or None) the transformer takes."""
        raise NotImplementedError

    def sta_layers(self, transformer: nn.Module) -> list[nn.Module]:
        """The attention modules STA replaces, in STA-layer order."""
        raise NotImplementedError

    def sta_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The blocks that hold the STA layers (what ``model.compile`` compiles)."""
        raise NotImplementedError

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """Every repeated block (the units of sharding)."""
        return self.sta_blocks(transformer)

    def sequence_seams(self, transformer: nn.Module) -> SequenceSeams:
        """Where the video sequence is split and gathered under ``parallel.sp``."""
        raise NotImplementedError

    def conditioning(
        self,
        transformer: nn.Module,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None,
        guidance_scale: float,
    ) -> dict[str, Any]:
        """The transformer's keyword arguments for the text (B, L, Dt) in the model's dtype,
        its bool mask (B, L) and the pooled text (B, Dp), as the family's pipeline passes them."""
        raise NotImplementedError

    def reset_buffers(self, transformer: nn.Module, device: str | torch.device) -> None:
        """Recompute the non-persistent buffers (after ``to_empty`` from the meta device)."""

    def image_dims(self, config: Any, *, first_frame: bool = False) -> ImageDims | None:
        """What an image-conditioned transformer config takes, or None (text-to-video);
        ``first_frame`` asks for the mode that conditions on a clean first latent frame
        (``model.image_to_video``), which a family without it refuses."""
        if first_frame:
            raise ValueError(f"the {self.name} family has no first-frame image-to-video mode")
        return None

    def image_inputs(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        image: ImageCondition,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Fold an image condition into one transformer call, as the family's image-to-video
        pipeline does.

        Args:
            transformer: the diffusers transformer.
            latents: (B, C, T, H, W) noisy latents in the model's dtype.
            timestep: (B,) in [0, 1000].
            image: the condition (``ImageCondition``), in the model's dtype.
            kwargs: the text keyword arguments of ``conditioning``.
        Returns:
            (``hidden_states``, ``timestep``, keyword arguments) of the transformer call; a
            family whose pipeline replaces the first latent frame and gives each token its own
            timestep (Wan 2.2 TI2V, ``expand_timesteps``) returns a (B, S) timestep here.
        """
        raise ValueError(f"{type(transformer).__name__} ({self.name}) takes no image condition")

    def glyph_dim(self, config: Any) -> int | None:
        """Width of the glyph-text states (``condition["text_2"]``) a transformer config takes,
        or None for a model without a glyph stream."""
        return None

    def latent_channels(self, config: Any) -> int:
        """Channels of the latents the model denoises (its input may hold more, see
        ``model_inputs``): the input channels less an image condition's (``image_dims``)."""
        image = self.image_dims(config)
        return int(config_getter(config)("in_channels")) - (0 if image is None else image.condition_channels)

    def model_inputs(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        condition: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        """The transformer's ``hidden_states``, ``timestep`` and further keyword arguments for
        noisy ``latents`` (B, C, T, H, W) in the model's dtype, the float32 ``timestep`` (B,)
        and the family's optional ``condition`` tensors (image conditioning, extra text
        streams; see the family)."""
        if condition:
            raise ValueError(
                f"the {self.name} family takes no condition tensors, got {sorted(condition)}"
            )
        return {"hidden_states": latents, "timestep": timestep}

    def lora_saver(self) -> type:
        """The diffusers class whose ``save_lora_weights`` writes a LoRA adapter in the format
        the family's pipeline loads (keys ``transformer.<module>``): the pipeline class."""
        return self.pipeline_class()

    def joint_text_mask(self, argument: Callable[[str], Any]) -> torch.Tensor | None:
        """(B, L) mask of the text slots after the video in the joint attention sequence,
        valid ones first, from a transformer call's arguments (``argument(name)``)."""
        return argument("encoder_attention_mask")


def first_frame_inputs(
    patch: tuple[int, int, int],
    latents: torch.Tensor,
    timestep: torch.Tensor,
    first: torch.Tensor,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """One call of a first-frame image-to-video model, as diffusers' WanImageToVideoPipeline
    with ``expand_timesteps`` (Wan 2.2 TI2V) builds it: the first latent frame of ``latents``
    (B, C, T, H, W) is the clean condition ``first`` (B, C, 1, H, W), and the (B,) ``timestep``
    becomes one per token (B, S), 0 on the first frame's tokens."""
    pt, ph, pw = patch
    batch, channels, frames, height, width = latents.shape
    if pt != 1:
        raise ValueError(f"first-frame conditioning needs a temporal patch of 1, got {patch}")
    expected = (batch, channels, 1, height, width)
    if first.shape != expected:
        raise ValueError(
            f"the first-frame condition must be (B, C, 1, H, W) = {expected}, "
            f"got {tuple(first.shape)}"
        )
    hidden = torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)  # (B, C, T, H, W)
    per_frame = timestep[:, None].expand(batch, frames).clone()  # (B, T)
    per_frame[:, 0] = 0.0
    tokens = (height // ph) * (width // pw)
    per_token = per_frame[:, :, None].expand(batch, frames, tokens).reshape(batch, -1)  # (B, S)
    return hidden, per_token, kwargs


class WanFamily(ModelFamily):
    """Wan 2.1 (diffusers ``WanTransformer3DModel``): video self-attention ``blocks[i].attn1``
    is STA, text cross-attention ``attn2`` stays dense; text does not join the sequence."""

    name = "wan"
    joint_text = False

    def transformer_class(self) -> type[nn.Module]:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def pipeline_class(self) -> type:
        from diffusers import WanPipeline

        return WanPipeline

    def patch_size(self, config: Any) -> tuple[int, int, int]:
        return tuple(int(p) for p in config_getter(config)("patch_size"))  # type: ignore[return-value]

    def text_dims(self, config: Any) -> tuple[int, int | None]:
        return int(config_getter(config)("text_dim")), None

    def sta_layers(self, transformer: nn.Module) -> list[nn.Module]:
        return [block.attn1 for block in transformer.blocks]

    def sta_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return list(transformer.blocks)

    def sequence_seams(self, transformer: nn.Module) -> SequenceSeams:
        # rope: (1, S, 1, D) cos and sin tables; timestep: (B,), or (B, S) in TI2V's mode
        return SequenceSeams(transformer.rope, 1, transformer.blocks[0], transformer.proj_out,
                             token_timestep="timestep")  # fmt: skip

    def conditioning(
        self,
        transformer: nn.Module,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None,
        guidance_scale: float,
    ) -> dict[str, Any]:
        # padded text embeddings are zeroed, as diffusers' Wan pipeline does
        return {"encoder_hidden_states": text * text_mask[..., None].to(text.dtype)}

    def image_dims(self, config: Any, *, first_frame: bool = False) -> ImageDims | None:
        get = config_getter(config)
        extra = int(get("in_channels")) - int(get("out_channels"))
        if first_frame:  # Wan 2.2 TI2V: the text-to-video weights, no extra inputs
            if extra != 0 or get("image_dim") is not None:
                raise ValueError(
                    "the first-frame image-to-video mode (model.image_to_video) needs a Wan "
                    f"transformer taking its latents alone, got in_channels={get('in_channels')}, "
                    f"out_channels={get('out_channels')}, image_dim={get('image_dim')}"
                )
            return ImageDims(0, None, first_frame=True)
        if extra == 0:
            return None
        image_dim = get("image_dim")
        return ImageDims(extra, None if image_dim is None else int(image_dim))

    def image_inputs(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        image: ImageCondition,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if image.first_frame:
            return first_frame_inputs(self.patch_size(transformer.config), latents, timestep,
                                      image.latents, kwargs)  # fmt: skip
        # WanImageToVideoPipeline: [noisy latents, mask, condition latents] on channels; the
        # mask is 1 on the first latent frame (the given image), 0 after
        dims = self.image_dims(transformer.config)
        if dims is None:
            raise ValueError(f"this {type(transformer).__name__} takes no image condition")
        cond = image.latents.to(latents.dtype)  # (B, C, T, H, W)
        mask_channels = dims.condition_channels - cond.shape[1]
        if (
            mask_channels < 0
            or cond.shape[0] != latents.shape[0]
            or cond.shape[2:] != latents.shape[2:]
        ):
            raise ValueError(
                f"image latents must have the noisy latents' batch and (T, H, W) "
                f"{tuple(latents.shape)} and at most {dims.condition_channels} channels, got "
                f"{tuple(cond.shape)}"
            )
        batch, _, frames, height, width = cond.shape
        mask = cond.new_zeros(batch, mask_channels, frames, height, width)
        mask[:, :, 0] = 1.0
        hidden = torch.cat([latents, mask, cond], dim=1)  # (B, C + M + C, T, H, W)
        if dims.embed_dim is None:
            return hidden, timestep, kwargs
        if image.embeds is None or image.embeds.shape[-1] != dims.embed_dim:
            got = None if image.embeds is None else tuple(image.embeds.shape)
            raise ValueError(f"image embeds must be (B, N, {dims.embed_dim}), got {got}")
        # diffusers' cross-attention takes the image tokens as all but the last 512 (the
        # text encoder's length), so the text is zero-padded to 512 as the pipeline does
        text = kwargs["encoder_hidden_states"]  # (B, L, Dt)
        if text.shape[1] > WAN_TEXT_TOKENS:
            raise ValueError(
                f"Wan image-to-video takes at most {WAN_TEXT_TOKENS} text tokens, got {text.shape[1]}"
            )
        text = F.pad(text, (0, 0, 0, WAN_TEXT_TOKENS - text.shape[1]))
        embeds = image.embeds.to(latents.dtype)  # (B, N, Di)
        return hidden, timestep, {**kwargs, "encoder_hidden_states": text,
                                  "encoder_hidden_states_image": embeds}  # fmt: skip

    def reset_buffers(self, transformer: nn.Module, device: str | torch.device) -> None:
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        cfg = transformer.config
        with torch.device(device):  # the RoPE tables are not in the state dict
            transformer.rope = WanRotaryPosEmbed(
                int(cfg.attention_head_dim), tuple(cfg.patch_size), int(cfg.rope_max_seq_len)
            )


class HunyuanFamily(ModelFamily):
    """HunyuanVideo (diffusers ``HunyuanVideoTransformer3DModel``): joint video + text attention
    in ``transformer_blocks[i].attn`` then ``single_transformer_blocks[i].attn``; the text
    token refiner stays dense."""

    name = "hunyuan"
    joint_text = True

    def transformer_class(self) -> type[nn.Module]:
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel

    def pipeline_class(self) -> type:
        from diffusers import HunyuanVideoPipeline

        return HunyuanVideoPipeline

    def patch_size(self, config: Any) -> tuple[int, int, int]:
        get = config_getter(config)
        return (int(get("patch_size_t")), int(get("patch_size")), int(get("patch_size")))

    def text_dims(self, config: Any) -> tuple[int, int | None]:
        get = config_getter(config)
        return int(get("text_embed_dim")), int(get("pooled_projection_dim"))

    def sta_layers(self, transformer: nn.Module) -> list[nn.Module]:
        return [b.attn for b in transformer.transformer_blocks] + [
            b.attn for b in transformer.single_transformer_blocks
        ]

    def sta_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        refiner = getattr(getattr(transformer, "context_embedder", None), "token_refiner", None)
        return [*getattr(refiner, "refiner_blocks", []), *self.sta_blocks(transformer)]

    def sequence_seams(self, transformer: nn.Module) -> SequenceSeams:
        # rope: (S, D) cos and sin tables
        return SequenceSeams(
            transformer.rope, 0, transformer.transformer_blocks[0], transformer.proj_out
        )

    def conditioning(
        self,
        transformer: nn.Module,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None,
        guidance_scale: float,
    ) -> dict[str, Any]:
        batch, dtype = text.shape[0], text.dtype
        pooled_dim = int(transformer.config.pooled_projection_dim)
        if pooled_text is None or pooled_text.shape != (batch, pooled_dim):
            got = None if pooled_text is None else tuple(pooled_text.shape)
            raise ValueError(
                f"pooled_text must be (B={batch}, {pooled_dim}) for HunyuanVideo, got {got}"
            )
        guidance = None
        if transformer.config.guidance_embeds:  # guidance distilled into the model
            guidance = torch.full(
                (batch,), guidance_scale * 1000.0, device=text.device, dtype=dtype
            )
        return {
            "encoder_hidden_states": text,
            "encoder_attention_mask": text_mask,
            "pooled_projections": pooled_text.to(dtype),
            "guidance": guidance,
        }


class HunyuanVideo15Family(HunyuanFamily):
    """HunyuanVideo 1.5 (diffusers ``HunyuanVideo15Transformer3DModel``): joint video + text
    attention in ``transformer_blocks[i].attn`` (HunyuanVideo's dual-stream blocks only, with
    its patch, RoPE and sequence seams); the token refiner stays dense.

    The model joins three conditioning streams after the video, valid tokens first:
    [valid image, valid ByT5 glyph text, valid Qwen2.5-VL text, then the padding of each]. Its
    input is ``[noisy latents, condition latents, condition mask]`` on the channel axis, so it
    denoises ``out_channels`` latent channels.

    - Image-to-video (a config with ``task_type`` "i2v", ``image_dims``): ``image_inputs``
      builds the condition as ``HunyuanVideo15ImageToVideoPipeline`` does, the image's latent
      on the first latent frame, zeros after, a mask of 1 on that frame, and the SigLIP
      states as ``image_embeds``.
    - Text-to-video: zero condition latents and mask, and an empty image stream (diffusers'
      pipeline passes 729 all-zero image states, which take no valid slot either).
    - ``model_inputs``' ``condition`` holds the glyph stream only: ``text_2`` (B, L2, D2)
      with ``text_2_mask`` (B, L2) bool, ByT5 states of the caption's quoted text.

    Absent streams take no sequence slots (an empty image and glyph stream), which changes no
    valid token's output: padding slots are never attended.
    """

    name = "hunyuanvideo15"
    joint_text = True
    flavor_keys = ("task_type",)
    CONDITION_KEYS = ("text_2", "text_2_mask")

    def transformer_class(self) -> type[nn.Module]:
        from diffusers import HunyuanVideo15Transformer3DModel

        return HunyuanVideo15Transformer3DModel

    def pipeline_class(self) -> type:
        from diffusers import HunyuanVideo15Pipeline

        return HunyuanVideo15Pipeline

    def text_dims(self, config: Any) -> tuple[int, int | None]:
        return int(config_getter(config)("text_embed_dim")), None  # pooled: the refiner's masked mean

    def lora_saver(self) -> type:
        # diffusers 0.42 has no LoRA loader for HunyuanVideo15Pipeline: write HunyuanVideo's
        # format, which ``pipe.transformer.load_lora_adapter(path, prefix="transformer",
        # use_safetensors=True)`` loads
        from diffusers.loaders import HunyuanVideoLoraLoaderMixin

        return HunyuanVideoLoraLoaderMixin

    def latent_channels(self, config: Any) -> int:
        return int(config_getter(config)("out_channels"))

    def glyph_dim(self, config: Any) -> int | None:
        return int(config_getter(config)("text_embed_2_dim"))  # ByT5's width

    def sta_layers(self, transformer: nn.Module) -> list[nn.Module]:
        return [b.attn for b in transformer.transformer_blocks]

    def sta_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        return list(transformer.transformer_blocks)

    def conditioning(
        self,
        transformer: nn.Module,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None,
        guidance_scale: float,
    ) -> dict[str, Any]:
        # no pooled text and no embedded guidance: the refiner pools the text itself; the
        # image stream is empty until ``image_inputs`` fills it (text-to-video)
        width = int(transformer.config.image_embed_dim)
        embeds = text.new_zeros(text.shape[0], 0, width)  # (B, 0, De)
        return {"encoder_hidden_states": text, "encoder_attention_mask": text_mask,
                "image_embeds": embeds}  # fmt: skip

    def image_dims(self, config: Any, *, first_frame: bool = False) -> ImageDims | None:
        # the i2v and t2v transformers share one architecture: the config's task_type, which
        # the transformer itself never reads, tells them apart
        get = config_getter(config)
        if first_frame:
            return super().image_dims(config, first_frame=True)
        if get("task_type") != "i2v":
            return None
        channels = int(get("in_channels")) - int(get("out_channels"))  # condition latents + mask
        return ImageDims(channels, int(get("image_embed_dim")))

    def image_inputs(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        image: ImageCondition,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        # HunyuanVideo15ImageToVideoPipeline: [noisy latents, condition latents, mask] on
        # channels; the condition is the image's latent on the first latent frame, zeros after
        # (the data's condition video through a causal VAE: its first latent frame is the
        # image's alone), and the mask is 1 on that frame
        dims = self.image_dims(transformer.config)
        if dims is None:
            raise ValueError(
                f"this {type(transformer).__name__} (task_type="
                f"{transformer.config.task_type!r}) takes no image condition"
            )
        batch, _, frames, height, width = latents.shape
        if image.latents.shape != latents.shape:
            raise ValueError(
                f"image latents must be (B, C, T, H, W) like the noisy latents "
                f"{tuple(latents.shape)}, got {tuple(image.latents.shape)}"
            )
        if image.embeds is None or image.embeds.shape[-1] != dims.embed_dim:
            got = None if image.embeds is None else tuple(image.embeds.shape)
            raise ValueError(f"image embeds must be (B, N, {dims.embed_dim}), got {got}")
        cond = torch.zeros_like(latents)  # (B, C, T, H, W)
        cond[:, :, 0] = image.latents[:, :, 0].to(latents.dtype)
        mask = latents.new_zeros(batch, 1, frames, height, width)
        mask[:, :, 0] = 1.0
        hidden = torch.cat([latents, cond, mask], dim=1)  # (B, 2C + 1, T, H, W)
        return hidden, timestep, {**kwargs, "image_embeds": image.embeds.to(latents.dtype)}

    def model_inputs(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        condition: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        condition = dict(condition or {})
        unknown = sorted(set(condition) - set(self.CONDITION_KEYS))
        if unknown:
            raise ValueError(
                f"unknown HunyuanVideo 1.5 condition tensors {unknown} (known: "
                f"{', '.join(self.CONDITION_KEYS)}; the image condition goes through "
                "image_latents= and image_embeds=)"
            )
        if ("text_2" in condition) != ("text_2_mask" in condition):
            raise ValueError("condition needs text_2 and text_2_mask together")
        cfg = transformer.config
        batch, dtype, device = latents.shape[0], latents.dtype, latents.device
        hidden = latents  # (B, 2C+1, T, H, W) from image_inputs
        if latents.shape[1] == int(cfg.out_channels):  # text-to-video: zero condition and mask
            extra = int(cfg.in_channels) - latents.shape[1]
            hidden = torch.cat([latents, latents.new_zeros(batch, extra, *latents.shape[2:])], 1)
        if hidden.shape[1] != int(cfg.in_channels):
            raise ValueError(
                f"latents with {latents.shape[1]} channels make {hidden.shape[1]} input "
                f"channels, but the transformer takes {cfg.in_channels}"
            )
        text_2 = condition.get(
            "text_2", torch.zeros(batch, 0, int(cfg.text_embed_2_dim), device=device)
        )  # (B, L2, D2)
        mask_2 = condition.get(
            "text_2_mask", torch.ones(text_2.shape[:2], dtype=torch.bool, device=device)
        )  # (B, L2)
        # diffusers' time embedding takes the timestep in the weights' dtype, as its pipeline
        # passes it; under autocast it stays float32, so that a bf16 teacher and an fp32
        # student see the same noise level (bf16 rounds 813 to 812)
        if not torch.is_autocast_enabled(device.type):
            timestep = timestep.to(dtype)
        return {
            "hidden_states": hidden,
            "timestep": timestep,
            "encoder_hidden_states_2": text_2.to(dtype),
            "encoder_attention_mask_2": mask_2,
        }

    def joint_text_mask(self, argument: Callable[[str], Any]) -> torch.Tensor | None:
        # the transformer orders the streams valid tokens first: only their counts matter
        mask = argument("encoder_attention_mask")
        if mask is None:
            return None
        text = (mask != 0).sum(dim=1)  # (B,)
        mask_2, embeds = argument("encoder_attention_mask_2"), argument("image_embeds")
        glyph = 0 if mask_2 is None else (mask_2 != 0).sum(dim=1).to(text.device)
        # image tokens count unless every embedding is 0, as the transformer decides
        image = 0 if embeds is None or bool(torch.all(embeds == 0)) else embeds.shape[1]
        slots = mask.shape[1] + sum(0 if x is None else x.shape[1] for x in (mask_2, embeds))
        # a sample without valid text keeps length 0, which ``text_lengths`` reports
        lengths = torch.where(text > 0, text + glyph + image, 0)
        return torch.arange(slots, device=mask.device)[None, :] < lengths[:, None]  # (B, slots)


FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (WanFamily(), HunyuanFamily(), HunyuanVideo15Family())
}


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of(transformer: nn.Module) -> ModelFamily:
    """The family of a diffusers transformer; ``TypeError`` for any other model."""
    for family in FAMILIES.values():
        if isinstance(transformer, family.transformer_class()):
            return family
    names = " and ".join(f.transformer_class().__name__ for f in FAMILIES.values())
    raise TypeError(f"STA supports diffusers' {names}, got {type(transformer).__name__}")
