"""Tile geometry helpers and the flex backend against the dense reference mask."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import make_qkv, rel_err

from sta_kernels import (
    density,
    query_tile_range,
    sliding_tile_attention,
    sta_dense_mask,
    tile_mask,
    token_tile_ids,
    window_density,
)
from sta_kernels.flex import build_sta_block_mask, build_sta_mask_mod, tile_order

# (canvas, tile, per-head windows, text_len per batch element, text slots)
MASK_CASES = [
    ((4, 4, 8), (2, 2, 4), [[1, 1, 1], [2, 1, 3]], [0], 0),
    ((3, 5, 7), (2, 3, 4), [[1, 2, 1], [3, 3, 3], [9, 9, 9]], [0, 4, 2], 4),  # partial tiles
    ((1, 6, 5), (1, 6, 2), [[1, 1, 2]], [3], 3),  # 1-tile axes, text full
]


def test_window_density_counts_the_masks_pairs_exactly():
    """The mask-free density equals the attended share of the tile masks' token pairs, to
    the last bit of the float64 fraction (and ``density`` to the last bit of its float32),
    on canvases with partial tiles on any axis and windows wider than an axis."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        canvas = tuple(int(x) for x in torch.randint(1, 12, (3,), generator=gen))
        tile = tuple(int(x) for x in torch.randint(1, 5, (3,), generator=gen))
        windows = torch.randint(1, 7, (3, 3), generator=gen)
        tokens = torch.bincount(token_tile_ids(canvas, tile)).double()  # (N,) per tile
        pairs = torch.einsum("q,hqk,k->h", tokens, tile_mask(canvas, tile, windows).double(),
                             tokens)  # (H,) attended token pairs, exact integers
        fraction = pairs / tokens.sum() ** 2
        got = [window_density(canvas, tile, w) for w in windows.tolist()]
        assert got == fraction.tolist(), (canvas, tile, windows)
        assert torch.equal(density(canvas, tile, windows), fraction.float())
    assert window_density((5, 8, 8), (1, 2, 2), (9, 9, 9)) == 1.0
    assert window_density((30, 48, 80), (6, 8, 8), (3, 3, 3)) == 27 / 300


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_query_tile_range_inverts_the_window(n):
    for w in range(1, n + 2):
        window = torch.tensor([[w, 1, 1]])
        m = tile_mask((n, 1, 1), (1, 1, 1), window)[0]  # (n, n) [query, key]
        for ki in range(n):
            first, count = query_tile_range(ki, n, w)
            expected = torch.nonzero(m[:, ki]).flatten().tolist()
            assert expected == list(range(first, first + count)), (n, w, ki)


@pytest.mark.parametrize("canvas,tile,window,text,slots", MASK_CASES)
def test_flex_mask_mod_equals_reference_mask(canvas, tile, window, text, slots):
    window, text = torch.tensor(window), torch.tensor(text)
    num_video = math.prod(canvas)
    seq = num_video + slots
    mask_mod = build_sta_mask_mod(canvas, tile, window, text)
    idx = torch.arange(seq)
    b = torch.arange(len(text)).view(-1, 1, 1, 1)
    h = torch.arange(window.shape[0]).view(1, -1, 1, 1)
    tiled = mask_mod(b, h, idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1))  # tile order
    order = torch.cat([tile_order(canvas, tile), torch.arange(num_video, seq)])
    inverse = torch.argsort(order)
    raster = tiled[:, :, inverse][:, :, :, inverse]
    assert torch.equal(raster, sta_dense_mask(canvas, tile, window, text, seq))


def test_tile_order_is_a_tile_major_permutation():
    canvas, tile = (3, 5, 7), (2, 3, 4)
    perm = tile_order(canvas, tile)
    assert torch.equal(torch.sort(perm).values, torch.arange(math.prod(canvas)))
    ids = token_tile_ids(canvas, tile)[perm]
    assert bool((ids[1:] >= ids[:-1]).all())


def test_flex_block_mask_fast_path_equals_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    canvas, tile = (4, 4, 8), (2, 2, 4)  # full 16-token tiles: blocks of 16 align
    window, text = torch.tensor([[1, 1, 1], [2, 1, 3]]), torch.tensor([0])
    seq = math.prod(canvas)
    fast = build_sta_block_mask(canvas, tile, window, text, seq, "cpu", block_size=16)
    exact = create_block_mask(build_sta_mask_mod(canvas, tile, window, text), 1, 2, seq, seq,
                              device="cpu", BLOCK_SIZE=16)
    assert torch.equal(fast.to_dense(), exact.to_dense())
    # every block is full: the block mask is the tile mask itself
    assert torch.equal(fast.to_dense()[0].bool(), tile_mask(canvas, tile, window))


@pytest.mark.parametrize("canvas,tile,window,text,slots", MASK_CASES[:2])
def test_flex_matches_reference(canvas, tile, window, text, slots):
    window, text = torch.tensor(window), torch.tensor(text)
    q, k, v, _ = make_qkv(len(text), canvas, slots, window.shape[0], 16, torch.float32, "cpu")
    kw = dict(canvas=canvas, tile=tile, window=window, text_len=text)
    o = sliding_tile_attention(q, k, v, backend="flex", **kw)
    ref = sliding_tile_attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert rel_err(o, ref) < 1e-5
    num_video = math.prod(canvas)
    for b, n in enumerate(text.tolist()):
        assert torch.all(o[b, num_video + n:] == 0)
