"""Sources of (video, caption) records: a JSONL/CSV manifest, a local ``datasets`` dataset, or
the synthetic generator (which writes a manifest).

A source is a sequence: ``len(source)`` and ``source[i] -> VideoRecord``. Records of a
dataset source fetch their video bytes only when indexed, from the memory-mapped arrow table,
so a large dataset is never loaded whole and a source pickles cheaply into loader workers.
Malformed manifest lines and missing captions do not raise here: the record carries a
``problem`` that preprocessing reports like any bad video.

Video paths are confined to the data folder (a manifest's ``data.video_dir``, default its
own folder; a dataset's folder): a path that leaves it (``../``, an absolute path elsewhere,
``~``) is not read but reported as ``outside_data_dir``, unless
``data.allow_outside_paths=true``. The check is on the path as written (``..`` collapsed,
symlinks not followed), so a folder of symlinks the user put inside the data folder works.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stafinetune.data.config import DataConfig
from stafinetune.data.video import VideoRecord

PATH_KEYS = ("path", "video", "file", "filename")
CAPTION_KEYS = ("caption", "text", "prompt")


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


OUTSIDE = "outside_data_dir"  # the bad-input reason of a path outside the data folder


def confined_path(base: Path, path: str, allow_outside: bool) -> tuple[str, tuple[str, str] | None]:
    """``path`` resolved against the data folder ``base``, and the record's problem when it
    leaves that folder (``..`` collapsed, ``~`` expanded, symlinks not followed)."""
    full = os.path.normpath(Path(base).expanduser().absolute() / Path(path).expanduser())
    inside = Path(full).is_relative_to(os.path.normpath(Path(base).expanduser().absolute()))
    if inside or allow_outside:
        return full, None
    return full, (
        OUTSIDE,
        f"{path} is outside the data folder {base}; set data.allow_outside_paths=true to read it",
    )


def _opt_float(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    return float(value)


class ManifestSource:
    """Records from a ``.jsonl`` (one JSON object per line) or ``.csv`` (header row) manifest.

    Columns: ``path`` (or ``video``/``file``/``filename``; relative paths resolve against
    ``video_dir``, default the manifest's folder), ``caption`` (or ``text``/``prompt``), and the
    optional ``fps`` (overrides the container rate), ``start`` and ``end`` (seconds). A path
    outside ``video_dir`` is reported, not read, unless ``allow_outside``.
    """

    def __init__(
        self,
        manifest: str | Path,
        video_dir: str | Path | None = None,
        *,
        allow_outside: bool = False,
    ) -> None:
        self.manifest = Path(manifest).expanduser()
        if not self.manifest.is_file():
            raise FileNotFoundError(f"data.manifest: no such file {self.manifest}")
        self.video_dir = Path(video_dir).expanduser() if video_dir else self.manifest.parent
        self.allow_outside = allow_outside
        self.records = self._read()

    def _read(self) -> list[VideoRecord]:
        suffix = self.manifest.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(self.manifest) as fh:
                for line_no, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as exc:
                        row = {"_problem": f"manifest line {line_no}: {exc}", "_line": line_no}
                    row.setdefault("_line", line_no)
                    rows.append(row)
        elif suffix in (".csv", ".tsv"):
            with open(self.manifest, newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                rows = [dict(row, _line=i + 2) for i, row in enumerate(reader)]
        else:
            raise ValueError(f"data.manifest must be .jsonl or .csv, got {self.manifest.name}")
        return [self._record(i, row) for i, row in enumerate(rows)]

    def _record(self, index: int, row: dict[str, Any]) -> VideoRecord:
        label = f"{self.manifest.name}:{row['_line']}"
        if "_problem" in row:
            return VideoRecord(
                index=index, caption="", label=label, problem=("bad_manifest", row["_problem"])
            )
        path = _first(row, PATH_KEYS)
        caption = _first(row, CAPTION_KEYS)
        problem = None
        try:
            fps, start, end = (_opt_float(row, k) for k in ("fps", "start", "end"))
        except (TypeError, ValueError) as exc:
            fps = start = end = None
            problem = ("bad_range", f"fps/start/end: {exc}")
        full = None
        if path is None:
            problem = ("bad_manifest", "no path column")
        else:
            full, outside = confined_path(self.video_dir, str(path), self.allow_outside)
            problem = outside or problem
        return VideoRecord(
            index=index,
            caption=str(caption).strip() if caption is not None else "",
            path=full,
            fps=fps,
            start=start,
            end=end,
            label=str(path) if path is not None else label,
            problem=problem,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> VideoRecord:
        return self.records[i]


class DatasetSource:
    """Records from a local Hugging Face ``datasets`` dataset (no hub access).

    ``path`` is a ``save_to_disk`` folder (Dataset or DatasetDict), a folder of ``.parquet`` /
    ``.arrow`` files, or one such file. The video column holds a path (relative paths resolve
    against the dataset folder), encoded bytes, or a ``{"bytes", "path"}`` dict (the layout of
    ``datasets.Video(decode=False)``); the caption column holds strings. A path outside the
    dataset folder is reported, not read, unless ``allow_outside``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str | None = None,
        video_column: str = "video",
        caption_column: str = "caption",
        cache_dir: str | Path | None = None,
        allow_outside: bool = False,
    ) -> None:
        self.path = Path(path).expanduser()
        self.allow_outside = allow_outside
        # Where `datasets` converts parquet files to arrow (never inside the user's dataset).
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.video_column = video_column
        self.caption_column = caption_column
        self.base = self.path if self.path.is_dir() else self.path.parent
        self.dataset = self._load(split)
        missing = [c for c in (video_column, caption_column) if c not in self.dataset.column_names]
        if missing:
            field = "data.video_column" if video_column in missing else "data.caption_column"
            raise ValueError(
                f"{field}: column {missing[0]!r} not in dataset {self.path} "
                f"(columns: {self.dataset.column_names})"
            )
        self.dataset = self.dataset.select_columns([video_column, caption_column])
        feature = self.dataset.features[video_column]
        if type(feature).__name__ == "Video":
            import datasets

            self.dataset = self.dataset.cast_column(video_column, datasets.Video(decode=False))

    def _load(self, split: str | None):
        import datasets

        if not self.path.exists():
            raise FileNotFoundError(f"data.dataset_path: no such file or folder {self.path}")
        if self.path.is_dir() and (
            (self.path / "dataset_info.json").exists() or (self.path / "dataset_dict.json").exists()
        ):
            ds = datasets.load_from_disk(str(self.path))
        else:
            files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*"))
            parquet = [str(f) for f in files if f.suffix == ".parquet"]
            arrow = [str(f) for f in files if f.suffix == ".arrow"]
            if parquet:
                cache_dir = str(self.cache_dir) if self.cache_dir else None
                ds = datasets.Dataset.from_parquet(parquet, cache_dir=cache_dir)
            elif arrow:
                ds = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in arrow])
            else:
                raise ValueError(
                    f"data.dataset_path: {self.path} is neither a save_to_disk folder nor holds "
                    ".parquet/.arrow files"
                )
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
            if split not in ds:
                raise ValueError(f"data.dataset_split: choose one of {list(ds)}, got {split!r}")
            ds = ds[split]
        return ds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> VideoRecord:
        row = self.dataset[int(i)]
        value, caption = row[self.video_column], row[self.caption_column]
        caption = str(caption).strip() if caption is not None else ""
        label = f"{self.path.name}[{i}]"
        path, data = None, None
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, str):
            path = value
        if data is not None:
            return VideoRecord(index=int(i), caption=caption, data=bytes(data), label=label)
        if path:
            full, outside = confined_path(self.base, path, self.allow_outside)
            return VideoRecord(index=int(i), caption=caption, path=full, label=f"{label} {path}",
                               problem=outside)  # fmt: skip
        return VideoRecord(
            index=int(i), caption=caption, label=label,
            problem=("bad_manifest", f"column {self.video_column!r} holds {type(value).__name__}"),
        )  # fmt: skip


