"""The triton backend (forward and backward) against the float64 reference.

Off CUDA these run in triton's interpreter (see conftest.py), so sizes stay tiny. Errors are
judged against the error of a low-precision reference (16-bit matmuls, fp32 softmax, as a
16-bit kernel computes) on the same inputs: the kernel must be at most twice as far from
the fp64 truth as that reference for the output, three times for the gradients (the kernel's
delta = rowsum(o * do) uses the rounded 16-bit o, as flash attention's does; with a dozen keys
per row this alone reaches ~2x, seen in the 'many_tiles' case).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import lowp_attention, make_qkv, rel_err

from sta_kernels import sliding_tile_attention

GRAD_FACTOR = 3

# name: (batch, canvas, tile, per-head windows, text_len, text slots, head_dim, dtype)
CASES = {
    "aligned": (1, (4, 4, 8), (2, 2, 4), [[1, 1, 1], [2, 1, 3]], [0], 0, 16, torch.bfloat16),
    # partial tiles on t and w, one tile on h, tiles of 24 tokens = 1.5 blocks of 16;
    # text absent in one batch element and full in the other
    "partial": (2, (3, 3, 6), (2, 3, 4), [[1, 1, 1], [2, 1, 2]], [0, 5], 5, 16, torch.bfloat16),
    # five tiles on t: interior, edge and clamped windows (odd and even widths)
    "many_tiles": (1, (5, 1, 4), (1, 1, 4), [[3, 1, 1], [4, 1, 1]], [0], 0, 16, torch.bfloat16),
    # text padded differently per batch element, fp16, D=32
    "padded_text": (2, (2, 4, 4), (2, 2, 2), [[1, 2, 1]], [3, 1], 4, 32, torch.float16),
    # 3, 4 and 5 tiles on t, h, w, each axis ending in a partial tile. Head 0: an odd
    # window on h (clamped at both ends, free in the middle), an even one on w; head 1: an
    # even window on t. Tiles of 8 tokens fill part of a block: masked rows in every block.
    "tiles_3x4x5": (1, (5, 7, 9), (2, 2, 2), [[1, 3, 2], [2, 1, 1]], [0], 0, 16, torch.bfloat16),
    # 3 tiles on every axis, all partial; even window on h, odd on w (3 of 3 tiles: clamped
    # at both ends); joint text with a different valid length per batch element
    "text_tiles_3x3x3": (2, (5, 5, 7), (2, 2, 3), [[1, 2, 3]], [4, 1], 5, 16, torch.bfloat16),
    # interpreter blocks of 16 = 2 whole frames of 2x4 (hoisted addressing, TMA loads) at
    # partial tiles on every axis; the last tile on t has 1 frame: its second block is all
    # padding and skipped inside the loops
    "frames_partial": (2, (5, 3, 6), (4, 2, 4), [[1, 1, 1], [2, 2, 2]], [3, 0], 3, 16,
                       torch.bfloat16),
}
# Those two cost ~10x the others in triton's interpreter (about ten seconds each), so off
# CUDA they run the default schedule (fused dq) only: the dq kernel finds its key tiles with
# the forward's window code (``_query_window``, ``_window_keys``), which they check in full.
INTERPRETER_FUSED_ONLY = ("tiles_3x4x5", "text_tiles_3x3x3")


def _run(q, k, v, do, backend, **kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fn = lowp_attention if backend == "lowp" else sliding_tile_attention
    extra = {} if backend == "lowp" else {"backend": backend}
    o = fn(*leaves, **kw, **extra)
    return (o, *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("fused", [False, True], ids=["dq_kernel", "fused_dq"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, fused, triton_device, monkeypatch):
    """Both backward schedules: a dq kernel, or dq added by the dk/dv kernel (atomics)."""
    from dataclasses import replace

    from sta_kernels import ops

    if not fused and name in INTERPRETER_FUSED_ONLY and triton_device.type != "cuda":
        pytest.skip("many tiles: the interpreter runs this case's default schedule only")
    config = replace(ops.default_config(triton_device), fused_dq=fused)
    monkeypatch.setattr(ops, "default_config", lambda device, partial=False: config)
    batch, canvas, tile, window, text, slots, head_dim, dtype = CASES[name]
    window, text = torch.tensor(window), torch.tensor(text)
    q, k, v, do = make_qkv(batch, canvas, slots, window.shape[0], head_dim, dtype, triton_device)
    kw = dict(canvas=canvas, tile=tile, window=window, text_len=text)
    got = _run(q, k, v, do, "triton", **kw)
    ref = _run(q.double(), k.double(), v.double(), do.double(), "reference", **kw)
    low = _run(q.cpu(), k.cpu(), v.cpu(), do.cpu(), "lowp", **kw)
    for label, g, r, lo in zip(("o", "dq", "dk", "dv"), got, ref, low, strict=True):
        assert g.dtype == dtype and g.shape == q.shape
        assert torch.isfinite(g).all(), label
        err, low_err = rel_err(g, r), rel_err(lo, r.cpu())
        factor = 2 if label == "o" else GRAD_FACTOR
        assert err <= factor * low_err + 1e-4, (
            f"{name} {label}: {err:.2e} vs low-precision {low_err:.2e}"
        )


def test_triton_text_padding_is_exactly_zero(triton_device):
    canvas, tile, slots = (2, 2, 4), (2, 2, 2), 5
    text = torch.tensor([2, 0])
    q, k, v, do = make_qkv(2, canvas, slots, 1, 16, torch.bfloat16, triton_device, seed=3)
    o, dq, dk, dv = _run(q, k, v, do, "triton", canvas=canvas, tile=tile, window=(1, 1, 1),
                         text_len=text)
    num_video = math.prod(canvas)
    for b, n in enumerate(text.tolist()):
        for t in (o, dq, dk, dv):
            assert torch.all(t[b, num_video + n:] == 0)
        assert torch.any(o[b, :num_video + n] != 0)


def test_triton_full_window_is_dense_attention(triton_device):
    canvas, tile = (2, 4, 4), (1, 2, 2)
    q, k, v, do = make_qkv(1, canvas, 0, 2, 64, torch.float16, triton_device, seed=5)
    o, dq, dk, dv = _run(q, k, v, do, "triton", canvas=canvas, tile=tile, window=(9, 9, 9))
    leaves = [x.double().transpose(1, 2).requires_grad_() for x in (q, k, v)]  # (B, H, S, D)
    dense = torch.nn.functional.scaled_dot_product_attention(*leaves)
    grads = torch.autograd.grad(dense, leaves, do.double().transpose(1, 2))
    low = _run(q.cpu(), k.cpu(), v.cpu(), do.cpu(), "lowp", canvas=canvas, tile=tile,
               window=torch.tensor([[9, 9, 9]] * 2), text_len=0)
    for i, (g, r, lo) in enumerate(zip((o, dq, dk, dv), (dense, *grads), low, strict=True)):
        r = r.transpose(1, 2)
        assert rel_err(g, r) <= (2 if i == 0 else GRAD_FACTOR) * rel_err(lo, r.cpu()) + 1e-4


def test_triton_under_torch_compile(triton_device):
    canvas, tile = (2, 4, 4), (2, 2, 4)
    q, k, v, do = make_qkv(1, canvas, 0, 2, 16, torch.bfloat16, triton_device, seed=7)

    def attend(q, k, v):
        return sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=(1, 1, 1),
                                      backend="triton")

    eager = _run(q, k, v, do, "triton", canvas=canvas, tile=tile, window=(1, 1, 1))
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled_fn = torch.compile(attend, backend=backend, fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = compiled_fn(*leaves)
    compiled = (o, *torch.autograd.grad(o, leaves, do))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def test_triton_in_a_compiled_selectively_checkpointed_region(triton_device, monkeypatch):
    """The op inside ``torch.compile(checkpoint(...))`` with a policy that keeps its outputs
    (what ``model.checkpoint_policy=selective`` + ``model.compile`` build per block): same
    values and gradients as eager, and the backward never reruns the forward kernel."""
    from functools import partial

    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    from sta_kernels import ops

    canvas, tile = (2, 4, 4), (2, 2, 4)
    q, k, v, do = make_qkv(1, canvas, 0, 2, 16, torch.bfloat16, triton_device, seed=9)
    weight = torch.randn(16, 16, dtype=torch.bfloat16, device=triton_device) / 4
    fwd_op = torch.ops.sta_kernels.sta_fwd.default

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is fwd_op else CheckpointPolicy.PREFER_RECOMPUTE

    captured = []  # as distillation captures the student's attention outputs

    def block(q, k, v, window):
        o = sliding_tile_attention(
            (q @ weight).tanh(), k, v, canvas=canvas, tile=tile, window=window, backend="triton"
        )
        captured.append(o)
        return (o @ weight).sin()

    def region(q, k, v, window):
        context = partial(create_selective_checkpoint_contexts, policy)
        return checkpoint(block, q, k, v, window, use_reentrant=False, context_fn=context)

    forward_calls = []
    kernel = ops.sta_triton_forward
    monkeypatch.setattr(ops, "sta_triton_forward", lambda *a: forward_calls.append(1) or kernel(*a))
    results = []
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    for fn in (block, torch.compile(region, backend=backend)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, torch.tensor([[1, 1, 1], [2, 1, 1]]))  # windows: a graph input
        loss = (o.float() * do).sum() + captured.pop().float().square().sum()
        results.append((o, *torch.autograd.grad(loss, leaves)))
    for a, b in zip(*results, strict=True):
        assert rel_err(b.float(), a.float()) < 2e-2
    assert len(forward_calls) == 2  # eager once, compiled once: no recomputation in backward


def test_triton_fake_ops_give_shapes_without_running():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import sta_kernels.ops  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        q = torch.empty(2, 40, 3, 64, dtype=torch.bfloat16)
        w, t = torch.ones(3, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        o, lse = torch.ops.sta_kernels.sta_fwd(q, q, q, w, t, [2, 4, 5], [1, 2, 5], 0.125)
        dq, dk, dv = torch.ops.sta_kernels.sta_bwd(o, q, q, q, o, lse, w, t, [2, 4, 5],
                                                   [1, 2, 5], 0.125)
    assert o.shape == q.shape and lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    assert dq.shape == dk.shape == dv.shape == q.shape


def test_device_tables_are_cached_by_value(triton_device):
    from sta_kernels.ops import device_table

    first = device_table(torch.tensor([[3, 3, 3], [1, 2, 5]]), triton_device)
    again = device_table(torch.tensor([[3, 3, 3], [1, 2, 5]]), triton_device)
    other = device_table(torch.tensor([[3, 3, 3], [1, 2, 6]]), triton_device)
    assert again is first and other is not first
    assert first.dtype == torch.int32 and first.tolist() == [[3, 3, 3], [1, 2, 5]]


@pytest.mark.parametrize(
    "dtype,head_dim,match",
    [(torch.float32, 16, "dtypes"), (torch.bfloat16, 48, "head dims")],
)
def test_triton_rejects_unsupported_inputs(dtype, head_dim, match, triton_device):
    q = torch.zeros(1, 8, 1, head_dim, dtype=dtype, device=triton_device)
    with pytest.raises(ValueError, match=match):
        sliding_tile_attention(q, q, q, canvas=(1, 2, 4), tile=(1, 2, 4), window=(1, 1, 1),
                               backend="triton")


@pytest.mark.parametrize("partial", [False, True], ids=["full_tiles", "partial_tiles"])
def test_triton_tma_loads_match_pointer_loads(partial, triton_device):
    """The TMA (tensor-descriptor) paths compute what the pointer paths do: k/v loads in the
    forward and dq kernels, and the fused dq's reduce-add; blocks of whole frames, full tiles or
    partial ones on every axis (TMA reads zeros past the canvas and drops the reduce there),
    per-head windows, padded text."""
    from dataclasses import replace

    from sta_kernels import ops
    from sta_kernels.kernels import triton_sta

    if triton_sta.TensorDescriptor is None:
        pytest.skip("this triton has no host-side tensor descriptors")
    if torch.cuda.is_available():  # the tuned blocks: 6x8x8 tiles, blocks of 1-2 frames
        canvas, tile, head_dim = ((11, 13, 21) if partial else (12, 16, 24)), (6, 8, 8), 128
    else:  # tiles of 2 frames of 2x4 tokens; interpreter blocks of 16 tokens = 2 frames
        canvas, tile, head_dim = ((3, 3, 7) if partial else (4, 4, 8)), (2, 2, 4), 16
    slots = 3
    window = torch.tensor([[1, 1, 1], [2, 1, 3]])
    text = torch.tensor([2, 0])
    q, k, v, do = make_qkv(2, canvas, slots, 2, head_dim, torch.bfloat16, triton_device, seed=11)
    windows = ops.device_table(window, q.device)
    lengths = ops.device_table(text, q.device)
    scale = head_dim**-0.5
    base = replace(ops.default_config(q.device), fwd_tma=False, dq_tma=False)
    tma = replace(base, fwd_tma=True, dq_tma=True)
    # fused dq: TMA reduce-add for the window's blocks, pointer atomics for text queries
    fused = replace(base, fused_dq=True, fused_dq_tma=True)
    # the two-kernel schedule with TMA loads in the forward and dq kernels (the default at
    # partial tiles on CUDA, see PARTIAL_TILES)
    two = replace(base, fused_dq=False, fwd_tma=True, dq_tma=True)
    geo = triton_sta.LaunchGeometry(q.shape[1], canvas, tile)
    assert geo.hoist(tma.fwd_block_n, tma.fwd_block_m, tma.fwd_block_n)
    assert geo.even(tma.fwd_block_m, tma.fwd_block_n) is not partial
    assert isinstance(geo.descriptor(k, tma.fwd_block_n, True), triton_sta.TensorDescriptor)
    results = []
    for cfg in (base, tma, fused, two):
        o, lse = ops.sta_triton_forward(q, k, v, windows, lengths, canvas, tile, scale, cfg)
        grads = ops.sta_triton_backward(do, q, k, v, o, lse, windows, lengths, canvas, tile,
                                       scale, cfg)
        results.append((o, lse, *grads))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *results[:2], strict=True):
        if q.is_cuda:  # same math; the compiled schedules may differ in rounding only
            assert rel_err(a, b) <= 1e-3, name
        else:
            assert torch.equal(a, b), name
    ref = _run(q.double(), k.double(), v.double(), do.double(), "reference", canvas=canvas,
               tile=tile, window=window, text_len=text)
    low = _run(q.cpu(), k.cpu(), v.cpu(), do.cpu(), "lowp", canvas=canvas, tile=tile,
               window=window, text_len=text)
    for res in results[1:]:
        got = (res[0], *res[2:])
        for label, g, r, lo in zip(("o", "dq", "dk", "dv"), got, ref, low, strict=True):
            assert rel_err(g, r) <= GRAD_FACTOR * rel_err(lo, r.cpu()) + 1e-4, label


def test_deterministic_mode_uses_the_two_kernel_backward(triton_device):
    """Fused dq adds with atomics (order-dependent rounding); deterministic mode avoids them
    and then reproduces the gradients bitwise."""
    from sta_kernels import ops

    assert ops.default_config(triton_device).fused_dq
    canvas, tile = (2, 4, 8), (1, 2, 4)
    if torch.cuda.is_available():
        canvas, tile = (12, 16, 16), (6, 8, 8)
    q, k, v, do = make_qkv(1, canvas, 0, 2, 64, torch.bfloat16, triton_device, seed=13)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert not ops.default_config(triton_device).fused_dq
        runs = [_run(q, k, v, do, "triton", canvas=canvas, tile=tile, window=(1, 3, 3))
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    fused = _run(q, k, v, do, "triton", canvas=canvas, tile=tile, window=(1, 3, 3))
    for label, a, b in zip(("o", "dq", "dk", "dv"), fused, runs[0], strict=True):
        assert rel_err(a, b) <= 1e-2, label
