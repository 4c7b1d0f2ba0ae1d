"""The latent cache: sharded Arrow files with shape and dtype metadata.

Layout of a cache folder (documented for users in docs/data.md)::

    <cache>/shards/shard-00000.arrow   Arrow IPC *stream* files, one per ``data.shard_size``
    <cache>/shards/shard-00000.json    source records; the JSON is written last and marks
                                       the shard complete (the unit of resumption)
    <cache>/cache.json                 written once every shard exists: format, fingerprint,
                                       config, shapes, counts per reason, shard list
    <cache>/bad_inputs.jsonl           one line per skipped record: index, label, reason, detail

Arrow columns: ``index`` int64 (record index in the source), ``caption`` string, ``label``
string, ``bucket`` int32, ``latent_shape`` list<int32> ``[C, T, H, W]``, ``latents`` binary,
``text_tokens`` int32 (valid text tokens), ``text`` binary ``(text_tokens, Dt)`` (valid tokens
only; the loader pads to ``L``), ``pooled`` binary ``(Dp,)``. Binary tensors are C-contiguous
little-endian in the dtype of the schema metadata key ``stafinetune`` (JSON: ``dtype``,
``text_dim``, ``pooled_dim``, ``text_len``). The stream format is the one ``datasets`` uses,
so ``datasets.Dataset.from_file(shard)`` opens a shard too.

Image-to-video caches (``data.image_encoder`` set) add ``image_latents`` binary (the latents
of the conditioning video, shaped like ``latents``) and ``image_embeds`` binary
``(image_tokens, image_dim)`` (the image encoder's states of the first frame); the schema
metadata then also holds ``image_tokens`` and ``image_dim``. With ``data.image_encoder=vae``
(Wan 2.2 TI2V) ``image_latents`` is the first frame's latent alone ``(C, 1, H, W)``
(metadata ``image_frames: 1``) and ``image_embeds`` is null. With ``data.image_encoder=latents``
(Wan 2.2 I2V-A14B) ``image_latents`` are the condition latents, ``image_embeds`` is null and
the metadata holds ``image_states: false``.

Caches of a text encoder with a glyph stream (``data.text_encoder=hunyuanvideo15``) add
``text_2_tokens`` int32 (valid glyph tokens, 0 for a caption without quoted text) and
``text_2`` binary ``(text_2_tokens, text_2_dim)``; the metadata then also holds ``text_2_len``
and ``text_2_dim``. Other caches keep the schema they had.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from stafinetune.data.encoders import torch_dtype

CACHE_FORMAT = "stafinetune-latent-cache"
CACHE_VERSION = 1

SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("caption", pa.string()),
        ("label", pa.string()),
        ("bucket", pa.int32()),
        ("latent_shape", pa.list_(pa.int32())),
        ("latents", pa.binary()),
        ("text_tokens", pa.int32()),
        ("text", pa.binary()),
        ("pooled", pa.binary()),
    ]
)


IMAGE_COLUMNS = [("image_latents", pa.binary()), ("image_embeds", pa.binary())]
GLYPH_COLUMNS = [("text_2_tokens", pa.int32()), ("text_2", pa.binary())]


def cache_schema(image: bool, glyph: bool = False) -> pa.Schema:
    """The shard schema: ``SCHEMA``, plus the image columns of an image-to-video cache and
    the glyph columns of a cache with a glyph stream."""
    extra = [*(IMAGE_COLUMNS if image else []), *(GLYPH_COLUMNS if glyph else [])]
    return pa.schema([*SCHEMA, *extra])


def tensor_to_bytes(x: torch.Tensor, dtype: str) -> bytes:
    """Cast to ``dtype`` and serialise the contiguous buffer (bfloat16 via its int16 bits)."""
    y = x.detach().to("cpu", torch_dtype(dtype)).contiguous()
    if y.dtype == torch.bfloat16:
        y = y.view(torch.int16)
    return y.numpy().tobytes()


def bytes_to_tensor(buf, dtype: str, shape: list[int]) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; returns a float32 tensor of ``shape``."""
    if dtype == "bfloat16":
        arr = np.frombuffer(buf, dtype=np.int16).copy()
        t = torch.from_numpy(arr).view(torch.bfloat16)
    else:
        arr = np.frombuffer(buf, dtype=np.float32 if dtype == "float32" else np.float16).copy()
        t = torch.from_numpy(arr)
    return t.reshape(shape).float()


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def write_shard(
    shard_dir: Path,
    k: int,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    report: dict[str, Any],
) -> None:
    """Write shard ``k`` atomically: the Arrow file, then its JSON completion marker."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    image = any(key in meta for key in ("image_dim", "image_frames", "image_states"))  # i2v
    schema = cache_schema(image, "text_2_dim" in meta)
    schema = schema.with_metadata({"stafinetune": json.dumps(meta)})
    columns = {name: [row[name] for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    final = shard_dir / f"{shard_name(k)}.arrow"
    tmp = shard_dir / f".{shard_name(k)}.{os.getpid()}.arrow.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=16)
    os.replace(tmp, final)
    marker_tmp = shard_dir / f".{shard_name(k)}.{os.getpid()}.json.tmp"
    marker_tmp.write_text(json.dumps(report))
    os.replace(marker_tmp, shard_dir / f"{shard_name(k)}.json")


def read_table(path: Path) -> pa.Table:
    """Memory-map one shard (zero copy). The map stays open as long as the table's buffers live."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


