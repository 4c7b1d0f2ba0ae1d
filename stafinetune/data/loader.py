"""The training loader: latent cache (or on-the-fly decoding) -> batches, dp-sharded,
deterministic given a seed, infinite over epochs and resumable at its exact position.

Sampling. Epoch ``e`` draws a permutation of each bucket's samples from
``numpy.random.default_rng([seed, e])``, cuts it into *global* batches of
``batch_size * dp_size`` (a bucket's remainder is dropped for that epoch), shuffles the order
of all global batches, and gives dp rank ``r`` the slice ``[r * batch_size, (r + 1) *
batch_size)`` of each. All ranks thus step through the same number of batches, every batch has
one latent shape, and the stream depends only on (seed, epoch, dp_size, batch_size), never on
the number of workers.

Sequence parallelism. Ranks of one sequence-parallel group must see the same sample: callers
pass the *data-parallel* coordinates, which are equal within an sp group; with the usual
layout (sp innermost, torchtitan's mesh order) :func:`dp_coordinates` computes them from the
global rank.

Resumption. ``state_dict()`` counts the batches *yielded to the caller* (not those prefetched
by workers), so ``load_state_dict`` continues with exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stafinetune.data.cache import LatentCache
from stafinetune.data.config import DataConfig

STATE_VERSION = 1


def dp_coordinates(rank: int, world_size: int, sp_size: int = 1) -> tuple[int, int]:
    """``(dp_rank, dp_size)`` of a global rank when sp groups are contiguous ranks.

    Ranks ``[g * sp_size, (g + 1) * sp_size)`` form sp group ``g`` and share dp rank ``g``.
    """
    if sp_size <= 0 or world_size % sp_size:
        raise ValueError(f"sp_size={sp_size} must divide world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, {world_size})")
    return rank // sp_size, world_size // sp_size


def epoch_batches(
    buckets: list[int], *, batch_size: int, dp_rank: int, dp_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """This dp rank's batches (sample positions) for one epoch; see the module docstring."""
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[int, list[int]] = {}
    for pos, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(pos)
    global_size = batch_size * dp_size
    global_batches = []
    for b in sorted(by_bucket):
        members = np.asarray(by_bucket[b])[rng.permutation(len(by_bucket[b]))]
        for start in range(0, len(members) - global_size + 1, global_size):
            global_batches.append(members[start : start + global_size])
    order = rng.permutation(len(global_batches))
    lo = dp_rank * batch_size
    return [global_batches[i][lo : lo + batch_size].tolist() for i in order]


class CachedLatents(Dataset):
    """Map-style dataset over a finished latent cache: one sample dict per position."""

    def __init__(self, cache_dir, text_len: int) -> None:
        self.cache = LatentCache(cache_dir)
        if self.cache.info.get("mode") != "latents":
            raise ValueError(f"{cache_dir} was prepared with data.use_cache=false (no latents)")
        self.text_len = text_len
        self.text_2_len: int | None = self.cache.info.get("text_2_len")  # glyph caches only
        self.buckets = self.cache.buckets

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, pos: int) -> dict[str, Any]:
        s = self.cache[pos]
        sample = _sample(s.latents, s.text, s.pooled, s.caption, s.index, self.text_len,
                         s.image_latents, s.image_embeds)  # fmt: skip
        if s.text_2 is not None:
            sample |= _glyph_sample(s.text_2, self.text_2_len)
        return sample


