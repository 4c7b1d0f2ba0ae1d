"""Preprocessing: turn a source of captioned videos into a latent cache.

``prepare_data(cfg)`` is what the trainer calls at start-up and what the
``stafinetune-preprocess`` command runs. It is

* idempotent: a finished cache (``cache.json`` with the same fingerprint) returns at once;
* resumable: the source is cut into shards of ``data.shard_size`` records; a shard whose
  completion marker exists is never redone, so an interrupted run continues where it stopped
  (with any world size, since shard ``k`` is a fixed set of records);
* parallel: rank ``r`` of ``world_size`` does shards ``k % world_size == r``; rank 0 then
  writes the index. Ranks meet by polling the shard markers on the shared filesystem (no
  collectives), so it works the same under torchrun and for independent processes;
* robust: every bad record is skipped, counted per reason and listed in ``bad_inputs.jsonl``;
  the summary line says how many were kept.

With ``data.use_cache=false`` it validates every record the same way (decoding it) but stores
only the kept record indices and buckets; the loader then decodes and encodes on the fly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from stafinetune.data.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    shard_name,
    tensor_to_bytes,
    write_shard,
)
from stafinetune.data.config import DataConfig
from stafinetune.data.encoders import (
    build_image_encoder,
    build_text_encoder,
    build_video_encoder,
    encode_image_condition,
    glyph_encoder,
)
from stafinetune.data.sources import build_source, synthetic_dir
from stafinetune.data.video import BadVideo, load_clip
from stafinetune.errors import UserError, user_errors

# Fields that change what the cache holds (loader-only fields are left out on purpose).
_CONTENT_FIELDS = (
    "source", "manifest", "video_dir", "dataset_path", "dataset_split", "video_column",
    "caption_column", "max_samples", "num_clips", "synthetic_fps", "synthetic_frames",
    "synthetic_height", "synthetic_width", "synthetic_seed", "num_frames", "height", "width",
    "fps", "frame_stride", "buckets", "min_side", "max_pixels", "max_aspect_ratio",
    "video_encoder", "video_encoder_path", "text_encoder", "text_encoder_path",
    "text_encoder_2_path", "tokenizer_path", "tokenizer_2_path", "text_len", "text_dim",
    "pooled_dim", "latent_channels", "encoder_seed", "encoder_dtype", "sample_posterior",
    "cache_dtype", "shard_size", "use_cache",
)  # fmt: skip
# Fields of image-to-video data: they key the cache only when data.image_encoder is set, so
# text-to-video caches keep their fingerprints.
_IMAGE_FIELDS = ("image_encoder", "image_encoder_path", "image_processor_path", "image_dim")


def cache_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything that determines the cache content (incl. the manifest's size/mtime)."""
    content: dict[str, Any] = {name: getattr(cfg, name) for name in _CONTENT_FIELDS}
    for key in ("manifest", "video_dir", "dataset_path"):
        if content[key]:
            path = Path(content[key]).expanduser().resolve()
            content[key] = str(path)
            if path.is_file():
                stat = path.stat()
                content[key + "_stat"] = [stat.st_size, stat.st_mtime_ns]
    if cfg.source == "hf_dataset" and Path(content["dataset_path"]).is_dir():
        # A dataset rewritten in place must not reuse the old cache: hash its table files.
        root = Path(content["dataset_path"])
        content["dataset_files"] = sorted(
            [str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in root.rglob("*")
            if f.suffix in (".arrow", ".parquet", ".json") and ".hf_cache" not in f.parts
        )
    if cfg.allow_outside_paths:  # only when on: every other cache keeps its fingerprint
        content["allow_outside_paths"] = True
    if cfg.text_encoder == "hunyuanvideo15":  # the glyph stream's length keys only its caches
        content["text_2_len"] = cfg.text_2_len
    if cfg.image_encoder is not None:
        content |= {name: getattr(cfg, name) for name in _IMAGE_FIELDS}
        if cfg.image_encoder == "tiny":
            content["image_encoder_version"] = build_image_encoder(cfg).fingerprint()
    content["format"] = [CACHE_FORMAT, CACHE_VERSION]
    # the tiny encoders are code, not files: their version string keys the cache too, so a
    # change to them (e.g. the v2 per-channel normalisation) never reuses old latents
    if cfg.video_encoder == "tiny":
        content["video_encoder_version"] = build_video_encoder(cfg).fingerprint()
    if cfg.text_encoder == "tiny":
        content["text_encoder_version"] = build_text_encoder(cfg).fingerprint()
    if cfg.source == "synthetic":
        content["synthetic_dir"] = synthetic_dir(cfg).name  # carries the generator version
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir`` or ``<data root>/cache/<name>-<fingerprint>``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return cfg.data_root() / "cache" / f"{cfg.name}-{cache_fingerprint(cfg)}"


def _is_finished(cache_dir: Path, fingerprint: str) -> bool:
    index = cache_dir / "cache.json"
    if not index.exists():
        return False
    info = json.loads(index.read_text())
    if info.get("fingerprint") != fingerprint:
        raise RuntimeError(
            f"data.cache_dir: {cache_dir} holds a cache of another configuration "
            f"(fingerprint {info.get('fingerprint')} != {fingerprint}); choose another folder"
        )
    return True


def _wait_for(paths: list[Path], what: str, timeout_s: float) -> None:
    """Poll until every path exists (ranks of independent processes, no process group)."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            missing = [str(p) for p in paths if not p.exists()][:3]
            raise TimeoutError(f"gave up waiting {timeout_s:.0f}s for {what}: {missing} ...")
        time.sleep(0.5)


def _encode_pending(
    pending, video_encoder, text_encoder, image_encoder, cfg: DataConfig
) -> list[dict[str, Any]]:
    """Encode buffered clips (grouped by bucket: one batch per shape) into cache rows, with
    their image condition when there is an image encoder and their glyph states when the text
    encoder has a glyph stream."""
    rows = []
    captions = [record.caption for record, _, _ in pending]
    text, mask, pooled = text_encoder.encode(captions)  # (b, L, Dt), (b, L), (b, Dp)
    glyph = glyph_encoder(text_encoder)
    if glyph is not None:
        text_2, mask_2 = glyph.encode_glyph(captions)  # (b, L2, D2), (b, L2)
    by_bucket: dict[int, list[int]] = {}
    for j, (_, _, bucket) in enumerate(pending):
        by_bucket.setdefault(bucket, []).append(j)
    latents: dict[int, torch.Tensor] = {}
    extra: dict[int, dict[str, Any]] = {}  # the optional image and glyph columns per row
    for members in by_bucket.values():
        video = torch.stack([pending[j][1] for j in members]).to(cfg.device)  # (b, 3, F, H, W)
        with torch.no_grad():
            z = video_encoder.encode(video)  # (b, C, T, h, w)
        for j, zj in zip(members, z, strict=True):
            latents[j] = zj
        if cfg.image_encoder is not None:
            cond, embeds = encode_image_condition(video_encoder, image_encoder, video,
                                                  first_frame=cfg.image_encoder == "vae")
            for n, (j, cj) in enumerate(zip(members, cond, strict=True)):
                extra[j] = {"image_latents": tensor_to_bytes(cj, cfg.cache_dtype),
                            "image_embeds": None if embeds is None
                            else tensor_to_bytes(embeds[n], cfg.cache_dtype)}  # fmt: skip
    for j, (record, _, bucket) in enumerate(pending):
        n = int(mask[j].sum())
        if glyph is not None:
            n2 = int(mask_2[j].sum())
            extra[j] = extra.get(j, {}) | {
                "text_2_tokens": n2, "text_2": tensor_to_bytes(text_2[j, :n2], cfg.cache_dtype)
            }  # fmt: skip
        rows.append(
            {
                "index": record.index,
                "caption": record.caption,
                "label": record.label,
                "bucket": bucket,
                "latent_shape": list(latents[j].shape),
                "latents": tensor_to_bytes(latents[j], cfg.cache_dtype),
                "text_tokens": n,
                "text": tensor_to_bytes(text[j, :n], cfg.cache_dtype),
                "pooled": tensor_to_bytes(pooled[j], cfg.cache_dtype),
                **extra.get(j, {}),
            }
        )
    return rows


class _DecodedRecords(Dataset):
    """Decodes records in loader workers (``data.decode_workers``) while the main process encodes.

    Item ``j`` is ``(record without its bytes, video (3, F, H, W) or None, bucket or None,
    skip entry or None)``; bad inputs become skip entries, never exceptions.
    """

    def __init__(self, source, cfg: DataConfig, indices: list[int]) -> None:
        self.source, self.cfg, self.indices = source, cfg, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        record = self.source[i]
        try:
            video, bucket = load_clip(record, self.cfg)
        except BadVideo as exc:
            skip = {"index": i, "label": record.label, "reason": exc.reason, "detail": exc.detail}
            return replace(record, data=None), None, None, skip
        except Exception as exc:  # a decoder bug on one file must not end the run either
            skip = {"index": i, "label": record.label, "reason": "unreadable",
                    "detail": f"unexpected {type(exc).__name__}: {exc}"}  # fmt: skip
            return replace(record, data=None), None, None, skip
        return replace(record, data=None), video, bucket, None


def _identity(item):
    return item


def _shard_range(k: int, cfg: DataConfig, n_records: int) -> range:
    return range(k * cfg.shard_size, min(n_records, (k + 1) * cfg.shard_size))


def _process_shard(
    k: int, items, n_records: int, cfg: DataConfig, encoders, shard_dir: Path, bar
) -> None:
    """Consume shard ``k``'s decoded items from ``items``, encode them and write the shard."""
    span = _shard_range(k, cfg, n_records)
    lo, hi = span.start, span.stop
    rows: list[dict[str, Any]] = []
    kept: list[list[int]] = []
    skipped: list[dict[str, Any]] = []
    pending: list = []
    for _ in span:
        record, video, bucket, skip = next(items)
        if skip is not None:
            skipped.append(skip)
        else:
            kept.append([record.index, bucket])
            if encoders is not None:
                pending.append((record, video, bucket))
                if len(pending) >= cfg.encode_batch_size:
                    rows += _encode_pending(pending, *encoders, cfg)
                    pending = []
        bar.update(1)
        bar.set_postfix(
            kept=bar.kept + len(kept), skipped=bar.skipped + len(skipped), refresh=False
        )
    if pending:
        rows += _encode_pending(pending, *encoders, cfg)
    bar.kept += len(kept)
    bar.skipped += len(skipped)
    shapes = {str(row["bucket"]): row["latent_shape"] for row in rows}
    report = {
        "shard": k,
        "records": [lo, hi],
        "kept": kept,
        "skipped": skipped,
        "latent_shapes": shapes,
    }
    if encoders is not None:
        text_encoder, image_encoder = encoders[1:]
        report["text"] = {
            "text_len": text_encoder.text_len,
            "text_dim": text_encoder.text_dim,
            "pooled_dim": text_encoder.pooled_dim,
        }
        if image_encoder is not None:  # the cache info carries them beside the text sizes
            report["text"] |= {"image_tokens": image_encoder.image_tokens,
                               "image_dim": image_encoder.image_dim}  # fmt: skip
        elif cfg.image_encoder == "vae":  # the first frame's latent alone
            report["text"]["image_frames"] = 1
        elif cfg.image_encoder == "latents":  # the condition latents without image states
            report["text"]["image_states"] = False
        glyph = glyph_encoder(text_encoder)
        if glyph is not None:
            report["text"] |= {"text_2_len": glyph.text_2_len, "text_2_dim": glyph.text_2_dim}
        write_shard(shard_dir, k, rows, {"dtype": cfg.cache_dtype, **report["text"]}, report)
    else:
        shard_dir.mkdir(parents=True, exist_ok=True)
        marker = shard_dir / f"{shard_name(k)}.json"
        tmp = shard_dir / f".{shard_name(k)}.json.tmp"
        tmp.write_text(json.dumps(report))
        tmp.replace(marker)


def _finalize(
    cache_dir: Path,
    cfg: DataConfig,
    fingerprint: str,
    n_shards: int,
    n_records: int,
    t0: float,
) -> dict[str, Any]:
    """Merge the shard reports into bad_inputs.jsonl and write cache.json (rank 0, last)."""
    shard_dir = cache_dir / "shards"
    reasons: Counter[str] = Counter()
    buckets: Counter[int] = Counter()
    shard_rows, kept_records = [], []
    latent_shapes: dict[str, list[int]] = {}
    # Text sizes as the encoders reported them (records mode encodes nothing: the config's L).
    text_info: dict[str, int] = {"text_len": cfg.text_len}
    with open(cache_dir / ".bad_inputs.jsonl.tmp", "w") as bad:
        for k in range(n_shards):
            report = json.loads((shard_dir / f"{shard_name(k)}.json").read_text())
            for item in report["skipped"]:
                reasons[item["reason"]] += 1
                bad.write(json.dumps(item) + "\n")
            for _, bucket in report["kept"]:
                buckets[bucket] += 1
            shard_rows.append(len(report["kept"]))
            latent_shapes.update(report.get("latent_shapes", {}))
            text_info.update(report.get("text", {}))
            kept_records += report["kept"]
    (cache_dir / ".bad_inputs.jsonl.tmp").replace(cache_dir / "bad_inputs.jsonl")
    for stale in shard_dir.glob(".*.tmp"):  # leftovers of interrupted writers
        stale.unlink(missing_ok=True)
    kept = sum(shard_rows)
    info = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "mode": "latents" if cfg.use_cache else "records",
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": cfg.cache_dtype,
        **text_info,
        "buckets": cfg.all_buckets(),
        "bucket_counts": {str(b): c for b, c in sorted(buckets.items())},
        "latent_shapes": dict(sorted(latent_shapes.items())),
        "records": n_records,
        "kept": kept,
        "skipped": dict(sorted(reasons.items())),
        "shards": [shard_name(k) for k in range(n_shards)],
        "shard_rows": shard_rows,
        "seconds": round(time.monotonic() - t0, 2),
        "config": asdict(cfg),
    }
    if not cfg.use_cache:
        info["kept_records"] = kept_records
    tmp = cache_dir / ".cache.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(cache_dir / "cache.json")
    return info