@dataclass
class CacheSample:
    index: int
    caption: str
    bucket: int
    latents: torch.Tensor  # (C, T, H, W) float32
    text: torch.Tensor  # (n, Dt) float32, valid tokens only
    pooled: torch.Tensor  # (Dp,) float32
    image_latents: torch.Tensor | None = None  # (C, T, H, W) float32, image-to-video caches
    image_embeds: torch.Tensor | None = None  # (N, Di) float32, image-to-video caches
    text_2: torch.Tensor | None = None  # (n2, D2) float32, valid glyph tokens only


class LatentCache:
    """Random access to a finished cache folder; tables are memory-mapped lazily per process.

    ``len(cache)``; ``cache[i] -> CacheSample``; ``cache.buckets`` (bucket id per sample) and
    ``cache.latent_shapes`` come from the small columns only. Pickles as its path, so loader
    workers re-open the memory maps instead of copying data.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        index_file = self.cache_dir / "cache.json"
        if not index_file.exists():
            raise FileNotFoundError(
                f"no finished latent cache at {self.cache_dir} (missing cache.json): run "
                "prepare_data(cfg) or `stafinetune-preprocess` first"
            )
        self.info = json.loads(index_file.read_text())
        if self.info.get("format") != CACHE_FORMAT or self.info.get("version") != CACHE_VERSION:
            raise ValueError(f"{index_file}: not a {CACHE_FORMAT} v{CACHE_VERSION} cache")
        self.dtype: str = self.info["dtype"]
        self.shards = [self.cache_dir / "shards" / f"{name}.arrow" for name in self.info["shards"]]
        counts = self.info["shard_rows"]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        self._tables: dict[int, pa.Table] = {}
        buckets, shapes, indices = [], [], []
        for k in range(len(self.shards)):
            if counts[k] == 0:
                continue
            table = self._table(k)
            buckets += table.column("bucket").to_pylist()
            shapes += table.column("latent_shape").to_pylist()
            indices += table.column("index").to_pylist()
        self.buckets: list[int] = buckets
        self.latent_shapes: list[list[int]] = shapes
        self.source_indices: list[int] = indices

    def _table(self, k: int) -> pa.Table:
        if k not in self._tables:
            self._tables[k] = read_table(self.shards[k])
        return self._tables[k]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> CacheSample:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)}")
        k = bisect_right(self.offsets, i) - 1
        row = self._table(k).slice(i - self.offsets[k], 1).to_pylist()[0]
        n = row["text_tokens"]
        extra = {}  # the optional image and glyph columns
        if "image_latents" in row:
            shape = list(row["latent_shape"])  # (C, T, H, W); T = 1 for a first-frame latent
            shape[1] = self.info.get("image_frames", shape[1])
            embeds = row["image_embeds"]
            extra = {
                "image_latents": bytes_to_tensor(row["image_latents"], self.dtype, shape),
                "image_embeds": None if embeds is None else bytes_to_tensor(
                    embeds, self.dtype, [self.info["image_tokens"], self.info["image_dim"]]
                ),
            }  # fmt: skip
        if "text_2" in row:
            n2 = [row["text_2_tokens"], self.info["text_2_dim"]]
            extra["text_2"] = bytes_to_tensor(row["text_2"], self.dtype, n2)
        return CacheSample(
            index=row["index"],
            caption=row["caption"],
            bucket=row["bucket"],
            latents=bytes_to_tensor(row["latents"], self.dtype, row["latent_shape"]),
            text=bytes_to_tensor(row["text"], self.dtype, [n, self.info["text_dim"]]),
            pooled=bytes_to_tensor(row["pooled"], self.dtype, [self.info["pooled_dim"]]),
            **extra,
        )
