"""Score one video or a folder of mp4s with every offline metric, as a JSON-safe report.

Per video (:func:`score_video`), always:

* ``temporal_flickering``, ``dynamic_degree``, ``motion_smoothness``,
  ``subject_consistency``, ``background_consistency`` (:mod:`.vbench`), and
  ``feature_source``, a string naming the features of the two consistency metrics, e.g.
  ``"subject=pixel_proxy background=pixel_proxy"`` or ``"subject=dino:vit background=clip:clip"``;

with a reference video (same shape): ``psnr``, ``ssim``, ``ms_ssim`` and, when vmaf-torch is
installed, ``vmaf`` (:mod:`.fidelity`); with a caption or manifest motion:
``motion_direction_error_deg``, ``motion_speed_error``, ``motion_speed_error_rel``
(:mod:`.motion`).

JSON safety: PSNR of identical clips (inf) is reported as :data:`~.fidelity.PSNR_CAP_DB`
(100.0); every other value is a finite float (or the ``feature_source`` string).

:data:`METRIC_TABLE` lists each metric as exact or proxy with its formula.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from stafinetune.metrics.features import FrameFeatures, build_frame_features
from stafinetune.metrics.fidelity import PSNR_CAP_DB, VMAF_AVAILABLE, fidelity_metrics
from stafinetune.metrics.motion import IntendedMotion, intended_from_manifest, motion_errors
from stafinetune.metrics.vbench import (
    background_consistency,
    dynamic_degree,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)
from stafinetune.metrics.video_io import as_video, load_video

METRIC_TABLE: dict[str, tuple[str, str]] = {
    "temporal_flickering": ("exact", "(255 - mean_i MAE(f_i, f_i+1)) / 255"),
    "dynamic_degree": (
        "proxy (Farneback flow for RAFT)",
        "1 if #{pairs: mean top-5% |flow| > 6*min(H,W)/256} >= round(4*F/16)",
    ),
    "motion_smoothness": (
        "proxy (flow-warped midpoints for AMT)",
        "(255 - mean_odd MAE(f_odd, interp(f_odd-1, f_odd+1))) / 255",
    ),
    "subject_consistency": (
        "exact with DINO weights, else proxy (pixel features)",
        "mean_i>=1 (max(0,cos(d_i,d_i-1)) + max(0,cos(d_i,d_0))) / 2",
    ),
    "background_consistency": (
        "exact with CLIP weights, else proxy (pixel features)",
        "same as subject_consistency with CLIP image embeddings",
    ),
    "psnr": ("exact", f"10 log10(255^2 / MSE) over the clip; inf reported as {PSNR_CAP_DB:g}"),
    "ssim": ("exact", "Wang 2004 SSIM, Gaussian 11 / sigma 1.5, mean over frames and RGB"),
    "ms_ssim": ("exact from a 176-px short side, fewer scales below", "Wang 2003 MS-SSIM"),
    "vmaf": (
        "exact model (vmaf_v0.6.1 via vmaf-torch, luma from decoded RGB)"
        if VMAF_AVAILABLE
        else "unavailable: vmaf-torch is not installed",
        "mean over frames of VMAF(ref luma, video luma), clipped to [0, 100]",
    ),
    "motion_direction_error_deg": (
        "exact target, measured by segmentation + line fit",
        "|measured - intended direction| wrapped to [0, 180]",
    ),
    "motion_speed_error": ("exact target, measured", "|measured - intended speed| (px/frame)"),
    "motion_speed_error_rel": ("exact target, measured", "motion_speed_error / intended speed"),
}

Intended = str | Sequence[IntendedMotion]


def _finite(name: str, value: float) -> float:
    if name == "psnr" and value == math.inf:
        return PSNR_CAP_DB
    if not math.isfinite(value):
        raise ValueError(f"metric {name} is {value}")
    return float(value)


def score_video(
    video: torch.Tensor | np.ndarray,
    *,
    reference: torch.Tensor | np.ndarray | None = None,
    caption: Intended | None = None,
    dino_path: str | os.PathLike | FrameFeatures | None = None,
    clip_path: str | os.PathLike | FrameFeatures | None = None,
    fps: float | None = None,
) -> dict[str, float | str]:
    """Every applicable metric of one uint8 RGB video ``(F, H, W, 3)``, F >= 3.

    ``reference``: a video of the same shape (fidelity metrics; a different shape raises
    ValueError naming both). ``caption``: a caption string or intended motions (motion
    errors). ``dino_path`` / ``clip_path``: local weight folders, or extractors already built
    with :func:`~.features.build_frame_features` (so a loop loads them once); None uses the
    pixel proxy. ``fps``: the video's frame rate, for dynamic degree's 8-fps sampling (None:
    frames taken as given). Returns metric name -> float, plus the ``feature_source`` string.
    """
    video = as_video(video, min_frames=3)
    subject_features = build_frame_features(dino_path, "dino")
    background_features = build_frame_features(clip_path, "clip")
    out: dict[str, float | str] = {
        "temporal_flickering": temporal_flickering(video),
        "dynamic_degree": dynamic_degree(video, fps=fps),
        "motion_smoothness": motion_smoothness(video),
        "subject_consistency": subject_consistency(video, subject_features),
        "background_consistency": background_consistency(video, background_features),
    }
    if reference is not None:
        out.update(fidelity_metrics(video, reference))
    if caption is not None:
        errors = motion_errors(video, caption)
        out.update({f"motion_{name}": value for name, value in errors.items()})
    out = {name: _finite(name, value) for name, value in out.items()}
    out["feature_source"] = (
        f"subject={subject_features.source} background={background_features.source}"
    )
    return out


def load_captions(path: str | os.PathLike) -> dict[str, Intended]:
    """File name -> intended motion, from a JSONL manifest or a sample run's ``samples.json``.

    A manifest has one JSON object per line with ``path`` and ``caption`` (the synthetic
    data's also an exact ``motion`` record, used when present). ``samples.json`` (what
    ``stafinetune-sample`` writes) is one JSON object whose ``samples`` rows give each
    video's ``file`` and ``prompt``. Keys are base names.

    Raises:
        ValueError: naming the file (and line) when it is neither.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{os.fspath(path)} is not UTF-8 text") from None
    try:
        whole = json.loads(text)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict) and "samples" in whole:
        rows = whole["samples"]
        if not isinstance(rows, list) or not all(
            isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("prompt"), str)
            for r in rows
        ):
            raise ValueError(
                f"{os.fspath(path)}: 'samples' must be a list of rows with a file and a prompt "
                "(the samples.json of stafinetune-sample)"
            )
        return {os.path.basename(r["file"]): r["prompt"] for r in rows}
    out: dict[str, Intended] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)} line {number}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(
                f"{where} is not a JSON object: give a JSONL manifest (path, caption) or the "
                "samples.json of a stafinetune-sample run"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{where} has no path")
        try:
            intended = intended_from_manifest(row["motion"]) if row.get("motion") else None
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where} has a malformed motion record") from None
        if intended is None and not isinstance(row.get("caption"), str):
            raise ValueError(f"{where} has neither a caption nor a motion")
        out[os.path.basename(row["path"])] = intended if intended is not None else row["caption"]
    return out


