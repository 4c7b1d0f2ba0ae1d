"""Manifest (JSONL/CSV) and local `datasets` sources, end to end into the loader."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from data_media import good_mp4

from stafinetune.data import DataConfig, build_train_loader, prepare_data
from stafinetune.data.sources import DatasetSource, ManifestSource


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return [
        good_mp4(d / f"c{i}.mp4", frames=17 + 4 * i, height=72 + 8 * i, width=96) for i in range(3)
    ]


def test_jsonl_manifest_relative_paths_and_optional_fields(clips, tmp_path):
    base = clips[0].parent
    lines = [
        {"path": c.name, "caption": f"clip {i}", "fps": 16, "start": 0.0, "end": 9.0}
        for i, c in enumerate(clips)
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = ManifestSource(tmp_path / "m.jsonl", video_dir=base)
    assert len(src) == 3
    r = src[1]
    assert (
        r.path == str(base / clips[1].name)
        and r.caption == "clip 1"
        and r.fps == 16.0
        and r.end == 9.0
    )


def test_csv_manifest_into_loader(clips, tmp_path):
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video", "text", "fps"])
        for i, c in enumerate(clips):
            writer.writerow([str(c), f"a bar number {i}", ""])
    cfg = DataConfig(source="folder", manifest=str(tmp_path / "m.csv"), root=str(tmp_path / "r"),
                     num_frames=9, height=32, width=48, num_workers=0,
                     allow_outside_paths=True)  # fmt: skip
    prepare_data(cfg, verbose=False)
    batch = next(iter(build_train_loader(cfg, batch_size=3, seed=0)))
    assert batch["latents"].shape == (3, 16, 3, 4, 6)
    assert sorted(batch["caption"]) == ["a bar number 0", "a bar number 1", "a bar number 2"]


def test_datasets_save_to_disk_with_path_column(clips, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"file": [str(c) for c in clips], "txt": ["x", "y", "z"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    src = DatasetSource(tmp_path / "ds", video_column="file", caption_column="txt",
                        allow_outside=True)  # fmt: skip
    assert len(src) == 3 and src[2].path == str(clips[2]) and src[2].caption == "z"
    with pytest.raises(ValueError, match="data.caption_column"):
        DatasetSource(tmp_path / "ds", video_column="file", caption_column="caption")


def test_parquet_with_bytes_column_round_trips_the_latents(clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"video": [c.read_bytes() for c in clips], "caption": ["p", "q", None]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
    cfg = DataConfig(source="hf_dataset", dataset_path=str(tmp_path / "pq"), root=str(tmp_path / "r"),
                     num_frames=9, height=32, width=32, num_workers=0)  # fmt: skip
    cache = prepare_data(cfg, verbose=False)
    info = json.loads((cache / "cache.json").read_text())
    assert info["kept"] == 2 and info["skipped"] == {"missing_caption": 1}
    # The bytes decode to the same latents as the files they came from.
    file_cfg = DataConfig(source="folder", manifest=str(tmp_path / "f.jsonl"), root=str(tmp_path / "r"),
                          num_frames=9, height=32, width=32, num_workers=0,
                          allow_outside_paths=True)  # fmt: skip
    (tmp_path / "f.jsonl").write_text(
        "\n".join(
            json.dumps({"path": str(c), "caption": k}) for c, k in zip(clips, "pq", strict=False)
        )
    )
    prepare_data(file_cfg, verbose=False)
    a = next(iter(build_train_loader(cfg, batch_size=2, seed=1)))
    b = next(iter(build_train_loader(file_cfg, batch_size=2, seed=1)))
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["latents"], b["latents"])


def test_video_feature_dicts_are_read_raw(clips, tmp_path):
    import datasets

    features = datasets.Features(
        {"video": datasets.Video(decode=False), "caption": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(
        {"video": [{"bytes": clips[0].read_bytes(), "path": None}], "caption": ["v"]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "vid"))
    record = DatasetSource(tmp_path / "vid")[0]
    assert record.data == clips[0].read_bytes() and record.caption == "v"


def test_rewriting_a_dataset_in_place_changes_its_cache(clips, tmp_path):
    import datasets

    from stafinetune.data import resolve_cache_dir

    def save(captions):
        datasets.Dataset.from_dict(
            {"video": [str(c) for c in clips], "caption": captions}
        ).save_to_disk(str(tmp_path / "ds"))

    cfg = DataConfig(
        source="hf_dataset", dataset_path=str(tmp_path / "ds"), root=str(tmp_path / "r")
    )
    save(["a", "b", "c"])
    before = resolve_cache_dir(cfg)
    assert resolve_cache_dir(cfg) == before  # stable while nothing changes
    save(["a", "b", "a much longer caption"])
    assert resolve_cache_dir(cfg) != before


def test_buckets_end_to_end_give_single_shape_batches(clips, tmp_path):
    # clips: 17 frames 72x96 (4:3), 21 frames 80x96 (6:5 -> 4:3), 25 frames 88x96 (~1:1)
    lines = [
        {"path": str(c), "caption": f"clip {i} copy {k}"}
        for i, c in enumerate(clips)
        for k in range(2)
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = DataConfig(source="folder", manifest=str(tmp_path / "m.jsonl"), root=str(tmp_path / "r"),
                     buckets=[[9, 48, 64], [21, 48, 64], [9, 64, 64]],
                     allow_outside_paths=True)  # fmt: skip
    info = json.loads((prepare_data(cfg, verbose=False) / "cache.json").read_text())
    assert info["bucket_counts"] == {"0": 2, "1": 2, "2": 2}
    assert info["latent_shapes"] == {"0": [16, 3, 6, 8], "1": [16, 6, 6, 8], "2": [16, 3, 8, 8]}
    loader = build_train_loader(cfg, batch_size=2, seed=0)
    assert len(loader) == 3
    seen = set()
    for batch, _ in zip(loader, range(3), strict=False):
        captions = {c.split(" copy")[0] for c in batch["caption"]}
        assert len(captions) == 1  # both copies of one clip: one bucket per batch
        seen.add(tuple(batch["latents"].shape[1:]))
    assert seen == {(16, 3, 6, 8), (16, 6, 6, 8), (16, 3, 8, 8)}
