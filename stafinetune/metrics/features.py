"""Per-frame feature extractors for the consistency metrics: DINO, CLIP, or a pixel proxy.

VBench's subject consistency compares DINO ViT-B/16 features of the frames, its background
consistency CLIP ViT-B/32 image features. No package ships those weights and nothing may be
downloaded at run time, so the networks load from a local transformers folder the user gives
(``save_pretrained`` layout: ``config.json`` + weights):

* :class:`DinoFeatures`: a ``ViTModel`` (e.g. DINO ViT-B/16 in transformers format; VBench's
  exact model) or a ``Dinov2Model`` folder. Feature = the CLS token of the last hidden state
  (after the final layer norm, which is what DINO's own ``forward`` returns). Preprocessing as
  VBench's ``dino_transform``: resize the short side to 224 (bilinear, antialiased; the long
  side ``int(224 * long / short)``), divide by 255, normalise with ImageNet mean / std.
* :class:`ClipFeatures`: a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder (feature =
  the projected image embedding, as OpenAI CLIP's ``encode_image`` that VBench calls), or a
  plain ``CLIPVisionModel`` folder (pooled output, no projection: ``source`` says so).
  Preprocessing as VBench's ``clip_transform``: resize the short side to the model's image size
  (bicubic, antialiased), centre-crop it, divide by 255, normalise with CLIP's mean / std.
* :class:`PixelFeatures`: the weight-free **proxy** used when no folder is given. Each frame is
  area-averaged to a 16 x 16 grid per RGB channel (``adaptive_avg_pool2d``), scaled to [0, 1],
  normalised with the ImageNet mean / std, and flattened to 768 numbers. The cosine of two such
  vectors compares coarse layout and colour, not semantics: it falls when the picture changes
  or flickers and is 1 for identical frames. Both consistency metrics use it, so without
  weights they report the same number; ``source`` is ``"pixel_proxy"``.

The exact numbers of VBench need its exact backbones (DINO ViT-B/16, CLIP ViT-B/32); other
backbones (e.g. DINOv2) keep VBench's formula on different features, and ``source`` names the
model type so a report says which was used. Resizing is antialiased as torchvision >= 0.17's
``Resize`` does by default; VBench runs under older torchvision resized without antialiasing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from stafinetune.metrics.video_io import as_video
from stafinetune.safety import weights_loading_kwargs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_SHORT_SIDE = 224  # VBench's dino_transform(224)


class FrameFeatures(Protocol):
    """Maps a uint8 video ``(F, H, W, 3)`` to per-frame features ``(F, D)``; ``source`` names it."""

    source: str

    def __call__(self, video: torch.Tensor) -> torch.Tensor: ...


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel of ``(F, 3, H, W)`` float frames in 0..255."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x / 255.0 - m) / s


def resize_short_side(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize ``(F, 3, H, W)`` so the short side is ``size``, as torchvision's ``Resize(size)``.

    The long side becomes ``int(size * long / short)`` (truncated, as torchvision);
    ``mode`` is ``"bilinear"`` or ``"bicubic"``, antialiased when shrinking.
    """
    height, width = x.shape[-2:]
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_h, new_w) == (height, width):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size x size`` crop of ``(F, 3, H, W)``, offsets as torchvision's ``CenterCrop``."""
    height, width = x.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def _frames_nchw(video: torch.Tensor) -> torch.Tensor:
    return as_video(video).permute(0, 3, 1, 2).float()  # (F, 3, H, W), 0..255


class PixelFeatures:
    """Weight-free proxy features: 16 x 16 area-averaged, ImageNet-normalised RGB (768 values)."""

    source = "pixel_proxy"

    def __init__(self, grid: int = 16) -> None:
        self.grid = grid

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """``(F, H, W, 3)`` uint8 -> ``(F, 3 * grid * grid)`` float32."""
        x = F.adaptive_avg_pool2d(_frames_nchw(video), self.grid)  # (F, 3, g, g)
        return _normalise(x, IMAGENET_MEAN, IMAGENET_STD).flatten(1)


def _read_config(path: str | os.PathLike, what: str) -> tuple[Path, dict]:
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{what} weights folder {folder} has no config.json (expected a transformers "
            "save_pretrained folder)"
        )
    return folder, json.loads(config_file.read_text())


