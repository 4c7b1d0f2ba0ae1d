"""The real encoders, loaded from local diffusers / transformers folders (never the hub).

* Wan 2.1: ``AutoencoderKLWan`` (latents normalised per channel with the VAE config's
  ``latents_mean`` / ``latents_std``, as the diffusers Wan pipelines do) and the UMT5 encoder
  (``last_hidden_state``, zeroed past each caption's tokens, ``text_len`` = 512 in Wan).
* HunyuanVideo: ``AutoencoderKLHunyuanVideo`` (latents times ``scaling_factor``), the Llama
  text encoder (the prompt template of the diffusers pipeline, hidden state of the third-last
  layer, template tokens cropped) and CLIP's ``pooler_output`` as ``pooled``.
* HunyuanVideo 1.5: ``AutoencoderKLHunyuanVideo15`` (32 channels, 16x spatial, latents times
  ``scaling_factor``), the Qwen2.5-VL text model (the chat template of the diffusers pipeline,
  hidden state of the third-last layer, template tokens cropped) and the ByT5 glyph encoder
  over the caption's quoted text (``text_2``), as ``HunyuanVideo15Pipeline.encode_prompt``;
  its image-to-video SigLIP image encoder (``SiglipImageEncoder``).

Pooled text for models without a pooled embedding (Wan) is the masked mean of the token states.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from stafinetune.safety import weights_loading_kwargs

# The HunyuanVideo prompt template (as in diffusers' HunyuanVideoPipeline); the caption goes at {}.
HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)


def _local_dir(path: str | None, field: str) -> str:
    if not path or not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"{field}: {path!r} is not a local folder (no hub downloads)")
    return str(Path(path).expanduser())


def _safe(path: str, field: str, allow_pickle: bool) -> dict[str, bool]:
    return weights_loading_kwargs(
        path, field, allow_pickle=allow_pickle, consent="data.allow_pickle_weights"
    )


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, L, D)``, ``(B, L)`` -> ``(B, D)``; zeros for an empty mask."""
    m = mask.to(states.dtype)[..., None]
    return (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class DiffusersVideoVAE:
    """Wan 2.1, Wan 2.2 (``wan2.2``: TI2V-5B's 48-channel, 16x spatial VAE, the same diffusers
    class), HunyuanVideo or HunyuanVideo 1.5 (``hunyuanvideo15``: 32 channels, 16x spatial) VAE
    from a local diffusers folder, with each model's latent normalisation, so cached latents
    are exactly what the transformer is trained on."""

    def __init__(
        self,
        kind: str,
        path: str | None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        sample: bool = False,
        seed: int = 0,
        allow_pickle: bool = False,
    ) -> None:
        from diffusers import (
            AutoencoderKLHunyuanVideo,
            AutoencoderKLHunyuanVideo15,
            AutoencoderKLWan,
        )

        self.kind = kind
        self.path = _local_dir(path, "data.video_encoder_path")
        cls = {"wan": AutoencoderKLWan, "wan2.2": AutoencoderKLWan,
               "hunyuan": AutoencoderKLHunyuanVideo,
               "hunyuanvideo15": AutoencoderKLHunyuanVideo15}[kind]  # fmt: skip
        safe = _safe(self.path, "data.video_encoder_path", allow_pickle)
        self.vae = cls.from_pretrained(self.path, torch_dtype=dtype, **safe).to(device).eval()
        self.vae.requires_grad_(False)
        self.device, self.dtype, self.sample = device, dtype, sample
        self.generator = torch.Generator(device=device).manual_seed(seed)
        config = self.vae.config
        if kind in ("wan", "wan2.2"):
            self.latent_channels = int(config.z_dim)
            self.temporal_compression = int(getattr(config, "scale_factor_temporal", 4))
            self.spatial_compression = int(getattr(config, "scale_factor_spatial", 8))
            if self.spatial_compression != (16 if kind == "wan2.2" else 8):
                raise ValueError(
                    f"data.video_encoder_path={self.path} holds a VAE compressing space "
                    f"{self.spatial_compression}x: use data.video_encoder="
                    f"{'wan2.2' if self.spatial_compression == 16 else 'wan'} for it"
                )
            shape = (1, self.latent_channels, 1, 1, 1)
            self.mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(shape)
            self.std = torch.tensor(config.latents_std, dtype=torch.float32).view(shape)
        else:  # both HunyuanVideo VAEs: latents times scaling_factor, as their pipelines
            self.latent_channels = int(config.latent_channels)
            self.temporal_compression = int(config.temporal_compression_ratio)
            self.spatial_compression = int(config.spatial_compression_ratio)
            expected = 16 if kind == "hunyuanvideo15" else 8
            if self.spatial_compression != expected:
                raise ValueError(
                    f"data.video_encoder_path={self.path} holds a VAE compressing space "
                    f"{self.spatial_compression}x, but data.video_encoder={kind} latents are "
                    f"{expected}x: the latent grid would not match the model's canvas"
                )
            if kind == "hunyuanvideo15":
                # spatial tiles above 256 pixels, as the diffusers pipeline's examples: its
                # untiled mid-block attention over a whole 720p clip would not fit in memory
                self.vae.enable_tiling()
            self.mean = torch.zeros(())
            self.std = torch.tensor(1.0 / float(config.scaling_factor))

    def fingerprint(self) -> str:
        return f"{self.kind}-vae:{self.path}:{self.dtype}:{'sample' if self.sample else 'mode'}"

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        # diffusers 0.42's HunyuanVideo 1.5 VAE attention mask broadcasts only for a batch of 1
        return list(x.split(1)) if self.kind == "hunyuanvideo15" else [x]

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1] -> normalised latents ``(B, C, T, h, w)`` float32."""
        z = []
        for part in self._split(video.to(self.device, self.dtype)):
            dist = self.vae.encode(part).latent_dist
            z.append(dist.sample(generator=self.generator) if self.sample else dist.mode())
        z = torch.cat(z).float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, T, h, w)`` -> video ``(B, 3, F, H, W)`` float32."""
        z = latents.float().to(self.device) * self.std.to(self.device) + self.mean.to(self.device)
        parts = self._split(z.to(self.dtype))
        return torch.cat([self.vae.decode(part).sample.float() for part in parts])


