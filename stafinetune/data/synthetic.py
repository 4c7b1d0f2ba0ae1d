"""The embedded default dataset: captioned mp4 clips of shapes moving with known motion.

Each clip shows one or two flat-coloured shapes (circle, square, diamond) on a flat background,
each moving in a straight line with a set direction (one of eight compass directions) and speed
(pixels per frame). The caption states shape, colour, direction and speed, e.g.
``"a red circle moving right at 3 pixels per frame on a dark blue background"``, so a model
finetuned on it has a learnable text -> motion mapping. Clips are real H.264 mp4 files written
with PyAV and read back with decord like any user video; the ground-truth motion of every
shape is stored in the manifest (``motion`` field) so tests can check it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
    "orange": (240, 140, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark blue": (15, 25, 70),
    "dark green": (15, 60, 25),
    "grey": (110, 110, 110),
}
SHAPES = ("circle", "square", "diamond")
# Unit (dx, dy) per direction name; y grows downwards as in images.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
    "down and right": (math.sqrt(0.5), math.sqrt(0.5)),
    "down and left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "up and right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "up and left": (-math.sqrt(0.5), -math.sqrt(0.5)),
}
SPEEDS = (1, 2, 3, 4)  # pixels per frame
# Bumped whenever the generator's output changes, so old clips and caches are not reused.
SYNTHETIC_VERSION = 2


@dataclass
class ShapeMotion:
    """One moving shape: centre at frame f is ``(x0 + f * vx, y0 + f * vy)`` in pixels."""

    shape: str
    colour: str
    direction: str
    speed: int
    radius: float
    x0: float
    y0: float
    vx: float
    vy: float

    def centre(self, frame: int) -> tuple[float, float]:
        return self.x0 + frame * self.vx, self.y0 + frame * self.vy


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float):
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.3
    raise ValueError(f"unknown shape {shape!r}")


def sample_clip_spec(
    rng: np.random.Generator, frames: int, height: int, width: int
) -> tuple[str, list[ShapeMotion]]:
    """Draw a background and 1-2 shapes whose whole path stays inside the frame."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n_shapes = 1 + int(rng.random() < 0.35)
    colours = rng.choice(len(COLOURS), size=n_shapes, replace=False)
    motions = []
    for k in range(n_shapes):
        shape = SHAPES[rng.integers(len(SHAPES))]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        speed = int(SPEEDS[rng.integers(len(SPEEDS))])
        ux, uy = DIRECTIONS[direction]
        vx, vy = ux * speed, uy * speed
        radius = float(min(height, width)) * float(rng.uniform(0.08, 0.14))
        travel_x, travel_y = vx * (frames - 1), vy * (frames - 1)
        margin = radius * 1.35 + 1
        # Start so that start and end centres are both inside [margin, size - margin].
        lo_x, hi_x = margin - min(0.0, travel_x), width - margin - max(0.0, travel_x)
        lo_y, hi_y = margin - min(0.0, travel_y), height - margin - max(0.0, travel_y)
        if hi_x < lo_x or hi_y < lo_y:  # path too long for the canvas: slow down
            speed, vx, vy = 1, ux, uy
            lo_x, hi_x = (
                margin - min(0.0, vx * (frames - 1)),
                width - margin - max(0.0, vx * (frames - 1)),
            )
            lo_y, hi_y = (
                margin - min(0.0, vy * (frames - 1)),
                height - margin - max(0.0, vy * (frames - 1)),
            )
        x0 = float(rng.uniform(lo_x, max(lo_x, hi_x)))
        y0 = float(rng.uniform(lo_y, max(lo_y, hi_y)))
        colour = list(COLOURS)[int(colours[k])]
        motions.append(ShapeMotion(shape, colour, direction, speed, radius, x0, y0, vx, vy))
    return background, motions


def caption_for(background: str, motions: list[ShapeMotion]) -> str:
    """The caption of a clip: every shape's colour, kind, direction and speed."""
    parts = [
        f"a {m.colour} {m.shape} moving {m.direction} at {m.speed} pixel{'s' if m.speed != 1 else ''}"
        " per frame"
        for m in motions
    ]
    return " and ".join(parts) + f" on a {background} background"


def render_clip(
    background: str, motions: list[ShapeMotion], frames: int, height: int, width: int
) -> np.ndarray:
    """Render the clip as uint8 RGB frames ``(frames, height, width, 3)``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        video[f] = BACKGROUNDS[background]
        for m in motions:
            cx, cy = m.centre(f)
            video[f][_shape_mask(m.shape, xx, yy, cx, cy, m.radius)] = COLOURS[m.colour]
    return video


def write_mp4(path: str | Path, video: np.ndarray, fps: int, *, crf: int = 16) -> None:
    """Write uint8 RGB frames ``(f, h, w, 3)`` as an H.264 mp4 (yuv420p) with PyAV."""
    frames, height, width, _ = video.shape
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "animation"}
        for f in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(video[f]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_clips: int,
    frames: int,
    height: int,
    width: int,
    fps: int,
    seed: int = 0,
) -> Path:
    """Write ``num_clips`` mp4 clips and ``manifest.jsonl`` into ``out_dir``; return the manifest.

    Idempotent: an existing manifest means the set is complete and is returned as is (it is
    written last, atomically). Clips are drawn from ``numpy.random.default_rng([seed, i])`` so
    clip ``i`` is the same whatever ``num_clips`` is. Manifest lines hold ``path`` (relative),
    ``caption``, ``fps`` and ``motion`` (the ground truth: background and one ShapeMotion dict
    per shape).
    """
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if manifest.exists():
        return manifest
    clip_dir = out_dir / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])
        background, motions = sample_clip_spec(rng, frames, height, width)
        rel = f"clips/clip_{i:05d}.mp4"
        target = out_dir / rel
        if not target.exists():
            tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.mp4")
            write_mp4(tmp, render_clip(background, motions, frames, height, width), fps)
            os.replace(tmp, target)
        lines.append(
            {
                "path": rel,
                "caption": caption_for(background, motions),
                "fps": fps,
                "motion": {"background": background, "shapes": [asdict(m) for m in motions]},
            }
        )
    tmp_manifest = manifest.with_name(f".manifest.{os.getpid()}.tmp")
    with open(tmp_manifest, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    os.replace(tmp_manifest, manifest)
    return manifest
