"""Video decoding (decord, native size), frame sampling, bucketing and torch resize/crop.

Every way a video can be bad raises :class:`BadVideo` with a ``reason`` code, so preprocessing
can skip, count and list it instead of dying. Reason codes (also documented in docs/data.md):

==================  ==============================================================
``missing_file``    the path does not exist
``empty_file``      zero bytes
``unreadable``      not a video container / no video stream / decoder cannot open it
``truncated``       opens, but decoding the needed frames fails (cut-off file)
``wrong_channels``  pixel format without exactly 3 colour channels (gray, alpha, ...)
``too_large``       more than ``data.max_pixels`` pixels per frame
``too_small``       a side below ``data.min_side`` pixels
``bad_aspect``      long side / short side above ``data.max_aspect_ratio``
``too_short``       not enough frames for the smallest bucket at the target fps/stride
``bad_range``       manifest start/end/fps that make no sense
``missing_caption`` empty or missing caption
``bad_manifest``    a manifest line / dataset row that cannot be parsed
==================  ==============================================================
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F

REASONS = (
    "missing_file", "empty_file", "unreadable", "truncated", "wrong_channels", "too_large",
    "too_small", "bad_aspect", "too_short", "bad_range", "missing_caption", "bad_manifest",
    "outside_data_dir",
)  # fmt: skip


class BadVideo(Exception):
    """A sample that must be skipped; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-video reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class VideoRecord:
    """One source sample: a video (file path or encoded bytes) and its caption.

    ``index`` is the record's position in the source (stable across runs); ``fps`` overrides
    the container's frame rate; ``start``/``end`` (seconds) restrict sampling to a window.
    """

    index: int
    caption: str
    path: str | None = None
    data: bytes | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    label: str = ""  # how reports name the sample (path or "dataset[i]")
    problem: tuple[str, str] | None = None  # (reason, detail) found while reading the source

    def open_bytes(self):
        """What av/decord open: the path, or a fresh BytesIO over the bytes."""
        return self.path if self.data is None else io.BytesIO(self.data)


@dataclass
class VideoInfo:
    width: int
    height: int
    num_frames: int
    fps: float
    reader: object = None  # the open decord.VideoReader (reused to decode the frames)


def _decord():
    import decord  # imported lazily: it loads ffmpeg libraries at import time

    decord.bridge.set_bridge("native")
    # ffmpeg's own messages ("partial file", one per broken video) would flood the console;
    # every problem is reported as a BadVideo reason in bad_inputs.jsonl instead
    decord.logging.set_level(decord.logging.QUIET)
    return decord


