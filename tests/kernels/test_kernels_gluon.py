"""The warp-specialised Gluon kernels (``sta_kernels.kernels.gluon_fwd`` forward,
``gluon_bwd`` backward) and their dispatch.

On a Hopper GPU the kernels run against the float64 reference and against the triton
kernels. Without one, the host code that splits a call between the two (video queries or
video key blocks by the Gluon kernel, text ones by the triton kernel from a program offset)
runs in the interpreter with a stand-in for the Gluon kernel, and the backward's stats
kernel (a triton kernel) runs against torch. The kernels' sm_90 builds are checked in
tests/benchmarks/test_benchmarks_compile_report.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from kernel_testing import lowp_attention, make_qkv, rel_err

from sta_kernels import sliding_tile_attention


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


# name: (batch, canvas, per-head windows, text_len, text slots, head_dim); tile 6x8x8
CASES = {
    "video_only": (1, (12, 16, 32), [[3, 3, 3], [1, 2, 4], [2, 1, 3]], [0], 0, 128),
    # two text blocks (130 valid tokens) in one batch element, none in the other
    "joint_text": (2, (6, 16, 24), [[1, 2, 3], [2, 1, 1]], [130, 0], 200, 128),
    "head_dim_64": (1, (12, 8, 16), [[2, 1, 2], [1, 1, 1]], [37], 64, 64),
}


def _case(name):
    """(canvas, window, text, q, k, v, do) of ``CASES[name]`` on the GPU, bf16."""
    batch, canvas, window, text, slots, head_dim = CASES[name]
    window, text = torch.tensor(window), torch.tensor(text)
    q, k, v, do = make_qkv(batch, canvas, slots, window.shape[0], head_dim, torch.bfloat16,
                           torch.device("cuda"))
    return canvas, window, text, q, k, v, do


def _count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends to the returned list."""
    calls = []
    launch = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or launch(*a, **k))
    return calls


