"""Typed configuration of the data pipeline (Hydra group ``data``).

Plain types only (lists, not tuples) so the dataclass can be registered in Hydra's ConfigStore;
YAML under ``conf/data/`` only sets values. Every check names the offending field as
``data.<field>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SOURCES = ("synthetic", "folder", "hf_dataset")
VIDEO_ENCODERS = ("tiny", "wan", "hunyuan", "wan2.2", "hunyuanvideo15")
TEXT_ENCODERS = ("tiny", "umt5", "hunyuan", "hunyuanvideo15")
IMAGE_ENCODERS = ("tiny", "clip", "siglip", "vae", "latents")
CACHE_DTYPES = ("float32", "bfloat16", "float16")


def default_data_root() -> Path:
    """Where synthetic clips and latent caches live unless ``data.root`` is set.

    ``$STAFINETUNE_DATA`` if set, else ``$XDG_CACHE_HOME/stafinetune/data``, else
    ``~/.cache/stafinetune/data``. It is reused across runs and never inside the package.
    """
    explicit = os.environ.get("STAFINETUNE_DATA")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stafinetune" / "data"


# Every supported VAE compresses 4x causally in time and 8x in space, except the Wan 2.2 VAE
# of TI2V-5B (``wan2.2``, 48 channels) and HunyuanVideo 1.5's (32 channels), which compress
# 16x in space.
VAE_TIME_FACTOR = 4
VAE_SPACE_FACTOR = 8
VAE_SPACE_FACTORS = {"wan2.2": 16, "hunyuanvideo15": 16}


@dataclass
class DataConfig:
    """Where the clips come from, how they are sampled, encoded, cached and loaded.

    Sources: ``synthetic`` (the embedded default: generated mp4 clips of moving shapes),
    ``folder`` (a JSONL/CSV manifest of video paths and captions) and ``hf_dataset`` (a local
    ``datasets`` dataset saved with ``save_to_disk`` or a folder/file of parquet/arrow files).
    """

    # --- source -------------------------------------------------------------------------
    source: str = "synthetic"
    name: str = "synthetic"  # human-readable dataset name, part of the cache folder name
    root: str | None = None  # data + cache root; None: default_data_root()
    cache_dir: str | None = None  # explicit latent-cache folder; None: <root>/cache/<name>-<hash>
    # folder source: a .jsonl or .csv manifest with path, caption[, fps, start, end]
    manifest: str | None = None
    video_dir: str | None = None  # base for relative manifest paths; None: the manifest's folder
    # read video paths outside the data folder (video_dir / the dataset's folder): ../ and
    # absolute paths elsewhere are otherwise skipped and listed in bad_inputs.jsonl
    allow_outside_paths: bool = False
    dataset_path: str | None = None  # hf_dataset source: save_to_disk folder or parquet/arrow files
    dataset_split: str | None = None  # split of a DatasetDict; None: the only split or "train"
    video_column: str = "video"  # path (str) or encoded bytes (or {"bytes", "path"} dicts)
    caption_column: str = "caption"
    max_samples: int | None = None  # keep only the first N records of the source

    # --- synthetic generator --------------------------------------------------------------
    num_clips: int = 64
    synthetic_fps: int = 8  # frame rate the synthetic mp4 files are written at
    synthetic_frames: int = 17  # frames per synthetic clip
    synthetic_height: int = 128
    synthetic_width: int = 128
    synthetic_seed: int = 0

    # --- frame sampling and resizing ----------------------------------------------------
    num_frames: int = 17  # frames per training clip (1 + 4k for the 4x causal VAEs)
    height: int = 128
    width: int = 128
    fps: float | None = None  # target frame rate; None: the video's native rate
    frame_stride: int = 1  # take every stride-th frame at the target rate
    # [num_frames, height, width] buckets; each video goes to the buckets whose aspect ratio
    # is closest to its own, then to the longest frame count it is long enough for.
    # Empty: the single bucket [num_frames, height, width].
    buckets: list[list[int]] = field(default_factory=list)

    # --- bad-input limits ---------------------------------------------------------------
    min_side: int = 16  # videos with a side below this many pixels are skipped
    max_pixels: int = 4096 * 4096  # videos with more pixels per frame are skipped
    max_aspect_ratio: float = 4.0  # long side / short side above this is skipped

    # --- encoders ------------------------------------------------------------------------
    # tiny | wan | hunyuan | wan2.2 (Wan 2.2 TI2V-5B's 16x VAE) | hunyuanvideo15 (16x)
    video_encoder: str = "tiny"
    video_encoder_path: str | None = None  # local diffusers VAE folder (every real one)
    text_encoder: str = "tiny"  # tiny | umt5 | hunyuan | hunyuanvideo15
    # local transformers folder (umt5; hunyuan: the llama; hunyuanvideo15: Qwen2.5-VL's text model)
    text_encoder_path: str | None = None
    # hunyuan: the CLIP text model folder; hunyuanvideo15: the ByT5 (T5EncoderModel) glyph encoder
    text_encoder_2_path: str | None = None
    tokenizer_path: str | None = None  # None: text_encoder_path
    tokenizer_2_path: str | None = None  # None: text_encoder_2_path
    text_len: int = 32  # L: text tokens per caption (padded / truncated)
    text_2_len: int = 256  # L2: glyph tokens per caption (hunyuanvideo15's ByT5 stream)
    text_dim: int = 32  # Dt of the tiny text encoder
    pooled_dim: int = 32  # Dp of the tiny text encoder
    latent_channels: int = 16  # C of the tiny video encoder
    encoder_seed: int = 0  # seed of the tiny encoders' fixed tables
    encoder_dtype: str = "float32"  # dtype the real encoders run in
    device: str = "cpu"  # device the encoders run on while preprocessing
    sample_posterior: bool = False  # real VAEs: sample the latent distribution instead of its mean
    # load .bin/.pt encoder weights when a folder has no safetensors (pickle can run code)
    allow_pickle_weights: bool = False
    # image-to-video: each clip's first frame conditions it. null: text-to-video (no image);
    # tiny | clip (Wan 2.1) | siglip (HunyuanVideo 1.5): cache the condition latents and the
    # image encoder's states of that frame;
    # vae: only the latent of that frame alone through the video VAE (Wan 2.2 TI2V);
    # latents: the condition latents without image states (Wan 2.2 I2V-A14B, no image_dim)
    image_encoder: str | None = None
    # clip / siglip: local transformers CLIPVisionModel / SiglipVisionModel folder
    image_encoder_path: str | None = None
    # its CLIPImageProcessor / SiglipImageProcessor; None: the encoder's folder
    image_processor_path: str | None = None
    image_dim: int = 32  # Di of the tiny image encoder

    # --- cache ----------------------------------------------------------------------------
    cache_dtype: str = "float32"  # dtype of latents and text states stored in the cache
    shard_size: int = 64  # records per cache shard (the unit of resumption)
    encode_batch_size: int = 8
    decode_workers: int = 2  # processes decoding videos while the main process encodes (0: inline)

    # --- loader --------------------------------------------------------------------------
    use_cache: bool = True  # False: decode + encode on the fly in the loader (small runs)
    num_workers: int = (
        0  # loader workers; 0 is fastest for the small default cache (benchmarks/data_pipeline.py)
    )
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid ``data.<field>``."""
        for name, choices in (("source", SOURCES), ("video_encoder", VIDEO_ENCODERS),
                              ("text_encoder", TEXT_ENCODERS), ("cache_dtype", CACHE_DTYPES),
                              ("encoder_dtype", CACHE_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"data.{name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        if self.image_encoder is not None and self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(
                f"data.image_encoder must be null or one of {IMAGE_ENCODERS}, "
                f"got {self.image_encoder!r}"
            )
        vision = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}
        if self.image_encoder in vision and not self.image_encoder_path:
            raise ValueError(
                f"data.image_encoder_path must point to a local {vision[self.image_encoder]} "
                f"folder for {self.image_encoder!r}"
            )
        if self.source == "folder" and not self.manifest:
            raise ValueError("data.manifest must be set when data.source is 'folder'")
        if self.source == "hf_dataset" and not self.dataset_path:
            raise ValueError("data.dataset_path must be set when data.source is 'hf_dataset'")
        if not self.name or "/" in self.name or os.sep in self.name:
            raise ValueError(f"data.name must be a non-empty name without '/', got {self.name!r}")
        positive = (
            "num_clips", "synthetic_fps", "synthetic_frames", "synthetic_height", "synthetic_width",
            "num_frames", "height", "width", "frame_stride", "min_side", "max_pixels",
            "text_len", "text_2_len", "text_dim", "pooled_dim", "latent_channels", "image_dim",
            "shard_size",
            "encode_batch_size", "prefetch_factor",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        for name in ("num_workers", "decode_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError(f"data.max_samples must be positive or null, got {self.max_samples}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"data.fps must be positive or null, got {self.fps}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"data.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.video_encoder != "tiny" and not self.video_encoder_path:
            raise ValueError(
                f"data.video_encoder_path must point to a local VAE folder for {self.video_encoder!r}"
            )
        if self.text_encoder != "tiny" and not self.text_encoder_path:
            raise ValueError(
                f"data.text_encoder_path must point to a local folder for {self.text_encoder!r}"
            )
        if self.text_encoder == "hunyuan" and not self.text_encoder_2_path:
            raise ValueError("data.text_encoder_2_path must point to the CLIP text model folder")
        if self.text_encoder == "hunyuanvideo15" and not self.text_encoder_2_path:
            raise ValueError(
                "data.text_encoder_2_path must point to the ByT5 glyph encoder folder "
                "(a T5EncoderModel) for 'hunyuanvideo15'"
            )
        for i, bucket in enumerate(self.all_buckets()):
            if len(bucket) != 3 or any(int(v) <= 0 for v in bucket):
                raise ValueError(
                    f"data.buckets[{i}] must be [num_frames, height, width] of positive ints, got {bucket}"
                )
            frames, height, width = (int(v) for v in bucket)
            if (frames - 1) % VAE_TIME_FACTOR != 0:
                raise ValueError(
                    f"data.buckets[{i}] / data.num_frames: {frames} frames is not 1 + 4k "
                    "(the VAEs compress time 4x causally)"
                )
            space = self.space_factor
            if height % space or width % space:
                raise ValueError(
                    f"data.buckets[{i}] / data.height, data.width: {height}x{width} is not a "
                    f"multiple of {space} (data.video_encoder={self.video_encoder} compresses "
                    f"space {space}x)"
                )
        shortest = min(int(b[0]) for b in self.all_buckets())
        step = self.frame_stride * (self.synthetic_fps / self.fps if self.fps else 1.0)
        needed = 1 + int((shortest - 1) * step + 1e-6)  # native frames spanned by one clip
        if self.source == "synthetic" and self.synthetic_frames < needed:
            raise ValueError(
                f"data.synthetic_frames={self.synthetic_frames} is too short: {shortest} frames at "
                f"data.fps={self.fps}, data.frame_stride={self.frame_stride} span {needed}; "
                "every clip would be skipped"
            )

    def all_buckets(self) -> list[list[int]]:
        """The [num_frames, height, width] buckets: ``buckets`` or the single default one."""
        if self.buckets:
            return [list(b) for b in self.buckets]
        return [[self.num_frames, self.height, self.width]]

    @property
    def space_factor(self) -> int:
        """The spatial compression of ``video_encoder``'s VAE."""
        return VAE_SPACE_FACTORS.get(self.video_encoder, VAE_SPACE_FACTOR)

    def latent_grids(self) -> list[tuple[int, int, int]]:
        """(T, H, W) latent grid of every bucket, as the VAEs produce it."""
        space = self.space_factor
        return [
            ((int(f) - 1) // VAE_TIME_FACTOR + 1, int(h) // space, int(w) // space)
            for f, h, w in self.all_buckets()
        ]

    def data_root(self) -> Path:
        """The resolved data root (``data.root`` or :func:`default_data_root`)."""
        return Path(self.root).expanduser() if self.root else default_data_root()