class _VisionEncoder:
    """A transformers vision model and its image processor from local folders
    (``data.image_encoder_path``, ``data.image_processor_path``; safetensors unless
    ``data.allow_pickle_weights``); subclasses pick the states."""

    name = ""

    def __init__(
        self,
        model_class: type,
        processor_class: type,
        path: str | None,
        processor_path: str | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
    ) -> None:
        self.path = _local_dir(path, "data.image_encoder_path")
        self.processor_path = _local_dir(processor_path or path, "data.image_processor_path")
        safe = _safe(self.path, "data.image_encoder_path", allow_pickle)
        self.model = model_class.from_pretrained(self.path, torch_dtype=dtype, **safe)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.processor = processor_class.from_pretrained(self.processor_path)
        config = self.model.config
        self.image_dim = int(config.hidden_size)
        self.patches = (int(config.image_size) // int(config.patch_size)) ** 2
        self.device, self.dtype = device, dtype

    def fingerprint(self) -> str:
        return f"{self.name}-image:{self.path}:{self.processor_path}:{self.dtype}"

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> the processor's pixel values, as from 8-bit images."""
        pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = [p.permute(1, 2, 0).cpu().numpy() for p in pixels]  # (H, W, 3) each
        inputs = self.processor(images=images, return_tensors="pt")
        return inputs["pixel_values"].to(self.device, self.dtype)


class CLIPImageEncoder(_VisionEncoder):
    """Wan 2.1 I2V's image encoder from local transformers folders: a ``CLIPVisionModel`` and
    its ``CLIPImageProcessor``; the states of the second-last layer, ``(B, 257, 1280)`` for
    ViT-H/14, as ``WanImageToVideoPipeline.encode_image`` takes them."""

    name = "clip"

    def __init__(self, path: str | None, processor_path: str | None = None, **kwargs: Any) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        super().__init__(CLIPVisionModel, CLIPImageProcessor, path, processor_path, **kwargs)
        self.image_tokens = self.patches + 1  # and the class token

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, N, Di)`` float32."""
        out = self.model(pixel_values=self.pixel_values(frames), output_hidden_states=True)
        return out.hidden_states[-2].float()


class SiglipImageEncoder(_VisionEncoder):
    """HunyuanVideo 1.5 I2V's image encoder from local transformers folders: a
    ``SiglipVisionModel`` and its ``SiglipImageProcessor``; the last hidden states,
    ``(B, 729, 1152)`` for so400m-patch14-384, as
    ``HunyuanVideo15ImageToVideoPipeline.encode_image`` takes them."""

    name = "siglip"

    def __init__(self, path: str | None, processor_path: str | None = None, **kwargs: Any) -> None:
        from transformers import SiglipImageProcessor, SiglipVisionModel

        super().__init__(SiglipVisionModel, SiglipImageProcessor, path, processor_path, **kwargs)
        self.image_tokens = self.patches

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, N, Di)`` float32."""
        return self.model(pixel_values=self.pixel_values(frames)).last_hidden_state.float()


