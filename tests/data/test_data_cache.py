"""Latent cache: round-trip equality, dtypes, idempotence, resumption, parallel ranks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from data_media import small_config

from stafinetune.data import (
    build_text_encoder,
    build_train_loader,
    build_video_encoder,
    prepare_data,
)
from stafinetune.data import preprocess as pre
from stafinetune.data.cache import LatentCache, bytes_to_tensor, read_table, tensor_to_bytes
from stafinetune.data.sources import build_source
from stafinetune.data.video import load_clip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tensor_bytes_round_trip_is_exact_in_the_cache_dtype(dtype):
    x = torch.randn(3, 5, 7)
    back = bytes_to_tensor(tensor_to_bytes(x, dtype), dtype, [3, 5, 7])
    assert back.dtype == torch.float32
    assert torch.equal(back, x.to(getattr(torch, dtype)).float())


def test_cache_holds_exactly_what_the_encoders_produce(prepared):
    cfg, cache_dir = prepared
    cache = LatentCache(cache_dir)
    assert len(cache) == 12 and cache.info["kept"] == 12 and cache.info["shard_rows"] == [5, 5, 2]
    assert cache.info["latent_shapes"] == {"0": [16, 5, 16, 16]}
    assert (cache.info["text_len"], cache.info["text_dim"], cache.info["pooled_dim"]) == (
        32,
        32,
        32,
    )
    source = build_source(cfg, generate=False)
    venc, tenc = build_video_encoder(cfg), build_text_encoder(cfg)
    for pos in (0, 7, 11):
        sample = cache[pos]
        record = source[sample.index]
        video, _ = load_clip(record, cfg)
        z = venc.encode(video[None])[0]
        text, mask, pooled = tenc.encode([record.caption])
        assert sample.caption == record.caption
        assert torch.equal(sample.latents, z)
        assert torch.equal(sample.text, text[0, : int(mask.sum())])
        assert torch.equal(sample.pooled, pooled[0])


def test_shards_open_with_datasets_and_carry_metadata(prepared):
    import datasets

    _, cache_dir = prepared
    ds = datasets.Dataset.from_file(str(cache_dir / "shards" / "shard-00000.arrow"))
    assert len(ds) == 5 and ds[0]["latent_shape"] == [16, 5, 16, 16]
    meta = json.loads(
        read_table(cache_dir / "shards" / "shard-00000.arrow").schema.metadata[b"stafinetune"]
    )
    assert meta == {"dtype": "float32", "text_len": 32, "text_dim": 32, "pooled_dim": 32}


def test_second_call_finds_the_cache_without_work(prepared, monkeypatch):
    cfg, cache_dir = prepared

    def boom(*args, **kwargs):
        raise AssertionError("a finished cache must not be rebuilt")

    monkeypatch.setattr(pre, "_process_shard", boom)
    monkeypatch.setattr(pre, "build_source", boom)
    assert prepare_data(cfg, verbose=False) == cache_dir


def test_interrupted_run_resumes_with_the_missing_shards_only(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, num_clips=9, shard_size=3)
    real = pre._process_shard
    done = []

    def crash_on_second(k, *args, **kwargs):
        if len(done) == 1:
            raise KeyboardInterrupt("simulated interruption")
        real(k, *args, **kwargs)
        done.append(k)

    monkeypatch.setattr(pre, "_process_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, verbose=False)
    assert done == [0] and not (pre.resolve_cache_dir(cfg) / "cache.json").exists()

    redone = []

    def record(k, *args, **kwargs):
        redone.append(k)
        real(k, *args, **kwargs)

    monkeypatch.setattr(pre, "_process_shard", record)
    cache_dir = prepare_data(cfg, verbose=False)
    assert redone == [1, 2]
    assert sorted(LatentCache(cache_dir).source_indices) == list(range(9))


def test_two_ranks_split_shards_and_agree(tmp_path):
    cfg = small_config(tmp_path, num_clips=8, shard_size=2)
    results = {}

    def run(rank):
        results[rank] = pre.prepare_data(cfg, rank=rank, world_size=2, verbose=False, timeout_s=120)

    worker = threading.Thread(target=run, args=(1,))
    worker.start()
    run(0)
    worker.join(timeout=120)
    assert results[0] == results[1]
    cache = LatentCache(results[0])
    assert sorted(cache.source_indices) == list(range(8))
    reports = [
        json.loads((results[0] / "shards" / f"shard-{k:05d}.json").read_text()) for k in range(4)
    ]
    assert [r["records"] for r in reports] == [[0, 2], [2, 4], [4, 6], [6, 8]]


def test_bfloat16_cache_matches_float32_cache_rounded(prepared, tmp_path):
    cfg, cache_dir = prepared
    bf = small_config(cfg.root, cache_dtype="bfloat16")
    bf_cache = LatentCache(prepare_data(bf, verbose=False))
    full = LatentCache(cache_dir)
    for pos in (0, 5):
        assert bf_cache[pos].index == full[pos].index
        assert torch.equal(bf_cache[pos].latents, full[pos].latents.bfloat16().float())


def test_on_the_fly_loader_equals_the_cached_loader(prepared):
    cfg, _ = prepared
    fly = small_config(cfg.root, use_cache=False)
    prepare_data(fly, verbose=False)
    a = next(iter(build_train_loader(cfg, batch_size=3, seed=2)))
    b = next(iter(build_train_loader(fly, batch_size=3, seed=2)))
    assert torch.equal(a["index"], b["index"]) and a["caption"] == b["caption"]
    for key in ("latents", "text", "text_mask", "pooled_text"):
        assert torch.equal(a[key], b[key]), key


def test_cli_builds_the_cache_from_yaml_and_overrides(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stafinetune.commands.preprocess", f"data.root={tmp_path}",
         "data.num_clips=3", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip().splitlines()
    assert "kept 3 of 3 records" in out[-2]
    info = json.loads(
        (tmp_path / out[-1].split(str(tmp_path))[-1].lstrip("/") / "cache.json").read_text()
    )
    assert info["kept"] == 3 and info["config"]["num_clips"] == 3


def test_latent_statistics_are_sane(prepared):
    _, cache_dir = prepared
    cache = LatentCache(cache_dir)
    z = torch.stack([cache[i].latents for i in range(len(cache))])  # (n, 16, 5, 16, 16)
    assert torch.isfinite(z).all()
    # The luma-DC channel carries the brightness; the others are smaller but not all zero.
    assert z[:, 0].abs().mean() > z[:, 1:].abs().mean()
    assert (z[:, 1:].abs().amax(dim=(0, 2, 3, 4)) > 1e-3).all()
    assert np.isclose(float(cache.info["shard_rows"][0]), 5.0)


def test_cache_key_follows_the_tiny_encoders_version(monkeypatch):
    from stafinetune.data import encoders
    from stafinetune.data.config import DataConfig
    from stafinetune.data.preprocess import cache_fingerprint

    cfg = DataConfig()
    before = cache_fingerprint(cfg)
    monkeypatch.setattr(encoders.TinyVideoEncoder, "fingerprint", lambda self: "tiny-dct-v999")
    assert cache_fingerprint(cfg) != before
