"""The STA contract of DESIGN.md, checked against a brute-force rule written from it alone.

The backend comparisons elsewhere check flex and triton against the reference, whose mask
comes from ``sta_kernels.geometry`` like flex's own: a wrong rule there, or in the tile ids
both share, would pass them. Here the rule is transcribed from the design notes into plain
Python loops, one token pair at a time, sharing no code with the package; the geometry
helpers, the dense mask, flex's mask_mod and block mask, and the reference and flex outputs
must all agree with it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from kernel_testing import make_qkv

from sta_kernels import density, sliding_tile_attention, sta_dense_mask, tile_mask, token_mask
from sta_kernels.flex import build_sta_block_mask, build_sta_mask_mod, tile_order


def axis_attends(qi: int, ki: int, n: int, w: int) -> bool:
    """DESIGN.md's rule on one axis of ``n`` tiles: does query tile qi see key tile ki?"""
    w = min(w, n)  # a window of n or more tiles is the whole axis
    lo = w // 2
    hi = w - 1 - lo
    c = min(max(qi, lo), n - 1 - hi)
    return c - lo <= ki <= c + hi


def brute_tile_mask(canvas, tile, windows) -> torch.Tensor:
    """(H, N, N) bool over raster-ordered tiles, each pair decided by ``axis_attends``."""
    n = [-(-c // t) for c, t in zip(canvas, tile, strict=True)]
    tiles = [(a, b, c) for a in range(n[0]) for b in range(n[1]) for c in range(n[2])]
    mask = torch.zeros(len(windows), len(tiles), len(tiles), dtype=torch.bool)
    for h, window in enumerate(windows):
        for i, qt in enumerate(tiles):
            for j, kt in enumerate(tiles):
                mask[h, i, j] = all(axis_attends(qt[a], kt[a], n[a], window[a]) for a in range(3))
    return mask


def brute_mask(canvas, tile, windows, text_len, seq_len) -> torch.Tensor:
    """(B, H, S, S) bool: does query token q attend key token k, straight from the contract.

    Video tokens are raster (t, h, w), w fastest, each in tile (t // tt, h // th, w // tw);
    then text slots, the first ``text_len[b]`` valid and the rest padding.
    """
    num_t, num_h, num_w = canvas
    num_video = num_t * num_h * num_w
    n = [-(-c // t) for c, t in zip(canvas, tile, strict=True)]
    tile_of = []
    for s in range(num_video):
        t, h, w = s // (num_h * num_w), (s // num_w) % num_h, s % num_w
        tile_of.append((t // tile[0], h // tile[1], w // tile[2]))
    # one table per head and axis: allowed[h][axis][qi][ki]
    allowed = [
        [
            [[axis_attends(qi, ki, n[a], window[a]) for ki in range(n[a])] for qi in range(n[a])]
            for a in range(3)
        ]
        for window in windows
    ]
    mask = torch.zeros(len(text_len), len(windows), seq_len, seq_len, dtype=torch.bool)
    for b, valid_text in enumerate(text_len):
        end = num_video + valid_text  # first padding slot
        for h in range(len(windows)):
            rows = []
            for q in range(seq_len):
                row = []
                for k in range(seq_len):
                    if q >= end or k >= end:  # padding: never attended, attends nothing
                        row.append(False)
                    elif q < num_video and k < num_video:
                        qt, kt = tile_of[q], tile_of[k]
                        row.append(all(allowed[h][a][qt[a]][kt[a]] for a in range(3)))
                    else:  # video-text, text-video, text-text: all valid tokens
                        row.append(True)
                rows.append(row)
            mask[b, h] = torch.tensor(rows, dtype=torch.bool)
    return mask


def brute_attention(q, k, v, mask) -> torch.Tensor:
    """Masked softmax attention in float64 with the default scale; rows without keys are 0.

    q, k, v: (B, S, H, D); mask: (B, H, S, S). Returns (B, S, H, D) float64.
    """
    qh, kh, vh = (x.double().transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    scores = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    peak = scores.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    weights = torch.where(mask, (scores - peak).exp(), torch.zeros_like(scores))
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return (probs @ vh).transpose(1, 2)


# (canvas, tile, per-head windows, text_len per batch element, text slots)
CASES = {
    # 3, 4 and 5 tiles, every edge tile partial; even and odd windows on every axis,
    # windows equal to and wider than an axis
    "tiles_3x4x5": ((5, 7, 9), (2, 2, 2), [[2, 3, 2], [3, 2, 3], [1, 4, 5], [7, 1, 4]], [0], 0),
    # 3 tiles a side, partial on h and w; text of three lengths (full, short, none)
    "text": ((3, 5, 7), (1, 2, 3), [[1, 2, 3], [2, 3, 2]], [4, 1, 0], 4),
    # one tile on t and h, partial tiles on w
    "thin": ((1, 6, 5), (1, 6, 2), [[1, 1, 2], [1, 1, 1]], [3, 2], 3),
    # every tile full and 16 tokens: the flex block mask's fast path (no mask_mod)
    "aligned": ((4, 4, 8), (2, 2, 4), [[1, 1, 1], [2, 1, 3]], [0], 0),
}


def _case(name):
    canvas, tile, windows, text, slots = CASES[name]
    return canvas, tile, windows, text, math.prod(canvas) + slots


@functools.cache
def _expected_mask(name: str) -> torch.Tensor:
    """The brute-force mask of a case, built once per session (the loops take a while)."""
    canvas, tile, windows, text, seq = _case(name)
    return brute_mask(canvas, tile, windows, text, seq)


@pytest.mark.parametrize(
    "n,w,expected",
    [
        # key tile range [first, last] of each query tile 0..n-1
        (5, 1, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]),
        (5, 2, [(0, 1), (0, 1), (1, 2), (2, 3), (3, 4)]),
        (5, 3, [(0, 2), (0, 2), (1, 3), (2, 4), (2, 4)]),
        (5, 4, [(0, 3), (0, 3), (0, 3), (1, 4), (1, 4)]),
        (3, 7, [(0, 2), (0, 2), (0, 2)]),
        (1, 2, [(0, 0)]),
    ],
)
def test_axis_rule_by_hand(n, w, expected):
    """The transcribed rule, pinned by windows worked out by hand: the window keeps its
    width min(w, n), shifts inward at the edges, and an even window reaches one tile further
    back than forward."""
    for qi, (first, last) in enumerate(expected):
        seen = [ki for ki in range(n) if axis_attends(qi, ki, n, w)]
        assert seen == list(range(first, last + 1)), (n, w, qi)


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_matches_the_brute_force_rule(name):
    canvas, tile, windows, text, seq = _case(name)
    window = torch.tensor(windows)
    num_video = math.prod(canvas)
    expected = _expected_mask(name)  # (B, H, S, S)
    video = expected[0, :, :num_video, :num_video]  # (H, Sv, Sv)
    assert torch.equal(tile_mask(canvas, tile, window), brute_tile_mask(canvas, tile, windows))
    assert torch.equal(token_mask(canvas, tile, window), video)
    fraction = video.double().mean((-1, -2))  # (H,) attended share of video pairs
    torch.testing.assert_close(density(canvas, tile, window).double(), fraction, rtol=1e-6, atol=0)
    assert torch.equal(sta_dense_mask(canvas, tile, window, torch.tensor(text), seq), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_flex_masks_match_the_brute_force_rule(name):
    """flex's mask_mod token by token, and its block mask block by block (16-token blocks
    of the tile-ordered sequence: a block is listed iff one of its pairs attends)."""
    canvas, tile, windows, text, seq = _case(name)
    window, lengths = torch.tensor(windows), torch.tensor(text)
    num_video = math.prod(canvas)
    expected = _expected_mask(name)  # (B, H, S, S) raster order
    order = torch.cat([tile_order(canvas, tile), torch.arange(num_video, seq)])
    tiled = expected[:, :, order][:, :, :, order]  # (B, H, S, S) in flex's token order
    mask_mod = build_sta_mask_mod(canvas, tile, window, lengths)
    idx = torch.arange(seq)
    b = torch.arange(len(text)).view(-1, 1, 1, 1)
    h = torch.arange(len(windows)).view(1, -1, 1, 1)
    assert torch.equal(mask_mod(b, h, idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1)), tiled)

    block = 16
    blocks = -(-seq // block)
    padded = torch.zeros(len(text), len(windows), blocks * block, blocks * block, dtype=torch.bool)
    padded[:, :, :seq, :seq] = tiled
    any_pair = padded.view(len(text), len(windows), blocks, block, blocks, block).any(5).any(3)
    block_mask = build_sta_block_mask(canvas, tile, window, lengths, seq, "cpu", block)
    assert torch.equal(block_mask.to_dense().bool(), any_pair)


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_brute_force_attention(name):
    """The dense reference (float64) and flex (forward on CPU, float64) against a masked
    softmax over the brute-force mask; padding query rows exactly 0."""
    canvas, tile, windows, text, seq = _case(name)
    q, k, v, _ = make_qkv(
        len(text), canvas, seq - math.prod(canvas), len(windows), 16, torch.float64, "cpu", seed=21
    )
    expected = brute_attention(q, k, v, _expected_mask(name))
    kw = dict(canvas=canvas, tile=tile, window=torch.tensor(windows), text_len=torch.tensor(text))
    for backend in ("reference", "flex"):
        o = sliding_tile_attention(q, k, v, backend=backend, **kw)
        torch.testing.assert_close(o, expected, rtol=1e-10, atol=1e-12, msg=backend)
        for b, valid_text in enumerate(text):
            assert torch.all(o[b, math.prod(canvas) + valid_text :] == 0), backend