def _mean(videos: Mapping[str, Mapping[str, float | str]]) -> dict[str, float | str]:
    """Per metric, the mean over the videos that have it; strings kept when all agree."""
    values: dict[str, list] = {}
    for scores in videos.values():
        if "error" in scores:
            continue
        for name, value in scores.items():
            values.setdefault(name, []).append(value)
    mean: dict[str, float | str] = {}
    for name, vals in values.items():
        if all(isinstance(v, str) for v in vals):
            mean[name] = vals[0] if len(set(vals)) == 1 else "mixed"
        else:
            mean[name] = float(np.mean(vals))
    return mean


def score_folder(
    videos_dir: str | os.PathLike,
    *,
    reference_dir: str | os.PathLike | None = None,
    captions: Mapping[str, Intended] | str | os.PathLike | None = None,
    dino_path: str | os.PathLike | None = None,
    clip_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Score every ``*.mp4`` directly in ``videos_dir`` (sorted by name).

    ``reference_dir``: reference mp4s matched by file name (fidelity metrics).
    ``captions``: file name -> caption (or intended motions), or the path of a JSONL manifest
    or of a sample run's ``samples.json`` (:func:`load_captions`); videos without one get no
    motion metrics. DINO / CLIP weights load once for the whole folder.

    Returns ``{"videos": {file name: {metric: value}}, "mean": {metric: mean}}``. A file that
    fails (unreadable, missing or mismatched reference, unparsable caption, ...) is recorded as
    ``{"error": "<exception type>: <message naming the file>"}`` and left out of the means; the
    other files are still scored. Each mean is over the videos that have that metric. Raises
    ValueError naming the folder when it holds no mp4.
    """
    folder = Path(videos_dir)
    if not folder.is_dir():
        raise ValueError(f"videos folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".mp4" and p.is_file())
    if not files:
        raise ValueError(f"videos folder {folder} holds no .mp4 files")
    if captions is not None and not isinstance(captions, Mapping):
        captions = load_captions(captions)
    subject_features = build_frame_features(dino_path, "dino")
    background_features = build_frame_features(clip_path, "clip")
    videos: dict[str, dict[str, float | str]] = {}
    for path in tqdm(files, desc="scoring videos", unit="video", disable=not progress):
        try:
            video, fps = load_video(path)
            reference = None
            if reference_dir is not None:
                reference, _ = load_video(Path(reference_dir) / path.name)
                if reference.shape != video.shape:
                    raise ValueError(
                        f"{path.name}: video {tuple(video.shape)} and reference "
                        f"{tuple(reference.shape)} differ in shape (F, H, W, 3)"
                    )
            videos[path.name] = score_video(
                video,
                reference=reference,
                caption=(captions or {}).get(path.name),
                dino_path=subject_features,
                clip_path=background_features,
                fps=fps or None,
            )
        except Exception as exc:  # one bad file must not stop the others: record it
            message = str(exc) if path.name in str(exc) else f"{path.name}: {exc}"
            videos[path.name] = {"error": f"{type(exc).__name__}: {message}"}
    return {"videos": videos, "mean": _mean(videos)}
