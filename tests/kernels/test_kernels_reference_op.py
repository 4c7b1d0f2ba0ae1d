"""The reference backend as the registered op ``sta_kernels::sta_reference``: the same values
and gradients as the plain reference, opaque to torch.compile, named by ``forward_ops``."""

from __future__ import annotations

import torch
from kernel_testing import make_qkv

from sta_kernels import forward_ops, sliding_tile_attention
from sta_kernels.reference import sta_reference, sta_reference_backward, sta_reference_op

CANVAS, TILE = (3, 5, 4), (2, 2, 3)  # partial tiles on every axis


def _inputs(dtype=torch.float64, slots=3):
    q, k, v, do = make_qkv(2, CANVAS, slots, 3, 8, dtype, "cpu", seed=11)
    window = torch.tensor([[1, 2, 1], [2, 1, 2], [9, 9, 9]])
    return q, k, v, do, window, torch.tensor([2, 0])


def test_written_out_backward_equals_autograd():
    q, k, v, do, window, text = _inputs()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = sta_reference(*leaves, CANVAS, TILE, window, text, 0.3)
    expected = torch.autograd.grad(o, leaves, do)
    got = sta_reference_backward(do, q, k, v, CANVAS, TILE, window, text, 0.3)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)
        assert g.is_contiguous()


def test_op_matches_the_plain_reference_forward_and_backward():
    q, k, v, do, window, text = _inputs(torch.float32)
    results = []
    for fn in (sta_reference, sta_reference_op):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, CANVAS, TILE, window, text, 0.25)
        results.append((o, *torch.autograd.grad(o, leaves, do)))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_public_reference_runs_the_op_and_compiles_without_graph_breaks():
    from torch._dynamo.utils import counters

    q, k, v, do, window, text = _inputs(torch.float32)

    def attend(q, k, v):
        return sliding_tile_attention(
            q, k, v, canvas=CANVAS, tile=TILE, window=window, text_len=text, backend="reference"
        )

    counters.clear()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (attend, compiled):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        results.append((o, *torch.autograd.grad(o, leaves, do)))
    for got, expected in zip(*results, strict=True):
        assert torch.equal(got, expected)
    assert not counters["graph_break"]


def test_forward_ops_name_the_registered_forwards():
    ops = forward_ops()
    assert torch.ops.sta_kernels.sta_reference.default in ops
    assert torch.ops.sta_kernels.sta_fwd.default in ops  # triton is installed here
