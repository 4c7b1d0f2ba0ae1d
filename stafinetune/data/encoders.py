"""Video and text encoders: the embedded tiny ones and the real diffusers/transformers ones.

Video encoders: ``encode(video (B, 3, F, H, W) in [-1, 1]) -> latents (B, C, T, h, w)`` and
``decode(latents) -> video``. Text encoders: ``encode(list[str]) -> (text (B, L, Dt),
mask (B, L) bool, pooled (B, Dp))``; one with a glyph stream (HunyuanVideo 1.5) also
``encode_glyph(list[str]) -> (text_2 (B, L2, D2), text_2_mask (B, L2) bool)``. Both expose
``fingerprint()``, a string that changes whenever their output would, used to key the latent
cache.

The embedded default needs no download and is exactly reproducible:

* :class:`TinyVideoEncoder` compresses like Wan's VAE (4x causal in time: the first frame
  alone, then groups of 4; 8x in space; ``latent_channels`` channels). Each patch is projected
  onto a fixed orthonormal basis of its lowest-frequency 3-D DCT components in an opponent
  colour space (luma first), scaled by ``1 / sqrt(patch frames * 64)`` and normalised per
  channel with the fixed ``TINY_LATENT_MEAN`` / ``TINY_LATENT_STD`` tables; ``decode`` applies
  the pseudo-inverse. ``encode(decode(z)) == z`` and ``decode(encode(x))`` is the orthogonal
  projection of ``x`` onto that low-frequency subspace (a blocky low-pass copy of the video).
* :class:`TinyTextEncoder` lower-cases the caption, splits it into ``[a-z0-9]+`` words, maps
  each word to one of 4096 ids with a BLAKE2 hash, and looks the ids up in a fixed table drawn
  from ``numpy.random.default_rng(seed)`` plus a sinusoidal position code. Up to ``text_len``
  tokens; ``pooled`` is the mean of the valid token states times a fixed orthonormal
  ``(Dt, Dp)`` matrix (the identity when Dt == Dp).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Protocol

import numpy as np
import torch

from stafinetune.data.config import DataConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (the names ``data.*_dtype`` accept)."""
    return _DTYPES[name]


class VideoEncoder(Protocol):
    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


class ImageEncoder(Protocol):
    image_tokens: int
    image_dim: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor: ...

    def fingerprint(self) -> str: ...


class TextEncoder(Protocol):
    text_len: int
    text_dim: int
    pooled_dim: int

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def fingerprint(self) -> str: ...


class GlyphTextEncoder(TextEncoder, Protocol):
    """A text encoder with a second stream over the caption's quoted text (HunyuanVideo 1.5's
    ByT5 glyph states: the batch's ``text_2`` and ``text_2_mask``)."""

    text_2_len: int
    text_2_dim: int

    def encode_glyph(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def glyph_encoder(text_encoder: TextEncoder) -> GlyphTextEncoder | None:
    """``text_encoder`` when it has a glyph stream (``encode_glyph``), else None."""
    has_glyph = hasattr(text_encoder, "encode_glyph")
    return text_encoder if has_glyph else None  # type: ignore[return-value]


def glyph_condition(
    text_encoder: TextEncoder, captions: list[str]
) -> dict[str, torch.Tensor] | None:
    """The glyph stream of ``captions`` under the batch's keys, on the CPU: ``text_2``
    (B, L2, D2) float32 and ``text_2_mask`` (B, L2) bool; None for a text encoder without one."""
    glyph = glyph_encoder(text_encoder)
    if glyph is None:
        return None
    with torch.no_grad():
        text_2, mask_2 = glyph.encode_glyph(captions)
    return {"text_2": text_2.float().cpu(), "text_2_mask": mask_2.cpu()}


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis, rows are frequencies: ``(n, n)``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    basis = np.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis


_OPPONENT = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=np.float64) / np.array(
    [[math.sqrt(3)], [math.sqrt(2)], [math.sqrt(6)]]
)  # luma, two chroma axes


def low_frequency_basis(channels: int, frames: int, patch: int = 8) -> torch.Tensor:
    """``channels`` orthonormal basis vectors over a ``(3, frames, patch, patch)`` patch.

    Ordered by total DCT frequency, chroma penalised by 2, so the first ones are luma DC and
    luma gradients. Returns float64 ``(channels, 3, frames, patch, patch)``.
    """
    size = 3 * frames * patch * patch
    if channels > size:
        raise ValueError(f"data.latent_channels={channels} exceeds the patch size {size}")
    dt, ds = _dct_matrix(frames), _dct_matrix(patch)
    candidates = sorted(
        (kt + kh + kw + (2 if c else 0), c, kt, kh, kw)
        for c in range(3)
        for kt in range(frames)
        for kh in range(patch)
        for kw in range(patch)
    )[:channels]
    rows = [
        np.einsum("c,t,h,w->cthw", _OPPONENT[c], dt[kt], ds[kh], ds[kw])
        for _, c, kt, kh, kw in candidates
    ]
    return torch.from_numpy(np.stack(rows))