class Subset:
    """The first ``n`` records of a source (``data.max_samples``)."""

    def __init__(self, source, n: int) -> None:
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> VideoRecord:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]


def synthetic_dir(cfg: DataConfig) -> Path:
    """Folder of the synthetic clips for this config (reused across runs)."""
    from stafinetune.data.synthetic import SYNTHETIC_VERSION

    key = (
        f"v{SYNTHETIC_VERSION}_n{cfg.num_clips}_f{cfg.synthetic_frames}_{cfg.synthetic_height}x{cfg.synthetic_width}"
        f"_fps{cfg.synthetic_fps}_s{cfg.synthetic_seed}"
    )
    return cfg.data_root() / "synthetic" / key


def build_source(cfg: DataConfig, *, generate: bool = True):
    """The record source of ``cfg``; for ``synthetic`` generates the clips first if needed."""
    if cfg.source == "synthetic":
        from stafinetune.data.synthetic import generate_synthetic

        out = synthetic_dir(cfg)
        manifest = out / "manifest.jsonl"
        if generate:
            manifest = generate_synthetic(
                out,
                num_clips=cfg.num_clips,
                frames=cfg.synthetic_frames,
                height=cfg.synthetic_height,
                width=cfg.synthetic_width,
                fps=cfg.synthetic_fps,
                seed=cfg.synthetic_seed,
            )
        source = ManifestSource(manifest)
    elif cfg.source == "folder":
        source = ManifestSource(cfg.manifest, cfg.video_dir, allow_outside=cfg.allow_outside_paths)
    else:
        source = DatasetSource(
            cfg.dataset_path,
            split=cfg.dataset_split,
            video_column=cfg.video_column,
            caption_column=cfg.caption_column,
            cache_dir=cfg.data_root() / "hf_cache",
            allow_outside=cfg.allow_outside_paths,
        )
    if cfg.max_samples is not None:
        source = Subset(source, cfg.max_samples)
    return source