class OnTheFlyLatents(Dataset):
    """Decodes and encodes kept records in the loader workers (``data.use_cache=false``).

    Meant for small runs; the encoders are built lazily once per worker process.
    """

    def __init__(self, cfg: DataConfig, info: dict[str, Any]) -> None:
        from stafinetune.data.sources import build_source

        self.cfg = cfg
        self.source = build_source(cfg, generate=False)
        self.kept = [int(i) for i, _ in info["kept_records"]]
        self.buckets = [int(b) for _, b in info["kept_records"]]
        self.text_len = cfg.text_len
        self._encoders = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_encoders"] = None
        return state

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, pos: int) -> dict[str, Any]:
        from stafinetune.data.encoders import (
            build_image_encoder,
            build_text_encoder,
            build_video_encoder,
            encode_image_condition,
            glyph_encoder,
        )
        from stafinetune.data.video import load_clip

        if self._encoders is None:
            self._encoders = (build_video_encoder(self.cfg), build_text_encoder(self.cfg),
                              build_image_encoder(self.cfg))  # fmt: skip
        video_encoder, text_encoder, image_encoder = self._encoders
        record = self.source[self.kept[pos]]
        video, _ = load_clip(record, self.cfg)  # (3, F, H, W)
        video = video[None].to(self.cfg.device)  # (1, 3, F, H, W)
        with torch.no_grad():
            latents = video_encoder.encode(video)[0].float().cpu()
        image = (None, None)
        if self.cfg.image_encoder is not None:
            cond, embeds = encode_image_condition(video_encoder, image_encoder, video,
                                                  first_frame=self.cfg.image_encoder == "vae")
            image = (cond[0], None if embeds is None else embeds[0])
        text, mask, pooled = text_encoder.encode([record.caption])
        n = int(mask[0].sum())
        sample = _sample(
            latents,
            text[0, :n].float().cpu(),
            pooled[0].float().cpu(),
            record.caption,
            record.index,
            self.text_len,
            *image,
        )
        glyph = glyph_encoder(text_encoder)
        if glyph is not None:
            text_2, mask_2 = glyph.encode_glyph([record.caption])  # (1, L2, D2), (1, L2)
            sample |= _glyph_sample(text_2[0, : int(mask_2[0].sum())].cpu(), glyph.text_2_len)
        return sample


def _sample(
    latents, text, pooled, caption: str, index: int, text_len: int,
    image_latents: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
) -> dict[str, Any]:  # fmt: skip
    n = min(text.shape[0], text_len)
    padded = torch.zeros(text_len, text.shape[1])  # (L, Dt)
    padded[:n] = text[:n]
    mask = torch.zeros(text_len, dtype=torch.bool)
    mask[:n] = True
    sample = {"latents": latents, "text": padded, "text_mask": mask, "pooled_text": pooled,
              "caption": caption, "index": index}  # fmt: skip
    if image_latents is not None:
        sample |= {"image_latents": image_latents, "image_embeds": image_embeds}
    return sample