class _BatchedModel:
    """Runs ``embed`` over frames in batches without gradients; subclasses set ``source``."""

    source: str
    batch_size: int

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """``(F, H, W, 3)`` uint8 -> ``(F, D)`` float32 features."""
        frames = _frames_nchw(video)
        out = [
            self.embed(self.preprocess(frames[i : i + self.batch_size])).float()
            for i in range(0, len(frames), self.batch_size)
        ]
        return torch.cat(out)


class DinoFeatures(_BatchedModel):
    """DINO CLS features from a local ``ViTModel`` / ``Dinov2Model`` folder (VBench's subject features)."""

    MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 16) -> None:
        from transformers import AutoModel  # lazily: importing transformers takes seconds

        folder, config = _read_config(path, "DINO")
        model_type = config.get("model_type")
        if model_type not in self.MODEL_TYPES:
            raise ValueError(
                f"DINO weights folder {folder} holds a {model_type!r} model; expected one of "
                f"{self.MODEL_TYPES} (ViTModel or Dinov2Model)"
            )
        safe = weights_loading_kwargs(folder, "DINO weights", allow_pickle=False, consent=None)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, **safe).eval()
        self.model_type = model_type
        self.source = f"dino:{model_type}"
        self.batch_size = batch_size

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = resize_short_side(frames, DINO_SHORT_SIDE, "bilinear")
        return _normalise(x, IMAGENET_MEAN, IMAGENET_STD)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        # ViT embeds positions for its training size only unless told to interpolate; DINOv2
        # always interpolates (and has no such argument).
        extra = {"interpolate_pos_encoding": True} if self.model_type == "vit" else {}
        return self.model(pixel_values=pixels, **extra).last_hidden_state[:, 0]  # (B, D)


class ClipFeatures(_BatchedModel):
    """CLIP image embeddings from a local CLIP folder (VBench's background features)."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 16) -> None:
        import transformers  # lazily: importing transformers takes seconds

        folder, config = _read_config(path, "CLIP")
        safe = weights_loading_kwargs(folder, "CLIP weights", allow_pickle=False, consent=None)
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type == "clip":
            self.model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True, **safe)
            self.kind, vision_config = "clip", self.model.config.vision_config
        elif model_type == "clip_vision_model" and "CLIPVisionModelWithProjection" in architectures:
            self.model = transformers.CLIPVisionModelWithProjection.from_pretrained(
                folder, local_files_only=True, **safe
            )
            self.kind, vision_config = "clip_vision_projection", self.model.config
        elif model_type == "clip_vision_model":
            self.model = transformers.CLIPVisionModel.from_pretrained(folder, local_files_only=True, **safe)
            self.kind, vision_config = "clip_vision_unprojected", self.model.config
        else:
            raise ValueError(
                f"CLIP weights folder {folder} holds a {model_type!r} model; expected 'clip' "
                "(CLIPModel) or 'clip_vision_model' (CLIPVisionModel[WithProjection])"
            )
        self.model.eval()
        self.image_size = int(vision_config.image_size)
        self.source = f"clip:{self.kind}"
        self.batch_size = batch_size

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = centre_crop(resize_short_side(frames, self.image_size, "bicubic"), self.image_size)
        return _normalise(x, CLIP_MEAN, CLIP_STD)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "clip":
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled)  # (B, projection_dim)
        if self.kind == "clip_vision_projection":
            return self.model(pixel_values=pixels).image_embeds
        return self.model(pixel_values=pixels).pooler_output  # (B, hidden)


def build_frame_features(
    path: str | os.PathLike | FrameFeatures | None, kind: str
) -> FrameFeatures:
    """The extractor for ``kind`` (``"dino"`` or ``"clip"``) from a folder, or the pixel proxy.

    ``path`` None -> :class:`PixelFeatures`; an object that already extracts features is
    returned as is (so a caller loads the network once for many videos).
    """
    if path is None:
        return PixelFeatures()
    if not isinstance(path, (str, os.PathLike)):
        return path
    if kind == "dino":
        return DinoFeatures(path)
    if kind == "clip":
        return ClipFeatures(path)
    raise ValueError(f"unknown feature kind {kind!r}; expected 'dino' or 'clip'")
