"""Argument validation and dispatch of the public ``sliding_tile_attention``."""

from __future__ import annotations

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


def test_auto_uses_the_reference_off_cuda():
    q, k, v = _q(), _q(), _q()
    auto = sliding_tile_attention(q, k, v, window=(1, 2, 1), **GEOMETRY)
    ref = sliding_tile_attention(q, k, v, window=(1, 2, 1), backend="reference", **GEOMETRY)
    assert torch.equal(auto, ref)
