"""VBench-style temporal-quality metrics of one generated video, without VBench's networks.

Every function takes a uint8 RGB video ``(F, H, W, 3)`` (torch tensor or numpy array) and
returns a float. Each is marked **exact** (same formula and inputs as VBench, so the same
number) or **proxy** (VBench's formula with a weight-free stand-in for one of its networks).
The formulas follow VBench's own code (``vbench/temporal_flickering.py``,
``dynamic_degree.py``, ``motion_smoothness.py``, ``subject_consistency.py``,
``background_consistency.py``):

======================== ======= ==========================================================
metric                   kind    formula
======================== ======= ==========================================================
temporal_flickering      exact   (255 - mean_i MAE(f_i, f_{i+1})) / 255
dynamic_degree           proxy   1 if #{pairs: mean of top-5% |flow| > thres} >= count_num
motion_smoothness        proxy   (255 - mean_odd MAE(f_odd, interp(f_odd-1, f_odd+1))) / 255
subject_consistency      exact*  mean_{i>=1} (max(0, cos(d_i, d_{i-1})) + max(0, cos(d_i, d_0))) / 2
background_consistency   exact*  the same with CLIP image features c_i
======================== ======= ==========================================================

``*`` exact only with local DINO / CLIP weights (see :mod:`stafinetune.metrics.features`);
without them the features are the documented pixel proxy and the result is a proxy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stafinetune.metrics.features import FrameFeatures, PixelFeatures
from stafinetune.metrics.flow import optical_flow, warp
from stafinetune.metrics.video_io import as_video

# VBench's dynamic-degree constants (vbench/dynamic_degree.py): each frame pair's motion is the
# mean of its top 5% flow magnitudes; the threshold is 6 px at a 256-px short side, scaled
# linearly with the short side (and by max(1, 8 / fps) below 8 fps); a video is dynamic when
# at least round(4 * n / 16) of its n frames' pairs exceed it. VBench first samples the video
# at about 8 fps (every round(fps / 8)-th frame).
TOP_FRACTION = 0.05
THRESHOLD_PX_AT_256 = 6.0
REFERENCE_SIDE = 256.0
PAIRS_PER_16_FRAMES = 4.0
TARGET_FPS = 8.0


def _frames(video: torch.Tensor | np.ndarray, min_frames: int) -> np.ndarray:
    return as_video(video, min_frames=min_frames).numpy()


def temporal_flickering(video: torch.Tensor | np.ndarray) -> float:
    """Temporal flickering (**exact**, VBench's model-free formula): 1 = no change at all.

    ``score = (255 - mean_{i=0}^{F-2} mean_{h,w,c} |f_{i+1} - f_i|) / 255`` over uint8 RGB
    frames ``(F, H, W, 3)``, F >= 2.
    """
    frames = torch.from_numpy(_frames(video, 2)).float()  # (F, H, W, 3)
    mae = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))  # (F-1,)
    return float((255.0 - mae.double().mean()) / 255.0)


def flow_peak_magnitudes(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per adjacent frame pair, the mean of the largest 5% optical-flow magnitudes (px).

    ``m_i = mean(top_k(|flow(f_i -> f_{i+1})|))`` with ``k = int(0.05 * H * W)`` (at least 1),
    flow from OpenCV Farneback (:func:`~stafinetune.metrics.flow.optical_flow`) where VBench
    uses RAFT. Returns ``(F - 1,)`` float64.
    """
    frames = _frames(video, 2)
    _, height, width, _ = frames.shape
    k = max(1, int(height * width * TOP_FRACTION))
    peaks = []
    for a, b in zip(frames[:-1], frames[1:], strict=True):
        magnitude = np.linalg.norm(optical_flow(a, b), axis=-1).ravel()
        peaks.append(float(np.partition(magnitude, magnitude.size - k)[-k:].mean()))
    return np.asarray(peaks, dtype=np.float64)


def dynamic_degree_rule(
    num_frames: int, height: int, width: int, fps: float | None = None
) -> tuple[int, float, int]:
    """VBench's dynamic-degree sampling and thresholds: ``(stride, thres_px, count_num)``.

    ``stride = max(1, round(fps / 8))`` (1 when ``fps`` is None: frames are taken as given);
    ``thres = max(1, 8 / fps) * 6 * min(H, W) / 256``;
    ``count_num = round(4 * n / 16)`` with ``n = ceil(num_frames / stride)`` sampled frames
    (Python's round, as VBench: ties go to the even number).
    """
    stride = max(1, round(fps / TARGET_FPS)) if fps else 1
    factor = max(1.0, TARGET_FPS / fps) if fps else 1.0
    thres = factor * THRESHOLD_PX_AT_256 * min(height, width) / REFERENCE_SIDE
    sampled = -(-num_frames // stride)
    return stride, thres, round(PAIRS_PER_16_FRAMES * sampled / 16.0)


def dynamic_degree(video: torch.Tensor | np.ndarray, *, fps: float | None = None) -> float:
    """Dynamic degree (**proxy**: Farneback flow instead of RAFT): 1.0 if the video moves, else 0.0.

    Frames are sampled every ``stride`` frames, then with ``m_i`` from
    :func:`flow_peak_magnitudes` and ``(stride, thres, count_num)`` from
    :func:`dynamic_degree_rule`: ``1 if #{i : m_i > thres} >= count_num else 0``. At 17 frames
    of 128 px and 8 fps: thres = 3 px/frame, count_num = 4.
    """
    frames = _frames(video, 2)
    num_frames, height, width, _ = frames.shape
    stride, thres, count_num = dynamic_degree_rule(num_frames, height, width, fps)
    frames = frames[::stride]
    if len(frames) < 2:
        return 0.0
    moving = int((flow_peak_magnitudes(frames) > thres).sum())
    return 1.0 if moving >= count_num else 0.0


def interpolate_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The frame halfway between uint8 RGB frames ``a`` and ``b`` (``(H, W, 3)``), by flow warping.

    With ``F_ab`` and ``F_ba`` the Farneback flows, the flows from the middle frame are
    approximated linearly (Jiang et al. 2018, "Super SloMo", at t = 1/2):
    ``F_ma = (F_ba - F_ab) / 4``, ``F_mb = (F_ab - F_ba) / 4``, and
    ``mid = round((warp(a, F_ma) + warp(b, F_mb)) / 2)`` as uint8.
    """
    flow_ab, flow_ba = optical_flow(a, b), optical_flow(b, a)
    flow_ma = 0.25 * (flow_ba - flow_ab)
    mid = 0.5 * (
        warp(a.astype(np.float32), flow_ma) + warp(b.astype(np.float32), -flow_ma)
    )  # F_mb = -F_ma
    return np.clip(np.rint(mid), 0, 255).astype(np.uint8)


def motion_smoothness(video: torch.Tensor | np.ndarray) -> float:
    """Motion smoothness (**proxy**: flow-warped midpoints instead of AMT): 1 = perfectly predictable.

    As VBench: drop the odd frames, interpolate each back from its even neighbours, compare.
    ``score = (255 - mean_{j} mean_{h,w,c} |f_{2j+1} - interp(f_{2j}, f_{2j+2})|) / 255`` over
    ``j = 0 .. ceil(F/2) - 2`` (a trailing odd frame without a right neighbour is skipped),
    interp = :func:`interpolate_midpoint`. Needs F >= 3.
    """
    frames = _frames(video, 3)
    errors = []
    for j in range(1, len(frames) - 1, 2):
        mid = interpolate_midpoint(frames[j - 1], frames[j + 1])
        errors.append(np.abs(mid.astype(np.float32) - frames[j].astype(np.float32)).mean())
    return float((255.0 - np.mean(errors)) / 255.0)


def consistency_from_features(features: torch.Tensor) -> float:
    """VBench's consistency of per-frame features ``(F, D)``, F >= 2: 1 = all frames alike.

    With ``e_i = features_i / ||features_i||``:
    ``score = 1/(F-1) * sum_{i=1}^{F-1} (max(0, e_i . e_{i-1}) + max(0, e_i . e_0)) / 2``.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (F >= 2, D), got {tuple(features.shape)}")
    e = F.normalize(features.double(), dim=-1)
    to_previous = (e[1:] * e[:-1]).sum(-1).clamp(min=0.0)  # (F-1,)
    to_first = (e[1:] * e[:1]).sum(-1).clamp(min=0.0)
    return float(((to_previous + to_first) / 2).mean())


def subject_consistency(
    video: torch.Tensor | np.ndarray, features: FrameFeatures | None = None
) -> float:
    """Subject consistency: :func:`consistency_from_features` of DINO frame features.

    **Exact** when ``features`` is a :class:`~stafinetune.metrics.features.DinoFeatures`
    (VBench: DINO ViT-B/16 CLS token); **proxy** with the default
    :class:`~stafinetune.metrics.features.PixelFeatures`. ``features.source`` names which.
    """
    frames = as_video(video, min_frames=2)
    return consistency_from_features((features or PixelFeatures())(frames))


def background_consistency(
    video: torch.Tensor | np.ndarray, features: FrameFeatures | None = None
) -> float:
    """Background consistency: :func:`consistency_from_features` of CLIP image features.

    **Exact** when ``features`` is a :class:`~stafinetune.metrics.features.ClipFeatures`
    (VBench: CLIP ViT-B/32 image embedding); **proxy** with the default
    :class:`~stafinetune.metrics.features.PixelFeatures`.
    """
    frames = as_video(video, min_frames=2)
    return consistency_from_features((features or PixelFeatures())(frames))