# Per-channel mean and standard deviation of the raw projection over the 64 default synthetic
# clips (like the latents_mean / latents_std tables of Wan's VAE), for up to 48 channels. The
# encoder normalises with them so every latent channel has unit scale: without it the
# high-frequency channels (std ~0.01) sit far below the flow-matching noise and a model
# never learns them, which shows as blocky noise in generated videos.
TINY_LATENT_MEAN = (
    -0.9998, 0.0001, 0.0007, -0.0001, 0.0002, 0.0001, -0.0169, -0.0134, 0.0, 0.0001, -0.0685,
    -0.054, 0.0, 0.0, 0.0, 0.0, 0.0001, 0.0, -0.0001, -0.0001, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.0, 0.0, 0.0001, 0.0, 0.0, -0.0001, 0.0002, 0.0001, 0.0, 0.0, 0.0, 0.0001, 0.0, 0.0,
    -0.0001, 0.0, 0.0, 0.0, 0.0001, 0.0, 0.0, 0.0,
)
TINY_LATENT_STD = (
    0.5686, 0.0754, 0.0776, 0.0806, 0.0302, 0.0287, 0.0869, 0.1145, 0.0349, 0.0264, 0.1505,
    0.2119, 0.0203, 0.0188, 0.0217, 0.0226, 0.0191, 0.019, 0.0187, 0.0223, 0.0209, 0.0105,
    0.0246, 0.0248, 0.0329, 0.0303, 0.0313, 0.0397, 0.0112, 0.0089, 0.0117, 0.0075, 0.014,
    0.01, 0.0106, 0.0107, 0.0104, 0.0152, 0.0149, 0.0142, 0.0113, 0.0117, 0.0084, 0.0088,
    0.0088, 0.0137, 0.0131, 0.0119,
)


class TinyVideoEncoder:
    """Download-free Wan-like video codec (see the module docstring): 4x/8x/8x to C channels."""

    temporal_compression = 4
    spatial_compression = 8

    def __init__(self, latent_channels: int = 16) -> None:
        if latent_channels > len(TINY_LATENT_STD):
            raise ValueError(
                f"data.latent_channels={latent_channels}: the tiny video encoder has "
                f"normalisation statistics for at most {len(TINY_LATENT_STD)} channels"
            )
        self.latent_channels = latent_channels
        self.mean = torch.tensor(TINY_LATENT_MEAN[:latent_channels]).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(TINY_LATENT_STD[:latent_channels]).view(1, -1, 1, 1, 1)
        self.first = low_frequency_basis(latent_channels, 1).float()  # (C, 3, 1, 8, 8)
        self.rest = low_frequency_basis(latent_channels, 4).float()  # (C, 3, 4, 8, 8)
        self.first_scale = 1.0 / math.sqrt(1 * 64)
        self.rest_scale = 1.0 / math.sqrt(4 * 64)

    def fingerprint(self) -> str:
        return f"tiny-dct-v2-c{self.latent_channels}"

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, 3, F, H, W)`` in [-1, 1], F = 1 + 4k, H and W multiples of 8 -> ``(B, C, 1 + k, H/8, W/8)``."""
        b, c, f, h, w = video.shape
        if c != 3 or (f - 1) % 4 or h % 8 or w % 8:
            raise ValueError(
                f"tiny video encoder needs (B, 3, 1+4k, 8m, 8n), got {tuple(video.shape)}"
            )
        x = video.float()
        first = x[:, :, :1].reshape(b, 3, 1, h // 8, 8, w // 8, 8)
        z0 = torch.einsum("bcthpwq,kctpq->bkhw", first, self.first)[:, :, None]  # (b, C, 1, h, w)
        rest = x[:, :, 1:].reshape(b, 3, (f - 1) // 4, 4, h // 8, 8, w // 8, 8)
        z1 = torch.einsum("bcnthpwq,kctpq->bknhw", rest, self.rest)  # (b, C, k, h, w)
        z = torch.cat([z0 * self.first_scale, z1 * self.rest_scale], dim=2)
        return (z - self.mean) / self.std  # unit scale per channel

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, h, w)`` -> ``(B, 3, 1 + 4 (T - 1), 8h, 8w)`` (not clamped)."""
        b, k, t, h, w = latents.shape
        if k != self.latent_channels:
            raise ValueError(f"expected {self.latent_channels} latent channels, got {k}")
        z = latents.float() * self.std + self.mean
        first = torch.einsum("bkhw,kctpq->bcthpwq", z[:, :, 0] / self.first_scale, self.first)
        first = first.reshape(b, 3, 1, h * 8, w * 8)
        rest = torch.einsum("bknhw,kctpq->bcnthpwq", z[:, :, 1:] / self.rest_scale, self.rest)
        rest = rest.reshape(b, 3, (t - 1) * 4, h * 8, w * 8)
        return torch.cat([first, rest], dim=2)  # (b, 3, f, H, W)