def summary_line(info: dict[str, Any], cache_dir: Path) -> str:
    """One line: how many records were kept, how many skipped and why, and where it went."""
    skipped = sum(info["skipped"].values())
    why = ", ".join(f"{n} {reason}" for reason, n in info["skipped"].items())
    return (
        f"[data] kept {info['kept']} of {info['records']} records"
        + (f", skipped {skipped} ({why}); see {cache_dir / 'bad_inputs.jsonl'}" if skipped else "")
        + f" -> {cache_dir} ({info['mode']}, built in {info['seconds']:.1f}s)"
    )


def prepare_data(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    verbose: bool = True,
    timeout_s: float = 24 * 3600.0,
) -> Path:
    """Make sure the cache of ``cfg`` exists (building what is missing) and return its folder.

    For the synthetic default this writes the mp4 clips, decodes them back with decord and
    encodes them. Rank ``rank`` of ``world_size`` processes its share of the shards; every rank
    returns only once the whole cache is finished. Prints a tqdm bar and a summary line (rank 0).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    t0 = time.monotonic()
    fingerprint = cache_fingerprint(cfg)
    cache_dir = resolve_cache_dir(cfg)
    if _is_finished(cache_dir, fingerprint):
        if verbose and rank == 0:
            print(
                summary_line(json.loads((cache_dir / "cache.json").read_text()), cache_dir)
                + " [cached]"
            )
        return cache_dir

    if cfg.source == "synthetic" and rank != 0:  # rank 0 writes the clips, the others wait
        _wait_for([synthetic_dir(cfg) / "manifest.jsonl"], "the synthetic clips", timeout_s)
        source = build_source(cfg, generate=False)
    elif cfg.source == "synthetic":
        source = build_source(cfg)
    else:
        with user_errors():  # a missing or malformed manifest / dataset names its field
            source = build_source(cfg)

    n_records = len(source)
    if n_records == 0:
        field = "data.manifest" if cfg.source == "folder" else "data.dataset_path"
        raise UserError(f"{field}={getattr(cfg, field[5:])} holds no records")
    n_shards = max(1, -(-n_records // cfg.shard_size))
    shard_dir = cache_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    mine = [k for k in range(n_shards) if k % world_size == rank]
    todo = [k for k in mine if not (shard_dir / f"{shard_name(k)}.json").exists()]
    todo_records = [i for k in todo for i in _shard_range(k, cfg, n_records)]

    if todo:
        encoders = None
        if cfg.use_cache:
            encoders = (build_video_encoder(cfg), build_text_encoder(cfg), build_image_encoder(cfg))
        decoded = DataLoader(
            _DecodedRecords(source, cfg, todo_records),
            batch_size=None,
            num_workers=cfg.decode_workers,
            collate_fn=_identity,
            prefetch_factor=2 if cfg.decode_workers > 0 else None,
        )
        items = iter(decoded)
        with tqdm(
            total=len(todo_records), desc=f"[data] encode {cfg.name} (rank {rank})", unit="clip",
            position=rank, disable=not verbose, dynamic_ncols=True,
        ) as bar:  # fmt: skip
            bar.kept = bar.skipped = 0
            for k in todo:
                _process_shard(k, items, n_records, cfg, encoders, shard_dir, bar)

    # Ranks meet through the files, not collectives: a process-group barrier would time out
    # while a slow rank is still encoding, and independent processes have no group at all.
    markers = [shard_dir / f"{shard_name(k)}.json" for k in range(n_shards)]
    if rank == 0:
        _wait_for(markers, "the other ranks' shards", timeout_s)
        info = _finalize(cache_dir, cfg, fingerprint, n_shards, n_records, t0)
        if verbose:
            print(summary_line(info, cache_dir), flush=True)
    else:
        _wait_for([cache_dir / "cache.json"], "rank 0 to finish the cache index", timeout_s)
    return cache_dir