def _glyph_sample(text_2: torch.Tensor, text_2_len: int) -> dict[str, torch.Tensor]:
    """The glyph keys of a sample: valid glyph states ``text_2`` (n2, D2) padded with zeros to
    ``text_2_len`` slots, and their mask (a prefix)."""
    padded = torch.zeros(text_2_len, text_2.shape[1])  # (L2, D2)
    padded[: text_2.shape[0]] = text_2
    mask = torch.arange(text_2_len) < text_2.shape[0]  # (L2,)
    return {"text_2": padded, "text_2_mask": mask}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack sample dicts into the batch dict of docs/INTERFACES.md."""
    batch = {
        "latents": torch.stack([s["latents"] for s in samples]),  # (B, C, T, H, W)
        "text": torch.stack([s["text"] for s in samples]),  # (B, L, Dt)
        "text_mask": torch.stack([s["text_mask"] for s in samples]),  # (B, L)
        "pooled_text": torch.stack([s["pooled_text"] for s in samples]),  # (B, Dp)
        "caption": [s["caption"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),  # (B,)
    }
    if "image_latents" in samples[0]:  # image-to-video data
        batch["image_latents"] = torch.stack(
            [s["image_latents"] for s in samples]
        )  # (B, C, T, H, W); (B, C, 1, H, W) for data.image_encoder=vae
    if samples[0].get("image_embeds") is not None:
        batch["image_embeds"] = torch.stack([s["image_embeds"] for s in samples])  # (B, N, Di)
    if "text_2" in samples[0]:  # a text encoder with a glyph stream (HunyuanVideo 1.5)
        batch["text_2"] = torch.stack([s["text_2"] for s in samples])  # (B, L2, D2)
        batch["text_2_mask"] = torch.stack([s["text_2_mask"] for s in samples])  # (B, L2)
    return batch


class TrainLoader:
    """Infinite, resumable iterable of batch dicts (see the module docstring).

    ``iter(loader)`` continues from the current position; ``state_dict()`` /
    ``load_state_dict()`` save and restore it. ``len(loader)`` is the batches per epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        self.dataset = dataset
        self.batch_size, self.seed = batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = pin_memory
        self.epoch, self.step_in_epoch = 0, 0
        if len(dataset) == 0:
            raise ValueError(
                "data: the prepared data holds no usable sample; every record was skipped "
                "(see bad_inputs.jsonl next to cache.json)"
            )
        if len(self) == 0:
            counts = np.bincount(np.asarray(dataset.buckets))
            raise ValueError(
                f"batch_size={batch_size} x dp_size={dp_size} is larger than every bucket "
                f"(largest has {max(counts)} samples): no full batch per epoch"
            )

    def __len__(self) -> int:
        return len(self._batches(0))

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(
            self.dataset.buckets, batch_size=self.batch_size, dp_rank=self.dp_rank,
            dp_size=self.dp_size, seed=self.seed, epoch=epoch,
        )  # fmt: skip

    def _batch_stream(self, epoch: int, step: int) -> Iterator[list[int]]:
        """Batches from ``(epoch, step)`` on, forever (runs ahead of the caller when prefetching)."""
        while True:
            yield from self._batches(epoch)[step:]
            epoch, step = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # One DataLoader over an endless batch stream: workers persist across epochs. The
        # position advances only when a batch reaches the caller, so it ignores prefetching.
        per_epoch = len(self)
        # DataLoader draws its workers' base seed when iterated: from this position's own
        # generator, not torch's global one, which a checkpoint restores and a resume (which
        # iterates again) would otherwise shift away from an uninterrupted run
        position = [self.seed, self.dp_rank, self.epoch, self.step_in_epoch]
        base_seed = int(np.random.SeedSequence(position).generate_state(1, np.uint64)[0])
        loader = DataLoader(
            self.dataset,
            batch_sampler=self._batch_stream(self.epoch, self.step_in_epoch),
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(base_seed),
        )
        for batch in loader:
            self.step_in_epoch += 1
            if self.step_in_epoch == per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out, plus what the stream depends on."""
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "seed": self.seed, "batch_size": self.batch_size, "dp_rank": self.dp_rank,
            "dp_size": self.dp_size, "num_samples": len(self.dataset),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position; the stream-defining fields must match."""
        for key in ("seed", "batch_size", "dp_size", "num_samples"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state has {key}={state.get(key)}, this loader has {mine}: "
                    "resuming would not continue the same sample stream"
                )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """The training loader over the prepared data of ``cfg`` (run :func:`prepare_data` first).

    Ranks of one sequence-parallel group pass the same ``dp_rank`` (see :func:`dp_coordinates`)
    and so get identical batches. ``num_workers`` defaults to ``data.num_workers``.
    Yields dicts with ``latents (B, C, T, H, W)``, ``text (B, L, Dt)``, ``text_mask (B, L)``,
    ``pooled_text (B, Dp)``, ``caption`` (list of B str), ``index (B,)`` int64; with
    ``data.image_encoder`` also ``image_latents (B, C, T, H, W)`` and ``image_embeds (B, N, Di)``;
    with a glyph text encoder (``hunyuanvideo15``) also ``text_2 (B, L2, D2)`` and
    ``text_2_mask (B, L2)``.
    Every epoch has ``len(loader)`` batches; ``pin_memory=True`` for fast host-to-GPU copies.
    """
    import json

    from stafinetune.data.preprocess import resolve_cache_dir

    cache_dir = resolve_cache_dir(cfg)
    index = cache_dir / "cache.json"
    if not index.exists():
        raise FileNotFoundError(
            f"data: no prepared data at {cache_dir}; call prepare_data(cfg) or run "
            "`stafinetune-preprocess` with the same data config first"
        )
    workers = cfg.num_workers if num_workers is None else num_workers
    if not cfg.use_cache and workers > 0 and cfg.device.startswith("cuda"):
        raise ValueError(
            "data.device: with data.use_cache=false the encoders run inside the loader workers, "
            "which cannot use CUDA; precompute the cache (data.use_cache=true) or use data.device=cpu"
        )
    if cfg.use_cache:
        dataset: Dataset = CachedLatents(cache_dir, cfg.text_len)
    else:
        dataset = OnTheFlyLatents(cfg, json.loads(index.read_text()))
    return TrainLoader(
        dataset,
        batch_size=batch_size,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor,
        pin_memory=pin_memory,
    )