def probe_video(record: VideoRecord, cfg) -> VideoInfo:
    """Open the video without decoding pixels and check container-level properties.

    ``cfg`` is a :class:`~stafinetune.data.config.DataConfig` (limits ``min_side``,
    ``max_pixels``, ``max_aspect_ratio``). Raises :class:`BadVideo`.
    """
    if record.data is None:
        if record.path is None or not os.path.exists(record.path):
            raise BadVideo("missing_file", str(record.path))
        if os.path.getsize(record.path) == 0:
            raise BadVideo("empty_file", record.path)
    elif len(record.data) == 0:
        raise BadVideo("empty_file", record.label)
    try:
        with av.open(record.open_bytes()) as container:
            if not container.streams.video:
                raise BadVideo("unreadable", "no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            width, height = int(ctx.width), int(ctx.height)
            fmt = ctx.format
            n_components = len(fmt.components) if fmt is not None else 0
            pix_fmt = ctx.pix_fmt
            rate = stream.average_rate or stream.guessed_rate
    except BadVideo:
        raise
    except Exception as exc:  # av raises many error types for garbage input
        raise BadVideo("unreadable", f"{type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise BadVideo("unreadable", f"declared size {width}x{height}")
    if n_components != 3:
        raise BadVideo("wrong_channels", f"pixel format {pix_fmt} has {n_components} channels")
    if width * height > cfg.max_pixels:
        raise BadVideo("too_large", f"{width}x{height} > data.max_pixels={cfg.max_pixels}")
    if min(width, height) < cfg.min_side:
        raise BadVideo("too_small", f"{width}x{height} has a side < data.min_side={cfg.min_side}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        raise BadVideo(
            "bad_aspect", f"{width}x{height} exceeds data.max_aspect_ratio={cfg.max_aspect_ratio}"
        )
    try:
        reader = _decord().VideoReader(record.open_bytes(), num_threads=1)
        num_frames = len(reader)
        native_fps = float(reader.get_avg_fps())
    except Exception as exc:  # the container parsed, so the packet data is what is broken
        raise BadVideo("truncated", f"decord: {str(exc).splitlines()[0][:200]}") from None
    fps = record.fps or native_fps or (float(rate) if rate else 0.0)
    if not fps or not math.isfinite(fps) or fps <= 0:
        raise BadVideo("bad_range", f"no usable frame rate ({fps})")
    if num_frames <= 0:
        raise BadVideo("truncated", "no decodable frames")
    return VideoInfo(width=width, height=height, num_frames=num_frames, fps=fps, reader=reader)


def sample_frame_indices(
    info: VideoInfo,
    num_frames: int,
    *,
    target_fps: float | None,
    stride: int,
    start: float | None = None,
    end: float | None = None,
) -> list[int] | None:
    """Native frame indices of ``num_frames`` frames at ``target_fps`` (None: native) x stride.

    Sampling starts at ``start`` seconds (default 0) and must end before ``end`` seconds
    (default: the end of the video). Returns None when the window is too short.
    """
    step = stride * (info.fps / target_fps if target_fps else 1.0)  # native frames per sample
    first = int(math.ceil((start or 0.0) * info.fps - 1e-6))
    limit = (
        info.num_frames
        if end is None
        else min(info.num_frames, int(math.floor(end * info.fps + 1e-6)))
    )
    indices = [first + int(math.floor(i * step + 1e-6)) for i in range(num_frames)]
    if indices[-1] >= limit:
        return None
    return indices


def choose_bucket(info: VideoInfo, record: VideoRecord, cfg) -> tuple[int, list[int]]:
    """Pick the bucket for a video: closest aspect ratio, then the most frames that fit.

    Returns ``(bucket_id, frame_indices)``; raises ``BadVideo("too_short")`` if no bucket of
    the chosen aspect ratio fits.
    """
    buckets = cfg.all_buckets()
    aspect = math.log(info.width / info.height)
    best = min(abs(math.log(w / h) - aspect) for _, h, w in buckets)
    candidates = [
        (f, i)
        for i, (f, h, w) in enumerate(buckets)
        if abs(math.log(w / h) - aspect) <= best + 1e-9
    ]
    for frames, i in sorted(candidates, reverse=True):
        indices = sample_frame_indices(
            info,
            frames,
            target_fps=cfg.fps,
            stride=cfg.frame_stride,
            start=record.start,
            end=record.end,
        )
        if indices is not None:
            return i, indices
    shortest = min(f for f, _ in candidates)
    raise BadVideo(
        "too_short",
        f"{info.num_frames} frames at {info.fps:g} fps cannot give {shortest} frames "
        f"at fps={cfg.fps} stride={cfg.frame_stride}",
    )


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8 frames ``(f, h, w, 3)`` to cover ``height x width``, centre-crop, scale to [-1, 1].

    Returns float32 ``(3, f, height, width)``. Antialiased bilinear resize in torch (decord's
    own resizer crashes for widths that are not multiples of 32).
    """
    x = frames.permute(0, 3, 1, 2).float()  # (f, 3, h, w)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(
            x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    x = x.permute(1, 0, 2, 3).contiguous()  # (3, f, height, width)
    return x.mul_(1.0 / 127.5).sub_(1.0).clamp_(-1.0, 1.0)  # rounding may overshoot by an ulp


def load_clip(record: VideoRecord, cfg) -> tuple[torch.Tensor, int]:
    """Decode, sample and resize one record: ``(video (3, F, H, W) in [-1, 1], bucket_id)``.

    Raises :class:`BadVideo` for every kind of bad input.
    """
    if record.problem is not None:
        raise BadVideo(*record.problem)
    if not record.caption:
        raise BadVideo("missing_caption", record.label)
    if record.start is not None and record.end is not None and record.end <= record.start:
        raise BadVideo("bad_range", f"end {record.end} <= start {record.start}")
    if (record.start is not None and record.start < 0) or (
        record.fps is not None and record.fps <= 0
    ):
        raise BadVideo("bad_range", f"start={record.start} fps={record.fps}")
    info = probe_video(record, cfg)
    bucket_id, indices = choose_bucket(info, record, cfg)
    _, height, width = cfg.all_buckets()[bucket_id]
    try:
        frames = info.reader.get_batch(indices).asnumpy()  # (f, h, w, c) uint8
    except Exception as exc:
        raise BadVideo("truncated", f"decord: {str(exc).splitlines()[0][:200]}") from None
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise BadVideo("wrong_channels", f"decoded frames of shape {tuple(frames.shape)}")
    if frames.shape[0] != len(indices):
        raise BadVideo("truncated", f"decoded {frames.shape[0]} of {len(indices)} frames")
    video = resize_crop(torch.from_numpy(np.ascontiguousarray(frames)), height, width)
    return video, bucket_id
