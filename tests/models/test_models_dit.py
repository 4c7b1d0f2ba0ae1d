"""VideoDiT against the original diffusers models, windows, capture, backward."""

from __future__ import annotations

import pytest
import torch
from dit_testing import build, make_batch, original, run, run_original
from sta_kernels import density

from stafinetune.models import AttentionConfig


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_matches_original_diffusers(flavor: str, full_window: list[int], mode: str) -> None:
    """Dense mode and STA with a full window reproduce the unmodified diffusers model."""
    dit = build(flavor, mode=mode, window=full_window)
    b = make_batch()
    with torch.no_grad():
        expected = run_original(original(dit), dit.family, b)
        got = run(dit, b)
    assert got.shape == b["latents"].shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_windows_change_output(flavor: str, full_window: list[int]) -> None:
    """A sparse window changes the output; a different sparse window changes it differently."""
    b = make_batch()
    with torch.no_grad():
        dense = run(build(flavor, mode="sta", window=full_window), b)
        small = run(build(flavor, mode="sta", window=[3, 3, 3]), b)
        tiny = run(build(flavor, mode="sta", window=[1, 1, 1]), b)
    assert (small - dense).abs().max() > 1e-3
    assert (tiny - small).abs().max() > 1e-3


def test_default_attention_is_sparse() -> None:
    """The embedded default (tile 1x2x2, window 3x3x3 on canvas 5x8x8) keeps ~34% of pairs."""
    cfg = AttentionConfig()
    dit = build("wan_tiny", tile=cfg.tile, window=cfg.window)
    canvas = dit.canvas_for((16, 5, 16, 16))
    assert canvas == (5, 8, 8)
    d = density(canvas, cfg.tile, torch.tensor([cfg.window]))
    assert d.item() == pytest.approx(0.3375, abs=1e-6)


def test_capture_records_layers_and_final(flavor: str) -> None:
    dit = build(flavor, mode="sta", window=[3, 3, 3])
    b = make_batch()
    with torch.no_grad():
        with dit.capture() as store:
            out = run(dit, b)
        text_slots = 16 if dit.family == "hunyuan" else 0
        assert store.keys() == list(range(dit.num_layers))
        for i in store.keys():
            assert store[i].shape == (2, 320 + text_slots, dit.num_heads, dit.head_dim)
        assert torch.equal(store["final"], out)
        # outside capture nothing is stored and the processors keep no reference
        run(dit, b)
    assert dit._store is None and dit._runtime.state is None
    with dit.capture(layers=[1]) as only_one, torch.no_grad():
        run(dit, b)
    assert only_one.keys() == [1]


def test_backward_reaches_parameters(flavor: str) -> None:
    dit = build(flavor, mode="sta", window=[3, 3, 3])
    b = make_batch()
    with dit.capture() as store:
        out = run(dit, b)
    loss = out.square().mean() + store[0].square().mean()
    loss.backward()
    attn = dit.sta_layers()[0]
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dit.sta_layers()[-1].parameters())