def _clean(caption: str) -> str:
    return re.sub(r"\s+", " ", caption).strip()


class UMT5TextEncoder:
    """Wan's UMT5-XXL encoder from a local transformers folder: ``(B, L, 4096)``."""

    def __init__(
        self,
        path: str | None,
        tokenizer_path: str | None = None,
        *,
        text_len: int = 512,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
    ) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.path = _local_dir(path, "data.text_encoder_path")
        tok = _local_dir(tokenizer_path or path, "data.tokenizer_path")
        self.tokenizer = AutoTokenizer.from_pretrained(tok)
        self.model = (
            UMT5EncoderModel.from_pretrained(
                self.path, torch_dtype=dtype, **_safe(self.path, "data.text_encoder_path", allow_pickle)
            )
            .to(device)
            .eval()
        )
        self.model.requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.text_len = text_len
        self.text_dim = self.pooled_dim = int(self.model.config.d_model)

    def fingerprint(self) -> str:
        return f"umt5:{self.path}:{self.dtype}:{self.text_len}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions -> ``text (B, L, D)`` (zeros past each caption), ``mask (B, L)``, ``pooled (B, D)``."""
        tokens = self.tokenizer(
            [_clean(c) for c in captions],
            padding="max_length",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.bool()  # (B, L)
        states = self.model(
            tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        ).last_hidden_state.float()  # (B, L, D)
        mask = mask.to(states.device)
        states = states * mask[..., None]
        return states, mask, _masked_mean(states, mask)


def _two_encoders(
    path: str | None, path_2: str | None, tokenizer_path: str | None, tokenizer_2_path: str | None
) -> tuple[str, str, Any, Any]:
    """The checked folders ``data.text_encoder_path`` and ``data.text_encoder_2_path`` and
    their tokenizers (from ``data.tokenizer_path`` / ``data.tokenizer_2_path`` when set)."""
    from transformers import AutoTokenizer

    folder = _local_dir(path, "data.text_encoder_path")
    folder_2 = _local_dir(path_2, "data.text_encoder_2_path")
    tokenizer = AutoTokenizer.from_pretrained(
        _local_dir(tokenizer_path or path, "data.tokenizer_path")
    )
    tokenizer_2 = AutoTokenizer.from_pretrained(
        _local_dir(tokenizer_2_path or path_2, "data.tokenizer_2_path")
    )
    return folder, folder_2, tokenizer, tokenizer_2


class HunyuanTextEncoder:
    """HunyuanVideo's two text encoders from local folders.

    ``text``: the Llama hidden state of the third-last layer over the templated prompt, template
    tokens cropped, ``text_len`` tokens (256 in HunyuanVideo). ``pooled``: CLIP-L's
    ``pooler_output`` over 77 tokens.
    """

    def __init__(
        self,
        path: str | None,
        path_2: str | None,
        tokenizer_path: str | None = None,
        tokenizer_2_path: str | None = None,
        *,
        text_len: int = 256,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        layers_to_skip: int = 2,
        allow_pickle: bool = False,
    ) -> None:
        from transformers import CLIPTextModel, LlamaModel

        self.path, self.path_2, self.tokenizer, self.tokenizer_2 = _two_encoders(
            path, path_2, tokenizer_path, tokenizer_2_path
        )
        safe = _safe(self.path, "data.text_encoder_path", allow_pickle)
        safe_2 = _safe(self.path_2, "data.text_encoder_2_path", allow_pickle)
        self.llama = LlamaModel.from_pretrained(self.path, torch_dtype=dtype, **safe).to(device).eval()
        self.clip = (
            CLIPTextModel.from_pretrained(self.path_2, torch_dtype=dtype, **safe_2).to(device).eval()
        )
        self.llama.requires_grad_(False)
        self.clip.requires_grad_(False)
        self.device, self.dtype, self.layers_to_skip = device, dtype, layers_to_skip
        self.text_len = text_len
        self.text_dim = int(self.llama.config.hidden_size)
        self.pooled_dim = int(self.clip.config.hidden_size)
        # Tokens before the caption (BOS + system prompt + user header) are cropped away.
        # diffusers hard-codes 95 for the official tokenizer; counting them keeps the crop right
        # for any tokenizer (not checked against the official one here: no weights offline).
        prefix = HUNYUAN_TEMPLATE.split("{}")[0]
        self.crop_start = len(self.tokenizer(prefix, add_special_tokens=True).input_ids)

    def fingerprint(self) -> str:
        return f"hunyuan-text:{self.path}:{self.path_2}:{self.dtype}:{self.text_len}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions -> ``text (B, L, D)``, ``mask (B, L)``, ``pooled (B, Dp)`` (CLIP)."""
        tokens = self.tokenizer(
            [HUNYUAN_TEMPLATE.format(_clean(c)) for c in captions],
            padding="max_length",
            max_length=self.text_len + self.crop_start,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        out = self.llama(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
            output_hidden_states=True,
        )
        states = out.hidden_states[-(self.layers_to_skip + 1)][:, self.crop_start :].float()
        mask = tokens.attention_mask[:, self.crop_start :].bool().to(states.device)  # (B, L)
        states = states * mask[..., None]
        clip_tokens = self.tokenizer_2(
            [_clean(c) for c in captions], padding="max_length", max_length=77, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        pooled = self.clip(clip_tokens.input_ids.to(self.device)).pooler_output.float()
        return states, mask, pooled


# HunyuanVideo15Pipeline's system message; its literal's line continuations keep the source
# indentation (8 spaces) before each numbered aspect
HUNYUANVIDEO15_SYSTEM = (" " * 8).join([
    "You are a helpful assistant. Describe the video by detailing the following aspects: ",
    "1. The main content and theme of the video. ",
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects. ",
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the "
    "objects. ",
    "4. background environment, light, style and atmosphere. ",
    "5. camera angles, movements, and transitions used in the video.",
])  # fmt: skip


def _chat(captions: list[str]) -> list[list[dict[str, str]]]:
    """The pipeline's chat conversations: the system message, then each caption (" " if empty)."""
    return [[{"role": "system", "content": HUNYUANVIDEO15_SYSTEM},
             {"role": "user", "content": c if c else " "}] for c in captions]  # fmt: skip


class HunyuanVideo15TextEncoder:
    """HunyuanVideo 1.5's two text encoders from local folders, as
    ``HunyuanVideo15Pipeline.encode_prompt`` computes them.

    ``text``: the Qwen2.5-VL text model's hidden state of the third-last layer over the chat
    template (system message, caption, assistant prompt), template tokens before the caption
    cropped, ``text_len`` tokens (1000 in the pipeline); ``pooled``: the masked mean of ``text``
    (the transformer pools the text itself; the batch always carries one).
    ``encode_glyph``: ByT5's last hidden state over the caption's quoted text (``Text "..."``),
    ``text_2_len`` tokens (256 in the pipeline); a caption without quotes has no valid token.
    """

    def __init__(
        self,
        path: str | None,
        path_2: str | None,
        tokenizer_path: str | None = None,
        tokenizer_2_path: str | None = None,
        *,
        text_len: int = 1000,
        text_2_len: int = 256,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        layers_to_skip: int = 2,
        allow_pickle: bool = False,
    ) -> None:
        from transformers import Qwen2_5_VLTextModel, T5EncoderModel

        self.path, self.path_2, self.tokenizer, self.tokenizer_2 = _two_encoders(
            path, path_2, tokenizer_path, tokenizer_2_path
        )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"data.tokenizer_path: the tokenizer at {tokenizer_path or path} has no chat "
                "template (HunyuanVideo 1.5 encodes captions with Qwen2.5-VL's)"
            )
        # the pipeline crops the template from the left: the padding must follow the tokens
        self.tokenizer.padding_side = self.tokenizer_2.padding_side = "right"
        safe = _safe(self.path, "data.text_encoder_path", allow_pickle)
        safe_2 = _safe(self.path_2, "data.text_encoder_2_path", allow_pickle)
        self.qwen = Qwen2_5_VLTextModel.from_pretrained(self.path, torch_dtype=dtype, **safe)
        self.qwen = self.qwen.to(device).eval().requires_grad_(False)
        self.byt5 = T5EncoderModel.from_pretrained(self.path_2, torch_dtype=dtype, **safe_2)
        self.byt5 = self.byt5.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.layers_to_skip = device, dtype, layers_to_skip
        self.text_len, self.text_2_len = text_len, text_2_len
        self.text_dim = self.pooled_dim = int(self.qwen.config.hidden_size)
        self.text_2_dim = int(self.byt5.config.d_model)
        # Tokens before the caption (system message + user header) are cropped away. diffusers
        # hard-codes 108 for the official tokenizer; counting them keeps the crop right for any
        # tokenizer (not checked against the official one here: no weights offline).
        marker = "\x00caption\x00"
        rendered = self.tokenizer.apply_chat_template(
            _chat([marker])[0], add_generation_prompt=True, tokenize=False
        )
        prefix = rendered.split(marker)[0]
        self.crop_start = len(self.tokenizer(prefix, add_special_tokens=False).input_ids)

    def fingerprint(self) -> str:
        return (
            f"hunyuanvideo15-text:{self.path}:{self.path_2}:{self.dtype}:{self.text_len}:"
            f"{self.text_2_len}"
        )

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions -> ``text (B, L, D)`` (zeros past each caption), ``mask (B, L)``,
        ``pooled (B, D)`` (the masked mean)."""
        tokens = self.tokenizer.apply_chat_template(
            _chat([_clean(c) for c in captions]),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding="max_length",
            max_length=self.text_len + self.crop_start,
            truncation=True,
            return_tensors="pt",
        )
        out = self.qwen(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        states = out.hidden_states[-(self.layers_to_skip + 1)][:, self.crop_start :].float()
        mask = tokens["attention_mask"][:, self.crop_start :].bool().to(states.device)  # (B, L)
        states = states * mask[..., None]
        return states, mask, _masked_mean(states, mask)

    @torch.no_grad()
    def encode_glyph(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``text_2 (B, L2, D2)`` (zeros past the glyph tokens), ``text_2_mask
        (B, L2)``: ByT5 over ``Text "<quoted>". ...`` of each caption's quoted strings."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import (
            extract_glyph_texts,
        )

        glyphs = [extract_glyph_texts(_clean(c)) for c in captions]
        states = torch.zeros(len(captions), self.text_2_len, self.text_2_dim)
        mask = torch.zeros(len(captions), self.text_2_len, dtype=torch.bool)
        rows = [i for i, g in enumerate(glyphs) if g is not None]
        if rows:  # one batch over the captions with quoted text; the others stay empty
            tokens = self.tokenizer_2(
                [glyphs[i] for i in rows], padding="max_length", max_length=self.text_2_len,
                truncation=True, add_special_tokens=True, return_tensors="pt",
            )  # fmt: skip
            out = self.byt5(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.float().to(self.device),
            ).last_hidden_state.float().cpu()  # (b, L2, D2)
            valid = tokens.attention_mask.bool()
            states[rows] = out * valid[..., None]
            mask[rows] = valid
        return states, mask