_WORD = re.compile(r"[a-z0-9]+")


def simple_tokenize(caption: str, vocab_size: int = 4096) -> list[int]:
    """Words ``[a-z0-9]+`` of the lower-cased caption, each hashed (BLAKE2) to an id."""
    return [
        int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
        % vocab_size
        for word in _WORD.findall(caption.lower())
    ]


class TinyTextEncoder:
    """Download-free text encoder (see the module docstring): ``(B, L, Dt)``, mask, ``(B, Dp)``."""

    vocab_size = 4096

    def __init__(self, text_len: int = 32, text_dim: int = 32, pooled_dim: int = 32, seed: int = 0):
        self.text_len, self.text_dim, self.pooled_dim, self.seed = (
            text_len,
            text_dim,
            pooled_dim,
            seed,
        )
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((self.vocab_size, text_dim)) / math.sqrt(text_dim)
        self.table = torch.from_numpy(table).float()  # (V, Dt)
        pos = np.arange(text_len)[:, None] / np.power(10000.0, np.arange(0, text_dim, 2) / text_dim)
        code = np.zeros((text_len, text_dim))
        code[:, 0::2] = np.sin(pos)
        code[:, 1::2] = np.cos(pos[:, : text_dim // 2])
        self.position = torch.from_numpy(0.1 * code).float()  # (L, Dt)
        if pooled_dim == text_dim:
            self.pool_proj = torch.eye(text_dim)
        else:
            q, _ = np.linalg.qr(
                rng.standard_normal((max(text_dim, pooled_dim), min(text_dim, pooled_dim)))
            )
            proj = q if text_dim >= pooled_dim else q.T  # (Dt, Dp) with orthonormal columns or rows
            self.pool_proj = torch.from_numpy(proj).float()

    def fingerprint(self) -> str:
        return f"tiny-text-v1-l{self.text_len}-d{self.text_dim}-p{self.pooled_dim}-s{self.seed}"

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions -> ``text (B, L, Dt)`` (zeros past the mask), ``mask (B, L)``, ``pooled (B, Dp)``."""
        b, n = len(captions), self.text_len
        ids = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i, caption in enumerate(captions):
            tokens = simple_tokenize(caption, self.vocab_size)[:n]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : len(tokens)] = True
        text = (self.table[ids] + self.position[None]) * mask[..., None]  # (b, L, Dt)
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (b, 1)
        pooled = (text.sum(dim=1) / counts) @ self.pool_proj  # (b, Dp)
        return text, mask, pooled


class TinyImageEncoder:
    """Download-free image encoder: a frame -> 17 tokens (a 4 x 4 grid of regions and their
    mean), like a CLIP ViT's patch tokens and class token.

    Each region of the frame, average-pooled to 4 x 4 pixels (48 values), is projected by a
    fixed table drawn from ``numpy.random.default_rng(seed)``, plus a sinusoidal position code.
    """

    grid = 4  # regions per side
    pixels = 4  # pooled pixels per region side

    def __init__(self, image_dim: int = 32, seed: int = 0) -> None:
        self.image_dim, self.seed = image_dim, seed
        self.image_tokens = self.grid**2 + 1
        rng = np.random.default_rng([seed, 1])
        size = 3 * self.pixels * self.pixels
        self.proj = torch.from_numpy(rng.standard_normal((size, image_dim)) / math.sqrt(size)).float()
        pos = np.arange(self.grid**2)[:, None] / np.power(100.0, np.arange(image_dim) / image_dim)
        self.position = torch.from_numpy(0.1 * np.sin(pos)).float()  # (16, Di)

    def fingerprint(self) -> str:
        return f"tiny-image-v1-d{self.image_dim}-s{self.seed}"

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, 17, Di)``: the class token, then the regions."""
        b = frames.shape[0]
        side = self.grid * self.pixels
        x = torch.nn.functional.adaptive_avg_pool2d(frames.float().cpu(), side)  # (B, 3, 16, 16)
        x = x.reshape(b, 3, self.grid, self.pixels, self.grid, self.pixels)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, self.grid**2, -1)  # (B, 16, 48)
        tokens = x @ self.proj + self.position  # (B, 16, Di)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 17, Di)


def condition_video(video: torch.Tensor) -> torch.Tensor:
    """The conditioning video of Wan 2.1 image-to-video: the first frame of ``video``
    (B, 3, F, H, W), then F - 1 black (zero) frames, as ``WanImageToVideoPipeline`` builds it."""
    return torch.cat([video[:, :, :1], torch.zeros_like(video[:, :, 1:])], dim=2)


def encode_image_condition(
    video_encoder: VideoEncoder,
    image_encoder: ImageEncoder | None,
    video: torch.Tensor,
    *,
    first_frame: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cached image condition of clips ``video`` (B, 3, F, H, W) in [-1, 1]: latents of
    :func:`condition_video` (B, C, T, h, w) and the image states of the first frame (B, N, Di),
    None without an image encoder (``data.image_encoder=latents``, Wan 2.2 I2V-A14B). With
    ``first_frame`` (``data.image_encoder=vae``, Wan 2.2 TI2V) the latent of the first frame
    alone (B, C, 1, h, w), as ``WanImageToVideoPipeline`` with ``expand_timesteps`` encodes it,
    and no states."""
    with torch.no_grad():
        if first_frame:
            return video_encoder.encode(video[:, :, :1]).float().cpu(), None
        latents = video_encoder.encode(condition_video(video)).float().cpu()
        if image_encoder is None:
            return latents, None
        embeds = image_encoder.encode(video[:, :, 0]).float().cpu()
    return latents, embeds


def build_image_encoder(cfg: DataConfig) -> ImageEncoder | None:
    """The image encoder ``data.image_encoder`` names, or None for text-to-video data, ``vae``
    (the first frame's latent alone) and ``latents`` (condition latents without image states)."""
    if cfg.image_encoder in (None, "vae", "latents"):
        return None
    if cfg.image_encoder == "tiny":
        return TinyImageEncoder(cfg.image_dim, cfg.encoder_seed)
    from stafinetune.data.real_encoders import CLIPImageEncoder, SiglipImageEncoder

    encoder = SiglipImageEncoder if cfg.image_encoder == "siglip" else CLIPImageEncoder
    return encoder(
        cfg.image_encoder_path,
        cfg.image_processor_path,
        device=cfg.device,
        dtype=torch_dtype(cfg.encoder_dtype),
        allow_pickle=cfg.allow_pickle_weights,
    )


def build_video_encoder(cfg: DataConfig) -> VideoEncoder:
    """The video encoder ``data.video_encoder`` names (real ones load from a local folder)."""
    if cfg.video_encoder == "tiny":
        return TinyVideoEncoder(cfg.latent_channels)
    from stafinetune.data.real_encoders import DiffusersVideoVAE

    return DiffusersVideoVAE(
        cfg.video_encoder,
        cfg.video_encoder_path,
        device=cfg.device,
        dtype=torch_dtype(cfg.encoder_dtype),
        sample=cfg.sample_posterior,
        seed=cfg.encoder_seed,
        allow_pickle=cfg.allow_pickle_weights,
    )


def build_text_encoder(cfg: DataConfig) -> TextEncoder:
    """The text encoder ``data.text_encoder`` names (real ones load from local folders)."""
    if cfg.text_encoder == "tiny":
        return TinyTextEncoder(cfg.text_len, cfg.text_dim, cfg.pooled_dim, cfg.encoder_seed)
    from stafinetune.data.real_encoders import (
        HunyuanTextEncoder,
        HunyuanVideo15TextEncoder,
        UMT5TextEncoder,
    )

    dtype = torch_dtype(cfg.encoder_dtype)
    if cfg.text_encoder == "umt5":
        return UMT5TextEncoder(
            cfg.text_encoder_path,
            cfg.tokenizer_path,
            text_len=cfg.text_len,
            device=cfg.device,
            dtype=dtype,
            allow_pickle=cfg.allow_pickle_weights,
        )
    # the two-encoder models: the main text encoder, then CLIP (hunyuan) or ByT5 (hunyuanvideo15)
    paths = (cfg.text_encoder_path, cfg.text_encoder_2_path, cfg.tokenizer_path,
             cfg.tokenizer_2_path)  # fmt: skip
    common = {"text_len": cfg.text_len, "device": cfg.device, "dtype": dtype,
              "allow_pickle": cfg.allow_pickle_weights}  # fmt: skip
    if cfg.text_encoder == "hunyuanvideo15":
        return HunyuanVideo15TextEncoder(*paths, text_2_len=cfg.text_2_len, **common)
    return HunyuanTextEncoder(*paths, **common)
