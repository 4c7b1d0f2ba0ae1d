"""Argument validation and dispatch of the public ``sliding_tile_attention``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sta_kernels import resolve_backend, sliding_tile_attention


def _q(seq=32, heads=2, dim=16, batch=1, dtype=torch.float32):
    return torch.randn(batch, seq, heads, dim, dtype=dtype)


GEOMETRY = dict(canvas=(2, 4, 4), tile=(1, 2, 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=(0, 1, 1)), "window entries must be >= 1"),
        (dict(window=(1, -2, 1)), "window entries must be >= 1"),
        (dict(window=(1, 1)), "window must be a triple"),
        (dict(window=torch.ones(3, 3, dtype=torch.int64)), r"shape \(H, 3\) = \(2, 3\)"),
        (dict(window=(1.5, 1, 1)), "window must hold integers"),
        (dict(window=(1, 1, 1), backend="cuda"), "backend must be one of"),
        (dict(window=(1, 1, 1), canvas=(2, 4, 5)), "smaller than the canvas"),
        (dict(window=(1, 1, 1), tile=(0, 2, 2)), "tile must be a list of 3 positive ints"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match):
    q = _q()
    with pytest.raises(ValueError, match=match):
        sliding_tile_attention(q, q, q, **{**GEOMETRY, **kwargs})


def test_shapes_that_disagree():
    q = _q()
    with pytest.raises(ValueError, match="share one"):
        sliding_tile_attention(q, q, _q(seq=33), window=(1, 1, 1), **GEOMETRY)
    with pytest.raises(ValueError, match="share a dtype"):
        sliding_tile_attention(q, q, q.double(), window=(1, 1, 1), **GEOMETRY)


def test_text_len_must_fit_the_text_slots():
    q = _q(seq=36, batch=2)
    with pytest.raises(ValueError, match="text_len=0"):
        sliding_tile_attention(q, q, q, window=(1, 1, 1), **GEOMETRY)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
        sliding_tile_attention(q, q, q, window=(1, 1, 1), text_len=torch.tensor([5, 1]),
                               **GEOMETRY)
    with pytest.raises(ValueError, match=r"\(B,\) = \(2,\)"):
        sliding_tile_attention(q, q, q, window=(1, 1, 1), text_len=torch.tensor([1, 1, 1]),
                               **GEOMETRY)


def test_resolve_backend_off_cuda_and_explicit_choices():
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        assert resolve_backend(_q(dtype=dtype)) == "reference"
    assert resolve_backend(_q(), "flex") == "flex"


# The triton kernels' documented head dims (kernels/README.md), written out here rather than
# read from TRITON_HEAD_DIMS so that a change to the dispatch table shows up as a failure.
TRITON_DIMS = (16, 32, 64, 128)


def _cuda_q(dtype, head_dim):
    """What resolve_backend reads of a CUDA q (is_cuda, dtype, shape), without a GPU."""
    return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 8, 2, head_dim))


@pytest.mark.parametrize("head_dim", [8, 16, 32, 48, 64, 80, 96, 128, 256])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str
)
def test_resolve_backend_on_cuda(dtype, head_dim):
    """auto on CUDA: triton for bf16/fp16 at the kernels' head dims, flex for the other
    fp16/bf16/fp32 inputs, the reference for anything else (float64)."""
    if dtype in (torch.bfloat16, torch.float16) and head_dim in TRITON_DIMS:
        expected = "triton"
    elif dtype in (torch.bfloat16, torch.float16, torch.float32):
        expected = "flex"
    else:
        expected = "reference"
    q = _cuda_q(dtype, head_dim)
    assert resolve_backend(q) == expected
    assert resolve_backend(q, "auto") == expected
    for backend in ("triton", "flex", "reference"):  # an explicit choice is never overridden
        assert resolve_backend(q, backend) == backend


@pytest.mark.parametrize("head_dim", [16, 48, 64, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_auto_picks_triton_exactly_where_the_kernels_accept_the_input(dtype, head_dim):
    """Dispatch and the triton backend's own input check agree, so auto never routes an
    input to triton that it would reject."""
    from sta_kernels.ops import check_inputs

    q = _cuda_q(dtype, head_dim)
    try:
        check_inputs(q)
        accepted = True
    except ValueError:
        accepted = False
    assert (resolve_backend(q) == "triton") == accepted


def test_auto_uses_the_reference_off_cuda():
    q, k, v = _q(), _q(), _q()
    auto = sliding_tile_attention(q, k, v, window=(1, 2, 1), **GEOMETRY)
    ref = sliding_tile_attention(q, k, v, window=(1, 2, 1), backend="reference", **GEOMETRY)
    assert torch.equal(auto, ref)


def test_runs_dense_needs_covering_windows_and_no_text_padding():
    """``auto`` hands a call to SDPA only when STA is dense attention: every head's window
    spans the tile grid (2x2x2 tiles here) and no text slot is padding."""
    from sta_kernels.api import runs_dense

    canvas, tile = (2, 4, 4), (1, 2, 2)
    full = torch.tensor([[2, 2, 2], [9, 9, 9]])
    none = torch.zeros(1, dtype=torch.int64)
    assert runs_dense(full, canvas, tile, none, 0)
    assert runs_dense(full, canvas, tile, torch.tensor([3, 3]), 3)
    assert not runs_dense(full, canvas, tile, torch.tensor([3, 1]), 3)  # padded text
    assert not runs_dense(torch.tensor([[2, 2, 2], [2, 1, 2]]), canvas, tile, none, 0)


def test_auto_runs_sdpa_for_a_dense_call(monkeypatch):
    """On CUDA, ``auto`` at a covering window equals the triton kernel without running it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: off CUDA auto resolves to the reference")
    from sta_kernels import ops

    canvas, tile = (5, 12, 20), (6, 8, 8)  # partial tiles on every axis, 1x2x3 tiles
    q, k, v = (torch.randn(2, 1200, 2, 64, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    kernel = sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=(1, 2, 3),
                                    backend="triton")

    def refuse(*args, **kwargs):
        raise AssertionError("auto ran the sparse kernel for a dense call")

    monkeypatch.setattr(ops, "sta_triton", refuse)
    dense = sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=(1, 2, 3))
    err = ((dense.float() - kernel.float()).norm() / kernel.float().norm()).item()
    assert err < 1e-2, err
    with pytest.raises(AssertionError, match="sparse kernel"):  # a sparse window still does
        sliding_tile_attention(q, k, v, canvas=canvas, tile=tile, window=(1, 1, 3))


