"""Offline video metrics: VBench-style temporal quality, fidelity to a reference, and motion."""

from stafinetune.metrics.video_io import VideoReadError, load_video, read_video

__all__ = ["VideoReadError", "load_video", "read_video"]
