"""Training loader: batch contract, determinism, dp/sp sharding, resumption, worker prefetch."""

from __future__ import annotations

import itertools

import pytest
import torch

from stafinetune.data import build_train_loader, dp_coordinates
from stafinetune.data.loader import epoch_batches


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batch_matches_interface(prepared):
    cfg, _ = prepared
    batch = take(build_train_loader(cfg, batch_size=3, seed=0), 1)[0]
    assert batch["latents"].shape == (3, 16, 5, 16, 16) and batch["latents"].dtype == torch.float32
    assert batch["text"].shape == (3, 32, 32) and batch["text"].dtype == torch.float32
    assert batch["text_mask"].shape == (3, 32) and batch["text_mask"].dtype == torch.bool
    assert batch["pooled_text"].shape == (3, 32)
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (3,)
    assert len(batch["caption"]) == 3 and all("moving" in c for c in batch["caption"])
    # Padding positions of the text are zero, valid ones are not.
    mask = batch["text_mask"]
    assert mask.any(dim=1).all()
    assert (batch["text"][~mask] == 0).all() and (batch["text"][mask].abs().sum(-1) > 0).all()


def test_same_seed_same_stream_other_seed_differs(prepared):
    cfg, _ = prepared
    a = [b["index"].tolist() for b in take(build_train_loader(cfg, batch_size=2, seed=3), 9)]
    b = [b["index"].tolist() for b in take(build_train_loader(cfg, batch_size=2, seed=3), 9)]
    c = [b["index"].tolist() for b in take(build_train_loader(cfg, batch_size=2, seed=4), 9)]
    assert a == b and a != c


def test_epochs_cover_every_sample_once_and_reshuffle(prepared):
    cfg, _ = prepared
    loader = build_train_loader(cfg, batch_size=4, seed=0)
    per_epoch = len(loader)
    assert per_epoch == 3  # 12 samples / 4
    batches = [b["index"].tolist() for b in take(loader, 2 * per_epoch)]
    first = sorted(sum(batches[:per_epoch], []))
    second = sorted(sum(batches[per_epoch:], []))
    assert first == second == list(range(12))
    assert batches[:per_epoch] != batches[per_epoch:]


def test_dp_ranks_partition_each_global_batch():
    buckets = [0] * 10 + [1] * 7
    shards = [
        epoch_batches(buckets, batch_size=2, dp_rank=r, dp_size=3, seed=1, epoch=0)
        for r in range(3)
    ]
    assert len({len(s) for s in shards}) == 1
    for step in zip(*shards, strict=True):
        flat = sum(step, [])
        assert len(set(flat)) == 6  # disjoint across ranks
        assert len({buckets[i] for i in flat}) == 1  # one bucket (latent shape) per global batch


def test_sp_group_ranks_get_identical_batches(prepared):
    cfg, _ = prepared
    world, sp = 4, 2
    streams = {}
    for rank in range(world):
        dp_rank, dp_size = dp_coordinates(rank, world, sp)
        loader = build_train_loader(cfg, batch_size=2, seed=5, dp_rank=dp_rank, dp_size=dp_size)
        streams[rank] = take(loader, 4)
    for a, b in [(0, 1), (2, 3)]:
        for x, y in zip(streams[a], streams[b], strict=True):
            assert torch.equal(x["index"], y["index"]) and torch.equal(x["latents"], y["latents"])
    for x, y in zip(streams[0], streams[2], strict=True):  # different dp ranks: disjoint samples
        assert set(x["index"].tolist()).isdisjoint(y["index"].tolist())
    with pytest.raises(ValueError, match="sp_size"):
        dp_coordinates(0, 4, 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_at_exact_next_batch(prepared, num_workers):
    cfg, _ = prepared
    reference = take(build_train_loader(cfg, batch_size=2, seed=7, num_workers=num_workers), 9)
    first = build_train_loader(cfg, batch_size=2, seed=7, num_workers=num_workers)
    it = iter(first)
    for _ in range(5):  # crosses no epoch boundary yet (6 batches / epoch)
        next(it)
    state = first.state_dict()
    resumed = build_train_loader(cfg, batch_size=2, seed=7, num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = take(resumed, 4)  # crosses into epoch 1
    for x, y in zip(reference[5:], rest, strict=True):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["latents"], y["latents"])
        assert x["caption"] == y["caption"]


def test_resume_rejects_a_different_stream(prepared):
    cfg, _ = prepared
    state = build_train_loader(cfg, batch_size=2, seed=7).state_dict()
    other = build_train_loader(cfg, batch_size=3, seed=7)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_batch_larger_than_dataset_is_a_clear_error(prepared):
    cfg, _ = prepared
    with pytest.raises(ValueError, match="batch_size=8 x dp_size=2"):
        build_train_loader(cfg, batch_size=8, seed=0, dp_size=2)
