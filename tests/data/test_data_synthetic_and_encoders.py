"""The synthetic generator's known motion, the tiny encoders' documented properties, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from stafinetune.config import compose_job_config, conf_dir
from stafinetune.data import DataConfig
from stafinetune.data.encoders import TinyTextEncoder, TinyVideoEncoder, low_frequency_basis
from stafinetune.data.sources import synthetic_dir
from stafinetune.data.synthetic import COLOURS
from stafinetune.data.video import (
    VideoInfo,
    VideoRecord,
    choose_bucket,
    resize_crop,
    sample_frame_indices,
)


def test_synthetic_clips_move_as_their_captions_say(prepared):
    import decord

    cfg, _ = prepared
    root = synthetic_dir(cfg)
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    checked = 0
    for line in lines:
        shape = line["motion"]["shapes"][0]
        assert (
            f"{shape['colour']} {shape['shape']} moving {shape['direction']} at {shape['speed']}"
            in line["caption"]
        )
        if len(line["motion"]["shapes"]) > 1:
            continue  # occlusion would bias the centroid
        frames = decord.VideoReader(str(root / line["path"])).get_batch(list(range(17))).asnumpy()
        assert frames.shape == (17, 128, 128, 3)
        colour = np.array(COLOURS[shape["colour"]], dtype=np.float32)
        centres = []
        for f in range(17):
            near = np.abs(frames[f].astype(np.float32) - colour).max(-1) < 40  # (h, w)
            ys, xs = np.nonzero(near)
            centres.append((xs.mean() + 0.5, ys.mean() + 0.5))
        centres = np.array(centres)
        velocity = np.polyfit(np.arange(17), centres, 1)[0]  # fitted (vx, vy) in px/frame
        assert np.allclose(velocity, [shape["vx"], shape["vy"]], atol=0.2), (
            line["caption"],
            velocity,
        )
        assert np.allclose(centres[0], [shape["x0"], shape["y0"]], atol=1.5)
        checked += 1
    assert checked >= 4


def test_tiny_video_encoder_is_an_orthogonal_projection():
    enc = TinyVideoEncoder(16)
    for basis in (low_frequency_basis(16, 1), low_frequency_basis(16, 4)):
        flat = basis.reshape(16, -1)
        torch.testing.assert_close(flat @ flat.T, torch.eye(16, dtype=torch.float64))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 17, 32, 48) * 2 - 1
    z = enc.encode(x)
    assert z.shape == (2, 16, 5, 4, 6)
    torch.testing.assert_close(enc.encode(enc.decode(z)), z, atol=1e-5, rtol=1e-5)
    proj = enc.decode(z)
    torch.testing.assert_close(enc.decode(enc.encode(proj)), proj, atol=1e-5, rtol=1e-5)
    # Causal in time: the first latent frame depends on the first video frame only.
    y = x.clone()
    y[:, :, 1:] = 0
    torch.testing.assert_close(enc.encode(y)[:, :, 0], z[:, :, 0])
    # A constant-colour video is reproduced exactly (its DC lies in the subspace).
    flat = torch.full((1, 3, 5, 16, 16), 0.3)
    torch.testing.assert_close(enc.decode(enc.encode(flat)), flat, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1\\+4k"):
        enc.encode(torch.zeros(1, 3, 6, 16, 16))


def test_tiny_text_encoder_is_deterministic_and_order_aware():
    a, b = TinyTextEncoder(seed=0), TinyTextEncoder(seed=0)
    caps = ["A red circle moving LEFT!", "left moving circle red a", "x " * 40]
    ta, ma, pa = a.encode(caps)
    tb, mb, pb = b.encode(caps)
    assert torch.equal(ta, tb) and torch.equal(pa, pb)
    assert ma.sum(1).tolist() == [5, 5, 32]  # truncated at L
    assert not torch.equal(ta[0], ta[1])  # positions matter
    assert torch.equal(
        ta[0], a.encode(["a red circle moving left"])[0][0]
    )  # case and punctuation do not
    assert not torch.equal(TinyTextEncoder(seed=1).encode(caps[:1])[0], ta[:1])
    t, m, p = TinyTextEncoder(text_len=8, text_dim=32, pooled_dim=12).encode(caps)
    assert t.shape == (3, 8, 32) and p.shape == (3, 12)


def test_frame_sampling_by_fps_and_stride():
    info = VideoInfo(width=64, height=64, num_frames=100, fps=30.0)
    assert sample_frame_indices(info, 5, target_fps=None, stride=2) == [0, 2, 4, 6, 8]
    assert sample_frame_indices(info, 4, target_fps=10.0, stride=1) == [0, 3, 6, 9]
    assert sample_frame_indices(info, 3, target_fps=15.0, stride=2, start=1.0) == [30, 34, 38]
    assert sample_frame_indices(info, 40, target_fps=10.0, stride=1) is None
    assert sample_frame_indices(info, 3, target_fps=None, stride=1, start=0.0, end=0.05) is None


def test_aspect_and_length_buckets():
    cfg = DataConfig(buckets=[[17, 64, 64], [9, 64, 64], [17, 48, 96], [9, 48, 96]])
    record = VideoRecord(0, "c")
    wide = VideoInfo(width=200, height=100, num_frames=40, fps=8.0)
    square_short = VideoInfo(width=90, height=100, num_frames=12, fps=8.0)
    assert choose_bucket(wide, record, cfg)[0] == 2
    bucket, indices = choose_bucket(square_short, record, cfg)
    assert bucket == 1 and len(indices) == 9


def test_resize_crop_keeps_the_centre_and_range():
    frames = torch.zeros(2, 60, 120, 3, dtype=torch.uint8)
    frames[:, :, 50:70] = 255  # a white stripe in the middle
    out = resize_crop(frames, 32, 32)  # (3, 2, 32, 32)
    assert out.shape == (3, 2, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert out[:, :, :, 14:18].mean() > 0.9 and out[:, :, :, :4].mean() < -0.9


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"source": "s3"}, "data.source"),
        ({"num_frames": 16}, "data.num_frames"),
        ({"height": 100}, "data.height"),
        ({"source": "folder"}, "data.manifest"),
        ({"video_encoder": "wan"}, "data.video_encoder_path"),
        ({"cache_dtype": "int8"}, "data.cache_dtype"),
        ({"buckets": [[17, 64]]}, "data.buckets"),
        ({"fps": 0.0}, "data.fps"),
        ({"synthetic_frames": 9}, "data.synthetic_frames"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", "\\.")):
        DataConfig(**kwargs)


def test_yaml_files_compose_onto_the_dataclass(tmp_path):
    names = sorted(p.stem for p in (conf_dir() / "data").glob("*.yaml"))
    assert names == ["folder", "hf_dataset", "synthetic"]
    assert compose_job_config().data == DataConfig()
    folder = compose_job_config(["data=folder", "data.manifest=/x/m.jsonl", "data.fps=12"]).data
    assert folder.source == "folder" and folder.fps == 12.0
    hf = compose_job_config(["data=hf_dataset", f"data.dataset_path={tmp_path}"]).data
    assert hf.source == "hf_dataset"
    # Hydra sees the same: compose the group against the structured schema.
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="data_test_root", node={"data": DataConfig})
    with initialize_config_dir(config_dir=str(Path(conf_dir()).resolve()), version_base=None):
        cfg = compose(
            config_name="data_test_root", overrides=["+data=synthetic", "data.num_clips=5"]
        )
    data = OmegaConf.to_object(cfg.data)
    assert isinstance(data, DataConfig) and data.num_clips == 5 and data.text_len == 32
