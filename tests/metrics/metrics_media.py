"""Small videos with known properties for the metrics tests (uint8 RGB ``(F, H, W, 3)``)."""

from __future__ import annotations

import numpy as np

from stafinetune.data.synthetic import DIRECTIONS, ShapeMotion, render_clip

FRAMES = 17


def moving_shape(
    speed: float,
    direction: str = "right",
    *,
    size: int = 64,
    frames: int = FRAMES,
    shape: str = "circle",
    colour: str = "red",
    background: str = "dark blue",
    radius_frac: float = 0.11,
) -> tuple[np.ndarray, ShapeMotion]:
    """One shape crossing the frame centre at ``speed`` px/frame: ``(video, its motion)``."""
    ux, uy = DIRECTIONS[direction]
    vx, vy = ux * speed, uy * speed
    half = (frames - 1) / 2
    motion = ShapeMotion(
        shape, colour, direction, int(speed), size * radius_frac,
        size / 2 - vx * half, size / 2 - vy * half, vx, vy,
    )  # fmt: skip
    return render_clip(background, [motion], frames, size, size), motion


def two_shapes(size: int = 128, frames: int = FRAMES) -> tuple[np.ndarray, list[ShapeMotion]]:
    """A green square moving right in the top half, an orange diamond moving up and left below."""
    r = size * 0.1
    d = np.sqrt(0.5) * 2
    motions = [
        ShapeMotion("square", "green", "right", 3, r, 20.0, size * 0.25, 3.0, 0.0),
        ShapeMotion("diamond", "orange", "up and left", 2, r, size - 20.0, size - 16.0, -d, -d),
    ]
    return render_clip("grey", motions, frames, size, size), motions


def static(video: np.ndarray) -> np.ndarray:
    """The first frame repeated for the whole length."""
    return np.repeat(video[:1], len(video), axis=0)


def alternating(a: int, b: int, *, size: int = 64, frames: int = FRAMES) -> np.ndarray:
    """Flat grey frames alternating between levels ``a`` and ``b``."""
    levels = np.where(np.arange(frames) % 2 == 0, a, b).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, size, size, 3)).copy()
