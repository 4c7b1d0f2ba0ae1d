"""Measured vs intended motion of the synthetic shape clips (**exact** ground truth, measured).

The embedded dataset (:mod:`stafinetune.data.synthetic`) shows one or two flat-coloured shapes,
each moving in a straight line at a constant velocity over a flat background, and its caption
says each shape's colour, direction and speed. A video generated from such a caption should
show that motion; this module measures it and compares.

Measuring (:func:`estimate_motion`), on uint8 RGB frames ``(F, H, W, 3)``:

1. background: per frame, the per-channel median colour (the background covers > 80% of a
   synthetic frame, so the median is the background colour even after H.264 noise);
2. foreground: pixels farther than :data:`FOREGROUND_DISTANCE` (50, RGB Euclidean) from it;
   the core is the foreground eroded by one pixel (3 x 3), which drops the colour mixtures
   that antialiasing and 4:2:0 chroma subsampling leave along edges;
3. shapes: colour clustering of the core pixels of all frames. Seeds are the most populated
   16-level RGB bins (at most ``max_shapes``, each holding >= 3% of the core pixels and more
   than :data:`MIN_COLOUR_SEPARATION` = 50 from the seeds before it: the palette's closest
   pair, yellow / orange, is 76 apart), refined by 20 k-means (Lloyd) steps; deterministic;
4. tracks: per frame and shape, the centroid ``(x + 0.5, y + 0.5)`` (pixel centres, as the
   renderer's coordinates) of the core pixels nearest that shape's colour. Frames with fewer
   than 4 such pixels, or fewer than 85% of the shape's 75th-percentile pixel count (it is
   partly hidden behind the other shape, which pulls its centroid), are skipped;
5. line fit: least squares ``x(t) = x0 + vx t``, ``y(t) = y0 + vy t`` over the tracked frames,
   refitted once without points whose residual exceeds max(1 px, 3 x the median residual).

Direction is in degrees counter-clockwise from "right" with y pointing up on screen:
``atan2(-vy, vx)`` in [0, 360) (right 0, up 90, left 180, down 270); speed ``hypot(vx, vy)`` in
pixels per frame of the video's own size. A shape moving less than :data:`MIN_SPEED`
(0.25 px/frame) has no direction (NaN).

Comparing (:func:`motion_errors`): each intended shape is matched to a measured one by colour;
``direction_error_deg = |angle difference|`` wrapped to [0, 180] (180 when the measured shape
has no direction or is missing), ``speed_error = |measured - intended|`` in px/frame (a missing
shape counts as speed 0) and ``speed_error_rel = speed_error / intended``, averaged over shapes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from stafinetune.data.synthetic import COLOURS, DIRECTIONS, SHAPES
from stafinetune.metrics.video_io import as_video

FOREGROUND_DISTANCE = 50.0
MIN_COLOUR_SEPARATION = 50.0
MIN_CLUSTER_FRACTION = 0.03
MIN_PIXELS = 4
VISIBLE_FRACTION = 0.85
MIN_SPEED = 0.25
_KMEANS_STEPS = 20
_MAX_CLUSTER_SAMPLES = 50_000


@dataclass(frozen=True)
class IntendedMotion:
    """One shape's intended motion: from a caption or a manifest's ``motion`` record."""

    colour: str | None
    shape: str | None
    direction_deg: float
    speed: float


@dataclass(frozen=True)
class MeasuredMotion:
    """One tracked shape: fitted velocity (px/frame), colour centre, frames used in the fit."""

    vx: float
    vy: float
    colour: tuple[float, float, float]
    frames_tracked: int

    @property
    def speed(self) -> float:
        return math.hypot(self.vx, self.vy)

    @property
    def direction_deg(self) -> float:
        """Screen direction in [0, 360), NaN below :data:`MIN_SPEED`."""
        return direction_degrees(self.vx, self.vy) if self.speed >= MIN_SPEED else math.nan


def direction_degrees(vx: float, vy: float) -> float:
    """Image velocity (y down) -> degrees counter-clockwise from right, y up: ``atan2(-vy, vx)``."""
    return math.degrees(math.atan2(-vy, vx)) % 360.0


def angle_error(a_deg: float, b_deg: float) -> float:
    """Absolute difference of two directions wrapped to [0, 180]; 180 if either is NaN."""
    if math.isnan(a_deg) or math.isnan(b_deg):
        return 180.0
    d = abs(a_deg - b_deg) % 360.0
    return min(d, 360.0 - d)


_DIRECTION_DEG = {name: direction_degrees(ux, uy) for name, (ux, uy) in DIRECTIONS.items()}
_ALTERNATIVES = "|".join(sorted(map(re.escape, DIRECTIONS), key=len, reverse=True))
_CAPTION_SHAPE = re.compile(
    rf"\b(?:a|an)\s+(?P<colour>{'|'.join(COLOURS)})\s+(?P<shape>{'|'.join(SHAPES)})\s+moving\s+"
    rf"(?P<direction>{_ALTERNATIVES})\s+at\s+(?P<speed>\d+(?:\.\d+)?)\s+pixels?\s+per\s+frame",
    re.IGNORECASE,
)


def parse_caption(caption: str) -> list[IntendedMotion]:
    """Every shape's motion stated in a synthetic-style caption (see ``caption_for``).

    ``"a red circle moving down and left at 3 pixels per frame on a grey background"`` ->
    ``[IntendedMotion("red", "circle", 225.0, 3.0)]``. Raises ValueError quoting the caption
    when it states no motion.
    """
    found = [
        IntendedMotion(
            colour=m["colour"].lower(),
            shape=m["shape"].lower(),
            direction_deg=_DIRECTION_DEG[m["direction"].lower()],
            speed=float(m["speed"]),
        )
        for m in _CAPTION_SHAPE.finditer(caption)
    ]
    if not found:
        raise ValueError(f"caption states no shape motion: {caption!r}")
    return found


def intended_from_manifest(motion: Mapping) -> list[IntendedMotion]:
    """A manifest ``motion`` record (``{"background", "shapes": [ShapeMotion dicts]}``) -> motions."""
    return [
        IntendedMotion(
            colour=s["colour"],
            shape=s["shape"],
            direction_deg=direction_degrees(s["vx"], s["vy"]),
            speed=math.hypot(s["vx"], s["vy"]),
        )
        for s in motion["shapes"]
    ]


def _colour_seeds(colours: np.ndarray, max_shapes: int) -> np.ndarray:
    """Up to ``max_shapes`` seed colours: the most populated 16-level colour bins, each more
    than :data:`MIN_COLOUR_SEPARATION` from the seeds already taken. ``(S, 3)``."""
    bins, inverse, counts = np.unique(
        (colours // 16).astype(np.int64), axis=0, return_inverse=True, return_counts=True
    )
    inverse = inverse.reshape(-1)
    seeds: list[np.ndarray] = []
    for b in np.argsort(-counts, kind="stable"):
        if counts[b] < MIN_CLUSTER_FRACTION * len(colours) or len(seeds) == max_shapes:
            break
        mean = colours[inverse == b].mean(0)
        if all(np.linalg.norm(mean - s) > MIN_COLOUR_SEPARATION for s in seeds):
            seeds.append(mean)
    return np.stack(seeds) if seeds else colours.mean(0, keepdims=True)


def _kmeans(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd steps on ``(N, 3)`` colours from the given ``(k, 3)`` centres -> (centres, labels)."""
    k = len(centres)
    for _ in range(_KMEANS_STEPS):
        labels = np.argmin(np.linalg.norm(points[:, None] - centres[None], axis=-1), axis=1)
        centres = np.stack(
            [points[labels == j].mean(0) if np.any(labels == j) else centres[j] for j in range(k)]
        )
    labels = np.argmin(np.linalg.norm(points[:, None] - centres[None], axis=-1), axis=1)
    return centres, labels


