"""Write a JSONL manifest for a folder of videos with caption side-car files.

Every video (``.mp4 .mov .mkv .webm .avi``) under ``VIDEO_DIR`` becomes one line
``{"path": <relative path>, "caption": <text>}``; its caption is read from ``<name>.txt`` next
to it (or ``--captions`` folder, same relative path). Videos without a caption file are still
listed with an empty caption, so preprocessing counts them as ``missing_caption`` rather than
losing them silently.

    python -m stafinetune.data.manifest /videos/train --out /videos/train/manifest.jsonl
    stafinetune-preprocess data=folder data.manifest=/videos/train/manifest.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}


def build_manifest(video_dir: Path, out: Path, captions: Path | None = None) -> tuple[int, int]:
    """Write the manifest; return ``(videos listed, videos without a caption file)``."""
    video_dir = video_dir.expanduser().resolve()
    caption_root = (captions or video_dir).expanduser().resolve()
    videos = sorted(p for p in video_dir.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    missing = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for video in videos:
            rel = video.relative_to(video_dir)
            text_file = (caption_root / rel).with_suffix(".txt")
            caption = text_file.read_text().strip() if text_file.exists() else ""
            missing += not caption
            fh.write(json.dumps({"path": str(rel), "caption": caption}) + "\n")
    return len(videos), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: VIDEO_DIR/manifest.jsonl")
    parser.add_argument("--captions", type=Path, default=None, help="folder of .txt captions")
    args = parser.parse_args(argv)
    out = args.out or args.video_dir / "manifest.jsonl"
    n, missing = build_manifest(args.video_dir, out, args.captions)
    print(f"wrote {n} videos to {out} ({missing} without a caption)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
