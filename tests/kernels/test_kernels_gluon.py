"""The warp-specialised Gluon forward (``sta_kernels.gluon_sta``) and its dispatch.

On a Hopper GPU the kernel runs against the float64 reference and against the triton
forward. Without one, the host code that splits a call between the two kernels (video
queries by the Gluon kernel, text queries by the triton kernel from a program offset) runs
in the interpreter with a stand-in for the Gluon kernel. The kernel's sm_90 build (no
spills, shared memory in budget) is checked in tests/benchmarks/test_benchmarks_compile_report.py.
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
    from sta_kernels import gluon_sta
    from sta_kernels import triton_sta as ts

    batch, canvas, window, text, slots, head_dim = CASES[name]
    window, text = torch.tensor(window), torch.tensor(text)
    q, k, v, do = make_qkv(batch, canvas, slots, window.shape[0], head_dim, torch.bfloat16,
                           torch.device("cuda"))
    kw = dict(canvas=canvas, tile=(6, 8, 8), window=window, text_len=text, backend="triton")
    calls = []
    launch = gluon_sta.sta_gluon_video_forward
    monkeypatch.setattr(gluon_sta, "sta_gluon_video_forward",
                        lambda *a, **k: calls.append(1) or launch(*a, **k))
    got = _run(q, k, v, do, **kw)
    assert calls, "the Gluon forward did not run"
    plain = replace(ts.default_config(q.device), fwd_gluon=False)
    monkeypatch.setattr(ts, "default_config", lambda device, partial=False: plain)
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


def test_split_call_runs_text_queries_from_the_program_offset(triton_device, monkeypatch):
    """With the Gluon kernel taking the video queries, the triton kernel launches only the
    text query blocks (program offset past the video blocks) and leaves the video rows to
    it. A stand-in writes the video rows here (the triton forward's own values), so the
    split call must equal the unsplit one exactly and must not overwrite those rows."""
    from sta_kernels import gluon_sta
    from sta_kernels import triton_sta as ts

    canvas, tile, slots = (4, 4, 8), (2, 2, 4), 24
    window, text = torch.tensor([[1, 1, 1], [2, 1, 2]]), torch.tensor([21, 6])
    q, k, v, _ = make_qkv(2, canvas, slots, 2, 16, torch.bfloat16, triton_device, seed=11)
    args = (q, k, v, window.to(torch.int32).to(triton_device),
            text.to(torch.int32).to(triton_device), canvas, tile, 0.25)
    whole_o, whole_lse = ts.sta_triton_forward(*args)
    num_video = math.prod(canvas)
    sentinel = []

    def stand_in(q, k, v, o, lse, *rest, **kw):
        o[:, :num_video] = whole_o[:, :num_video]
        lse[:, :, :num_video] = whole_lse[:, :, :num_video]
        sentinel.append(o)

    monkeypatch.setattr(ts, "_gluon_applies", lambda *a: True)
    monkeypatch.setattr(gluon_sta, "sta_gluon_video_forward", stand_in)
    o, lse = ts.sta_triton_forward(*args)
    assert sentinel and sentinel[0] is o
    assert torch.equal(o, whole_o) and torch.equal(lse, whole_lse)
    assert torch.any(o[:, num_video:] != 0)