def _foreground_cores(frames: np.ndarray) -> np.ndarray:
    """``(F, H, W)`` bool: pixels far from the frame's median colour, eroded by one pixel."""
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)  # (F, 3)
    distance = np.linalg.norm(frames - background[:, None, None, :], axis=-1)  # (F, H, W)
    kernel = np.ones((3, 3), np.uint8)
    masks = (distance > FOREGROUND_DISTANCE).astype(np.uint8)
    return np.stack([cv2.erode(m, kernel) > 0 for m in masks])


def _shape_colours(frames: np.ndarray, cores: np.ndarray, max_shapes: int) -> np.ndarray:
    """``(S, 3)`` colour centres of the distinct shapes (S = 0, 1 or up to ``max_shapes``)."""
    colours = frames[cores]  # (N, 3)
    if len(colours) < MIN_PIXELS:
        return np.zeros((0, 3))
    if len(colours) > _MAX_CLUSTER_SAMPLES:  # an even subsample keeps it deterministic
        colours = colours[:: -(-len(colours) // _MAX_CLUSTER_SAMPLES)]
    centres, labels = _kmeans(colours, _colour_seeds(colours, max_shapes))
    counts = np.bincount(labels, minlength=len(centres))
    return centres[counts >= MIN_CLUSTER_FRACTION * len(colours)]


def _fit_velocity(t: np.ndarray, xy: np.ndarray) -> tuple[float, float]:
    """Least-squares slope ``(vx, vy)`` of ``xy (n, 2)`` over frames ``t (n,)``, one outlier pass."""
    keep = np.ones(len(t), bool)
    for _ in range(2):
        design = np.stack([np.ones(keep.sum()), t[keep]], axis=1)
        coef, *_ = np.linalg.lstsq(design, xy[keep], rcond=None)  # (2, 2): rows offset, slope
        residual = np.linalg.norm(xy - (coef[0] + t[:, None] * coef[1]), axis=1)
        limit = max(1.0, 3.0 * float(np.median(residual)))
        if (residual <= limit).sum() < 2 or np.array_equal(residual <= limit, keep):
            break
        keep = residual <= limit
    return float(coef[1][0]), float(coef[1][1])


def estimate_motion(
    video: torch.Tensor | np.ndarray, *, max_shapes: int = 2
) -> list[MeasuredMotion]:
    """Measure the straight-line motion of each flat-coloured shape (method in the module doc).

    ``video`` is uint8 RGB ``(F, H, W, 3)``. Returns one :class:`MeasuredMotion` per shape
    seen in at least two frames (none for an empty or unsegmentable video).
    """
    frames = as_video(video, min_frames=2).numpy().astype(np.float32)
    cores = _foreground_cores(frames)
    centres = _shape_colours(frames, cores, max_shapes)
    if len(centres) == 0:
        return []
    height, width = frames.shape[1:3]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    tracks: list[list[tuple[int, float, float, int]]] = [[] for _ in centres]  # t, x, y, n
    for f, (frame, core) in enumerate(zip(frames, cores, strict=True)):
        if not core.any():
            continue
        nearest = np.argmin(
            np.linalg.norm(frame[core][:, None] - centres[None], axis=-1), axis=1
        )  # (N,)
        for s in range(len(centres)):
            mine = nearest == s
            if mine.sum() >= MIN_PIXELS:
                tracks[s].append((f, xx[core][mine].mean(), yy[core][mine].mean(), mine.sum()))
    out = []
    for centre, track in zip(centres, tracks, strict=True):
        arr = np.asarray(track, dtype=np.float64).reshape(-1, 4)  # (n, [t, x, y, pixels])
        # A shape in front of another hides part of it: drop frames where it shows clearly
        # fewer pixels than usual, their centroids are pulled away from the centre.
        arr = arr[arr[:, 3] >= VISIBLE_FRACTION * np.percentile(arr[:, 3], 75)] if len(arr) else arr
        if len(arr) < 2:
            continue
        vx, vy = _fit_velocity(arr[:, 0], arr[:, 1:3])
        out.append(MeasuredMotion(vx, vy, tuple(float(c) for c in centre), len(arr)))
    return out


def _match(
    intended: Sequence[IntendedMotion], measured: Sequence[MeasuredMotion]
) -> list[MeasuredMotion | None]:
    """For each intended shape, the measured shape of nearest colour (one-to-one), or None."""
    slots: list[MeasuredMotion | None] = list(measured) + [None] * len(intended)

    def cost(i: IntendedMotion, m: MeasuredMotion | None) -> float:
        if m is None:
            return 1e6
        if i.colour is None or i.colour not in COLOURS:
            return 0.0
        return float(np.linalg.norm(np.subtract(COLOURS[i.colour], m.colour)))

    best = min(
        itertools.permutations(slots, len(intended)),
        key=lambda pick: sum(cost(i, m) for i, m in zip(intended, pick, strict=True)),
    )
    return list(best)


def motion_errors(
    video: torch.Tensor | np.ndarray | Sequence[MeasuredMotion],
    intended: str | Sequence[IntendedMotion],
) -> dict[str, float]:
    """Errors of measured vs intended motion, averaged over the intended shapes.

    ``video``: uint8 ``(F, H, W, 3)`` frames or the result of :func:`estimate_motion`;
    ``intended``: a caption or a list of :class:`IntendedMotion`. Returns
    ``{"direction_error_deg" in [0, 180], "speed_error" (px/frame), "speed_error_rel"}``.
    """
    if isinstance(intended, str):
        intended = parse_caption(intended)
    if not intended:
        raise ValueError("no intended motion to compare with")
    is_frames = isinstance(video, (torch.Tensor, np.ndarray))
    measured = estimate_motion(video, max_shapes=max(2, len(intended))) if is_frames else video
    direction, speed, relative = [], [], []
    for want, got in zip(intended, _match(intended, measured), strict=True):
        got_speed = got.speed if got is not None else 0.0
        got_direction = got.direction_deg if got is not None else math.nan
        direction.append(angle_error(got_direction, want.direction_deg))
        speed.append(abs(got_speed - want.speed))
        relative.append(speed[-1] / want.speed if want.speed > 0 else speed[-1])
    return {
        "direction_error_deg": float(np.mean(direction)),
        "speed_error": float(np.mean(speed)),
        "speed_error_rel": float(np.mean(relative)),
    }