def test_fp8_refuses_what_it_cannot_run():
    """fp8=True is a forward for sampling on the triton backend: gradients, another backend
    and a call outside the FP8 kernel's scope each fail with the reason."""
    q = _q(seq=2 * 16 * 8, dim=128, dtype=torch.bfloat16)
    geometry = dict(canvas=(2, 16, 8), tile=(2, 8, 8), window=(1, 1, 1))
    with pytest.raises(ValueError, match="fp8=True has no backward"):
        sliding_tile_attention(q.requires_grad_(), q, q, fp8=True, **geometry)
    q = q.detach()
    with pytest.raises(ValueError, match="backend='flex' cannot"):
        sliding_tile_attention(q, q, q, fp8=True, backend="flex", **geometry)
    with pytest.raises(ValueError, match="needs a CUDA"):  # this machine's q is on the CPU
        sliding_tile_attention(q, q, q, fp8=True, **geometry)
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        qc = q.cuda()
        with pytest.raises(ValueError, match="full tiles"):
            sliding_tile_attention(qc[:, : 2 * 8 * 8], qc[:, : 2 * 8 * 8], qc[:, : 2 * 8 * 8],
                                   fp8=True, canvas=(2, 8, 8), tile=(2, 4, 4), window=(1, 1, 1))
        with pytest.raises(ValueError, match="head dim 128"):
            qd = qc[..., :64].contiguous()
            sliding_tile_attention(qd, qd, qd, fp8=True, **geometry)
