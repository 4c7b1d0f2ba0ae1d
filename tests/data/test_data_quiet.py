"""Preprocessing reports bad videos in bad_inputs.jsonl and its summary line, not through the
decoder's own console messages (one per broken file would flood the console)."""

from __future__ import annotations

import json

from data_media import good_mp4, truncated_mp4

from stafinetune.data import DataConfig, prepare_data


def test_decoder_messages_stay_off_the_console(tmp_path, capfd):
    media = tmp_path / "media"
    media.mkdir()
    good_mp4(media / "good.mp4")
    truncated_mp4(media / "truncated.mp4", media / "full.mp4")
    manifest = tmp_path / "m.jsonl"
    lines = [{"path": f"media/{n}.mp4", "caption": "a clip"} for n in ("good", "truncated")]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = DataConfig(source="folder", manifest=str(manifest), root=str(tmp_path / "root"),
                     num_frames=9, height=64, width=64, num_workers=0,
                     decode_workers=1)  # fmt: skip
    cache = prepare_data(cfg, verbose=False)
    out, err = capfd.readouterr()
    assert "partial file" not in err and "@ 0x" not in err, err
    assert json.loads((cache / "cache.json").read_text())["skipped"] == {"truncated": 1}