def _run(q, k, v, do, **kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sliding_tile_attention(*leaves, **kw)
    return (o, *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("name", list(CASES))
def test_gluon_forward_matches_reference_and_triton(name, monkeypatch):
    """Output and gradients (the backward reads the Gluon kernel's lse) within the
    low-precision reference's error of the fp64 truth, and equal to the triton forward's
    to a few bf16 roundings."""
    if not _hopper():
        pytest.skip("the Gluon forward needs a Hopper GPU")
    from sta_kernels import ops
    from sta_kernels.kernels import gluon_fwd

    canvas, window, text, q, k, v, do = _case(name)
    kw = dict(canvas=canvas, tile=(6, 8, 8), window=window, text_len=text, backend="triton")
    calls = _count_calls(monkeypatch, gluon_fwd, "sta_gluon_video_forward")
    got = _run(q, k, v, do, **kw)
    assert calls, "the Gluon forward did not run"
    plain = replace(ops.default_config(q.device), fwd_gluon=False)
    monkeypatch.setattr(ops, "default_config", lambda device, partial=False: plain)
    triton_only = _run(q, k, v, do, **kw)
    assert len(calls) == 1
    ref_kw = {key: val for key, val in kw.items() if key != "backend"}
    ref = _run(q.double(), k.double(), v.double(), do.double(), backend="reference", **ref_kw)
    low = lowp_attention(q.cpu(), k.cpu(), v.cpu(), **ref_kw)
    assert rel_err(got[0], ref[0]) <= 2 * rel_err(low, ref[0].cpu()) + 1e-4
    for label, g, t in zip(("o", "dq", "dk", "dv"), got, triton_only, strict=True):
        assert torch.isfinite(g).all(), label
        assert rel_err(g, t) < 1e-3, label
    num_video = math.prod(canvas)
    for b, n in enumerate(text.tolist()):
        assert torch.all(got[0][b, num_video + n:] == 0)  # padding text rows


@pytest.mark.parametrize("tile,stages,consumers,message", [
    ((4, 8, 8), None, 3, "does not divide into"),
    ((6, 8, 8), None, 4, "consumers must be 2 or 3"),
    ((6, 8, 8), 4, None, "stages must be 2 or 3"),
    ((4, 8, 8), 1, 2, "stages must be 2 or 3"),
])
def test_gluon_forward_refuses_consumers_that_do_not_fit(tile, stages, consumers, message):
    """Three consumers need query blocks of 3 frames, and a ring 2 or 3 buffers deep; a bad
    count or depth is refused by name, before any device check."""
    from sta_kernels.kernels import gluon_fwd

    q = torch.zeros(1, 384, 1, 128, dtype=torch.bfloat16)
    args = (q, q, q, q, torch.zeros(1, 1, 384), torch.ones(1, 3, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), (6, 8, 8), tile, 1.0)
    with pytest.raises(ValueError, match=message):
        gluon_fwd.sta_gluon_video_forward(*args, stages=stages, consumers=consumers)


@pytest.mark.parametrize("tile,want", [
    ((6, 8, 8), 3), ((12, 8, 8), 3), ((3, 8, 8), 3), ((4, 8, 8), 2), ((2, 8, 8), 2),
])
def test_gluon_forward_picks_three_consumers_where_they_fit(tile, want):
    """The default consumer count: three where the tile's frames divide by 3, else two;
    the program count follows (frames per tile / consumers)."""
    from sta_kernels.kernels import gluon_common

    assert gluon_common.default_consumers(tile) == want
    canvas = (2 * tile[0], 16, 8)
    assert gluon_common.video_blocks(canvas, tile, want) == 2 * 2 * tile[0] // want


@pytest.mark.parametrize("consumers,stages,want", [
    (3, None, (3, 2)), (3, 2, (2, 2)), (3, 3, (3, 2)), (2, None, (2, 2)), (2, 3, (3, 3)),
])
def test_gluon_forward_ring_depths(consumers, stages, want):
    """(k, v) ring buffers: three consumers keep 2 v buffers (a third beside three q
    frames and three k buffers would not fit in shared memory) and default to 3 k buffers;
    two consumers use one depth for both, 2 by default."""
    from sta_kernels.kernels import gluon_fwd

    assert gluon_fwd.ring_stages(consumers, stages) == want


@pytest.mark.parametrize("name", list(CASES))
def test_gluon_forward_consumer_counts_agree_bitwise(name, monkeypatch):
    """Three consumers (each key block in sequence, q from shared memory) and two (q in
    registers, PV one block behind), at either ring depth, do the same arithmetic in the
    same order: o and lse bitwise equal, with text keys, per-head windows and D 64."""
    if not _hopper():
        pytest.skip("the Gluon forward needs a Hopper GPU")
    from sta_kernels import ops
    from sta_kernels.kernels import gluon_fwd

    canvas, window, text, q, k, v, _ = _case(name)
    dev = q.device
    args = (q, k, v, window.to(dev, torch.int32), text.to(dev, torch.int32), canvas,
            (6, 8, 8), q.shape[-1] ** -0.5)
    seen = []
    launch = gluon_fwd._launch
    monkeypatch.setattr(gluon_fwd, "_launch",
                        lambda *a: seen.append(a[-3:]) or launch(*a))
    configs = {"default": {}, "two": {"fwd_gluon_consumers": 2},
               "two_s3": {"fwd_gluon_consumers": 2, "fwd_gluon_stages": 3},
               "three_s2": {"fwd_gluon_consumers": 3, "fwd_gluon_stages": 2}}
    got = {name: ops.sta_triton_forward(*args, config=ops.KernelConfig(**fields))
           for name, fields in configs.items()}
    # (k buffers, consumers, v buffers) of each launch
    assert seen == [(3, 3, 2), (2, 2, 2), (3, 2, 3), (2, 3, 2)]
    o, lse = got["default"]
    for name in configs:
        assert torch.equal(got[name][0], o) and torch.equal(got[name][1], lse), name
    assert torch.isfinite(o).all()


def test_split_call_runs_text_queries_from_the_program_offset(triton_device, monkeypatch):
    """With the Gluon kernel taking the video queries, the triton kernel launches only the
    text query blocks (program offset past the video blocks) and leaves the video rows to
    it. A stand-in writes the video rows here (the triton forward's own values), so the
    split call must equal the unsplit one exactly and must not overwrite those rows."""
    from sta_kernels import ops
    from sta_kernels.kernels import gluon_fwd

    canvas, tile, slots = (4, 4, 8), (2, 2, 4), 24
    window, text = torch.tensor([[1, 1, 1], [2, 1, 2]]), torch.tensor([21, 6])
    q, k, v, _ = make_qkv(2, canvas, slots, 2, 16, torch.bfloat16, triton_device, seed=11)
    args = (q, k, v, window.to(torch.int32).to(triton_device),
            text.to(torch.int32).to(triton_device), canvas, tile, 0.25)
    whole_o, whole_lse = ops.sta_triton_forward(*args)
    num_video = math.prod(canvas)
    sentinel = []

    def stand_in(q, k, v, o, lse, *rest, **kw):
        o[:, :num_video] = whole_o[:, :num_video]
        lse[:, :, :num_video] = whole_lse[:, :, :num_video]
        sentinel.append(o)

    monkeypatch.setattr(ops, "_gluon_applies", lambda *a: True)
    monkeypatch.setattr(gluon_fwd, "sta_gluon_video_forward", stand_in)
    o, lse = ops.sta_triton_forward(*args)
    assert sentinel and sentinel[0] is o
    assert torch.equal(o, whole_o) and torch.equal(lse, whole_lse)
    assert torch.any(o[:, num_video:] != 0)


def _grads(q, k, v, do, window, text, canvas, config):
    """(dq, dk, dv) of the triton entry points with ``config`` (forward, then backward)."""
    from sta_kernels import ops

    args = (window.to(torch.int32).to(q.device), text.to(torch.int32).to(q.device), canvas,
            (6, 8, 8), q.shape[-1] ** -0.5)
    o, lse = ops.sta_triton_forward(q, k, v, *args, config)
    return ops.sta_triton_backward(do, q, k, v, o, lse, *args, config)


@pytest.mark.parametrize("name", ["video_only", "joint_text"])
def test_gluon_backward_matches_reference_and_triton(name, monkeypatch):
    """dq, dk, dv of the Gluon backward (video key blocks; text key blocks by the triton
    kernel) within the low-precision kernels' error of the fp64 truth and equal to the
    triton backward's to a few bf16 roundings (dk, dv measured bitwise equal on the H200;
    dq differs by the order of its fp32 reduce-adds)."""
    if not _hopper():
        pytest.skip("the Gluon backward needs a Hopper GPU")
    from sta_kernels import ops
    from sta_kernels.kernels import gluon_bwd

    canvas, window, text, q, k, v, do = _case(name)
    calls = _count_calls(monkeypatch, gluon_bwd, "sta_gluon_backward")
    got = _grads(q, k, v, do, window, text, canvas, ops.default_config(q.device))
    assert calls, "the Gluon backward did not run"
    triton_only = _grads(q, k, v, do, window, text, canvas,
                         replace(ops.default_config(q.device), bwd_gluon=False))
    assert len(calls) == 1
    _, *ref = _run(*(x.double().cpu() for x in (q, k, v, do)), canvas=canvas, tile=(6, 8, 8),
                   window=window, text_len=text, backend="reference")
    for label, g, t, r in zip(("dq", "dk", "dv"), got, triton_only, ref, strict=True):
        assert torch.isfinite(g).all(), label
        assert rel_err(g, t) < 1e-3, label
        assert rel_err(g.cpu(), r) <= 1.1 * rel_err(t.cpu(), r) + 1e-4, label


def test_frame_stats_rows_match_torch(triton_device):
    """The backward's stats kernel: delta = rowsum(o * do) in the raster layout for every
    row, and per block of TH * TW queries (frames of the canvas in (t, tile row, tile
    column) order, then the text rows) its lse and delta, with lse +1e30 and delta 0 where
    the row is no query (text padding, rows past the sequence)."""
    from sta_kernels.kernels import gluon_bwd

    canvas, tile, heads, text_slots = (4, 16, 16), (2, 8, 8), 2, 70
    o, do, _, _ = make_qkv(2, canvas, text_slots, heads, 16, torch.bfloat16, triton_device,
                           seed=5)
    num_video = math.prod(canvas)
    lse = torch.randn(2, heads, num_video + text_slots, generator=torch.Generator().manual_seed(6)
                      ).to(triton_device)
    text = torch.tensor([70, 5], dtype=torch.int32, device=triton_device)
    delta = torch.full_like(lse, float("nan"))
    stats = gluon_bwd.frame_stats(o, do, lse, delta, text, canvas, tile).cpu()
    want = (o.float() * do.float()).sum(-1).transpose(1, 2).cpu()  # (B, H, S)
    torch.testing.assert_close(delta.cpu(), want, rtol=0, atol=1e-5)
    blocks = 16 + 2  # 4 frames x 2 x 2 tiles of 64 queries, then 70 text rows in 2 blocks
    stats = stats.view(2, heads, blocks, 128)
    lse = lse.cpu()
    # block 3: frame t=0, tile row 1, tile column 1
    tok = torch.tensor([(8 + r // 8) * 16 + 8 + r % 8 for r in range(64)])
    assert torch.equal(stats[:, :, 3, :64], lse[:, :, tok])
    torch.testing.assert_close(stats[:, :, 3, 64:], want[:, :, tok], rtol=0, atol=1e-5)
    # block 4: frame t=1, tile row 0, tile column 0
    tok = torch.tensor([256 + (r // 8) * 16 + r % 8 for r in range(64)])
    assert torch.equal(stats[:, :, 4, :64], lse[:, :, tok])
    # text: batch 0 has 70 valid rows (block 17 holds 6 of them), batch 1 has 5
    first = stats[:, :, 16]
    assert torch.equal(first[0, :, :64], lse[0, :, num_video:num_video + 64])
    assert torch.equal(first[1, :, :5], lse[1, :, num_video:num_video + 5])
    assert (first[1, :, 5:64] == 1e30).all() and (first[1, :, 64 + 5:] == 0).all()
    second = stats[:, :, 17]
    assert torch.equal(second[0, :, :6], lse[0, :, num_video + 64:])
    assert (second[0, :, 6:64] == 1e30).all() and (second[0, :, 64 + 6:] == 0).all()
    assert (second[1, :, :64] == 1e30).all()


def test_split_backward_runs_text_keys_from_the_program_offset(triton_device, monkeypatch):
    """With the Gluon kernel taking the video key blocks, the triton dk/dv kernel launches
    only the text key blocks (program offset past the video blocks): the text rows of dk and
    dv equal the unsplit call's, and the video rows (written here by a stand-in that also
    fills delta through the real stats kernel) are not overwritten."""
    from sta_kernels import ops
    from sta_kernels.kernels import gluon_bwd

    canvas, tile, slots = (4, 4, 8), (2, 2, 4), 24
    window, text = torch.tensor([[1, 1, 1], [2, 1, 2]]), torch.tensor([21, 6])
    q, k, v, do = make_qkv(2, canvas, slots, 2, 16, torch.bfloat16, triton_device, seed=11)
    args = (window.to(torch.int32).to(triton_device), text.to(torch.int32).to(triton_device),
            canvas, tile, 0.25)
    o, lse = ops.sta_triton_forward(q, k, v, *args)
    whole = ops.sta_triton_backward(do, q, k, v, o, lse, *args)
    num_video = math.prod(canvas)
    calls = []

    def stand_in(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale, delta, dq_acc,
                 dk, dv, stages=2):
        gluon_bwd.frame_stats(o, do, lse, delta, text_len, canvas, tile)
        dk[:, :num_video] = 7.0
        dv[:, :num_video] = 7.0
        calls.append(dq_acc)

    monkeypatch.setattr(ops, "_gluon_applies", lambda *a: True)
    monkeypatch.setattr(gluon_bwd, "sta_gluon_backward", stand_in)
    _, dk, dv = ops.sta_triton_backward(do, q, k, v, o, lse, *args)
    assert len(calls) == 1 and calls[0].dtype == torch.float32
    for got, want in ((dk, whole[1]), (dv, whole[2])):
        assert torch.equal(got[:, num_video:], want[:, num_video:])
        assert torch.any(got[:, num_video:] != 0)
        assert torch.all(got[:, :num_video] == 7.0)
