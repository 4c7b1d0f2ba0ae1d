"""Offline video metrics: VBench-style temporal quality, fidelity to a reference, and motion.

Public entry points::

    score_video(video, *, reference=None, caption=None, dino_path=None, clip_path=None)
    score_folder(videos_dir, *, reference_dir=None, captions=None, dino_path=None, clip_path=None)
    read_video(path) -> uint8 (F, H, W, 3)
    METRIC_TABLE                       # metric -> (exact / proxy, formula)

Nothing downloads: DINO / CLIP weights are local transformers folders or absent (then a
documented pixel proxy is used and reported in ``feature_source``). Modules: ``video_io``
(decoding), ``vbench`` (temporal metrics), ``features`` (DINO / CLIP / pixel features),
``flow`` (OpenCV optical flow), ``fidelity`` (PSNR, SSIM, MS-SSIM, VMAF, latent gap),
``motion`` (measured vs captioned motion of the synthetic clips), ``score`` (reports).
"""

from stafinetune.metrics.fidelity import latent_gap
from stafinetune.metrics.score import METRIC_TABLE, score_folder, score_video
from stafinetune.metrics.video_io import VideoReadError, load_video, read_video

__all__ = [
    "METRIC_TABLE",
    "VideoReadError",
    "latent_gap",
    "load_video",
    "read_video",
    "score_folder",
    "score_video",
]
