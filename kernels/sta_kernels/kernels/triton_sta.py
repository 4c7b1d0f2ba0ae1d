"""The Triton kernels of the triton backend (forward, dq, dk/dv and two light passes) and
their launchers.

Layout and addressing
    q, k, v, o are (B, S, H, D) with video tokens in raster (t, h, w) order. No tile-order
    copy is made: a program's block of BLOCK tokens is a slice of one tile's local index
    space (``local = lt*TH*TW + lh*TW + lw``), turned into raster token indices in-kernel,
    so every row load is one D-contiguous segment wherever the token sits. A block of
    whole (TH, TW) frames is its first token plus loop-invariant offsets, or one box of a
    TMA descriptor of the (B, CT, CH, CW, H * D) view; at partial tiles its rows past the
    canvas are masked by their (t, h, w), and TMA reads them as zeros and drops them from
    a reduce.

Programs (grid = (blocks, B*H), one launch for every batch element, head and window)
    forward / dq: one program per query block. Video query blocks loop over the
        ``wt*wh*ww`` key tiles of their head's window (computed in-kernel from the (H, 3)
        window table), then over the valid text keys. Text query blocks attend densely to
        all video keys and the valid text keys.
    dk / dv: one program per key block. A video key tile's queries form a contiguous tile
        range per axis (the window start is monotone in the query tile), looped the same
        way, then the valid text queries. Text key blocks are attended by every query.
        With ``FUSED_DQ`` it also adds each block pair's dq = ds k into an fp32 buffer
        with atomics, and the dq kernel does not run; a delta = rowsum(o * do) kernel runs
        before it and a scale-and-cast kernel after it. Blocks made only of padding (the
        tail of a partial tile on t) run no programs and no loop iterations.

Softmax runs in fp32 with exp2; the forward saves the log2-domain log-sum-exp (B, H, S).
Which kernels run for a call, and with which blocks, is decided in ``sta_kernels.ops``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the TMA paths fall back to loads
    TensorDescriptor = None

from ..geometry import num_tiles

if TYPE_CHECKING:
    from triton.compiler import CompiledKernel

LOG2E = 1.4426950408889634
# A finite "minus infinity": exp2 of it underflows to 0 and never yields inf - inf = NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _probe():
    pass


# True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


def _device_fn(fn):
    """``triton.jit`` for device helpers; a plain Python function under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a jitted function, which
    costs milliseconds per call inside the kernels' inner loops; called as plain Python from
    an interpreted kernel, the helpers compute the same thing at a fraction of the cost.
    """
    return fn if INTERPRETED else triton.jit(fn)


# ----------------------------------------------------------------------------- geometry


@_device_fn
def _tile_tokens(
    tile, sub, offs, CT, CH, CW, NH, NW,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Raster token indices and validity of block ``sub`` of raster tile ``tile``.

    Indices are int64 when ``WIDE`` (offsets of S * H * D past int32), else int32, which
    keeps the per-iteration address arithmetic in cheap 32-bit integer instructions.
    """
    tile_t = tile // (NH * NW)
    tile_h = (tile // NW) % NH
    tile_w = tile % NW
    local = sub * BLOCK + offs  # position inside the tile, tile-local raster order
    lt = local // (TH * TW)
    lh = (local // TW) % TH
    lw = local % TW
    t = tile_t * TT + lt
    h = tile_h * TH + lh
    w = tile_w * TW + lw
    valid = (lt < TT) & (t < CT) & (h < CH) & (w < CW)
    if WIDE:
        t = t.to(tl.int64)
    tok = (t * CH + h) * CW + w
    return tok, valid


@_device_fn
def _live(tile, sub, CT, NH, NW, TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
          BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """1 if block ``sub`` of raster tile ``tile`` holds a token, else 0 (all padding).

    A partial tile on the t axis leaves whole blocks past the canvas's last frame; their
    programs multiply their loop counts by 0 and store nothing (every row is masked).
    """
    if EVEN:
        return 1
    first_frame = (tile // (NH * NW)) * TT + (sub * BLOCK) // (TH * TW)
    return (first_frame < CT).to(tl.int32)


@_device_fn
def _widen(x, WIDE: tl.constexpr):
    """``x`` as int64 when token offsets need 64 bits, else unchanged (int32)."""
    if WIDE:
        x = x.to(tl.int64)
    return x


@_device_fn
def _axis_window(qi, n, w):
    """First key tile of the window (``w`` clamped to [1, n]) of query tile ``qi``."""
    return tl.minimum(tl.maximum(qi - w // 2, 0), n - w)


@_device_fn
def _axis_queries(ki, n, w):
    """(first, count) of the contiguous query tiles whose window holds key tile ``ki``."""
    first = tl.where(ki <= w - 1, 0, ki - w + 1 + w // 2)
    last = tl.where(ki >= n - w, n - 1, ki + w // 2)
    return first, last - first + 1


@_device_fn
def _head_window(WIN, h, NT, NH, NW):
    wt = tl.minimum(tl.maximum(tl.load(WIN + h * 3 + 0), 1), NT)
    wh = tl.minimum(tl.maximum(tl.load(WIN + h * 3 + 1), 1), NH)
    ww = tl.minimum(tl.maximum(tl.load(WIN + h * 3 + 2), 1), NW)
    return wt, wh, ww


@_device_fn
def _box_trips(first_t, cnt_t, cnt_hw, CT, TT: tl.constexpr, TH: tl.constexpr,
               TW: tl.constexpr, BLOCK: tl.constexpr, SUBS: tl.constexpr, EVEN: tl.constexpr):
    """Iterations of a loop over a box of tiles (``cnt_t`` on t from ``first_t``, ``cnt_hw``
    on h and w), SUBS blocks each, without the blocks that lie past the last frame.

    Only the canvas's last tile on t can end in such blocks (a partial tile on t), and the
    loop order of ``_box_split`` puts them last: the live iterations are a prefix.
    """
    if EVEN:
        return cnt_t * SUBS * cnt_hw
    last_t = first_t + cnt_t - 1
    frames = tl.minimum(CT - last_t * TT, TT)  # frames of the box's last tile on the canvas
    live_subs = (frames * (TH * TW) + BLOCK - 1) // BLOCK
    return ((cnt_t - 1) * SUBS + live_subs) * cnt_hw


@_device_fn
def _box_split(j, cnt_h, cnt_w, SUBS: tl.constexpr, EVEN: tl.constexpr):
    """Iteration ``j`` of a loop over a box of tiles, SUBS blocks each, as (dt, sub, dh, dw).

    Full tiles: a tile's blocks one after another (the order the fused dq's reduce-adds
    were tuned with). Partial tiles: t tile, then block, then h and w, so that the blocks
    of a partial tile on t that lie past the canvas come last (see ``_box_trips``).
    """
    if EVEN:
        sub = j % SUBS
        cell = j // SUBS
        return cell // (cnt_w * cnt_h), sub, (cell // cnt_w) % cnt_h, cell % cnt_w
    cell = j % (cnt_h * cnt_w)
    tsub = j // (cnt_h * cnt_w)
    return tsub // SUBS, tsub % SUBS, cell // cnt_w, cell % cnt_w


@_device_fn
def _box_tile(j, first_t, first_h, first_w, cnt_h, cnt_w, NH, NW, SUBS: tl.constexpr,
              EVEN: tl.constexpr):
    """Iteration ``j`` of a loop over a box of tiles, SUBS blocks each: (tile, sub)."""
    dt, sub, dh, dw = _box_split(j, cnt_h, cnt_w, SUBS, EVEN)
    return ((first_t + dt) * NH + first_h + dh) * NW + first_w + dw, sub


@_device_fn
def _mm(a, b, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands where the backend lacks 16-bit dots."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@_device_fn
def _frame_rows(offs, CH, CW, TH: tl.constexpr, TW: tl.constexpr):
    """Raster offsets, relative to a block's first token, of a block of whole tile frames."""
    return ((offs // (TH * TW)) * CH + (offs // TW) % TH) * CW + offs % TW


@_device_fn
def _box_coords(
    j, first_t, first_h, first_w, cnt_h, cnt_w,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, SUBS: tl.constexpr,
    FRAMES: tl.constexpr, EVEN: tl.constexpr,
):
    """(t, h, w) of the first token of iteration ``j`` of a tile-box loop of whole frames.

    With blocks of ``FRAMES`` whole (th, tw) frames, block ``sub`` of a tile starts
    ``sub * FRAMES`` frames into it; the loop order is that of ``_box_split``.
    """
    dt, sub, dh, dw = _box_split(j, cnt_h, cnt_w, SUBS, EVEN)
    return (first_t + dt) * TT + sub * FRAMES, (first_h + dh) * TH, (first_w + dw) * TW


@_device_fn
def _frame_local(offs, TH: tl.constexpr, TW: tl.constexpr):
    """(t, h, w) of each row of a block of whole tile frames, relative to its first token."""
    return offs // (TH * TW), (offs // TW) % TH, offs % TW


@_device_fn
def _frame_valid(t, h, w, loc_t, loc_h, loc_w, CT, CH, CW):
    """Validity (N,) of the rows of a block of whole frames starting at token (t, h, w):
    rows of a partial tile past the canvas on any axis are padding."""
    return (loc_t < CT - t) & (loc_h < CH - h) & (loc_w < CW - w)


@_device_fn
def _tma_rows(DESC, b, t, h, w, head, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(BLOCK, HEAD_DIM) rows of whole frames starting at token (t, h, w), through TMA.

    ``DESC`` views a (B, S, H, D) tensor's video tokens as (B, CT, CH, CW, H * D) with a
    (1, frames, TH, TW, D) box: a block of whole tile frames is one box.
    """
    return DESC.load([b, t, h, w, head * HEAD_DIM]).reshape(BLOCK, HEAD_DIM)


@_device_fn
def _load_rows(PTR, off, valid, MASKED: tl.constexpr):
    """Rows ``PTR + off`` (``off``: (N, D)), zero where ``valid`` (N,) is false when masked."""
    if MASKED:
        return tl.load(PTR + off, mask=valid[:, None], other=0.0)
    return tl.load(PTR + off)


@_device_fn
def _load_vec(PTR, tok, valid, MASKED: tl.constexpr):
    """Per-token values ``PTR + tok`` (N,), zero where ``valid`` is false when masked."""
    if MASKED:
        return tl.load(PTR + tok, mask=valid, other=0.0)
    return tl.load(PTR + tok)


@_device_fn
def _program(num_heads, stride_b, stride_h):
    """This program's (pid, bh, batch, head) and the element offset of its (b, h) rows."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    return pid, bh, b, h, b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@_device_fn
def _own_block(
    pid, offs, offs_d, stride_s, CT, CH, CW, NH, NW,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BLOCK: tl.constexpr,
    SUBS: tl.constexpr, WIDE: tl.constexpr,
):
    """The video block a program owns: (tile, sub, tokens (BLOCK,), validity, row offsets
    (BLOCK, D))."""
    tile = pid // SUBS
    sub = pid % SUBS
    tok, valid = _tile_tokens(tile, sub, offs, CT, CH, CW, NH, NW, TT, TH, TW, BLOCK, WIDE)
    return tile, sub, tok, valid, tok[:, None] * stride_s + offs_d[None, :]


@_device_fn
def _text_block(
    pid, num_video_blocks, num_video, seq_len, text_len, offs, offs_d, stride_s,
    BLOCK: tl.constexpr, WIDE: tl.constexpr,
):
    """The text block a program past the video blocks owns: (tokens, in-sequence, valid
    (not padding), row offsets, end of the tokens it attends / is attended by).

    A valid text token meets every video token and every valid text token; a block made
    only of padding meets none (end 0).
    """
    pos = (pid - num_video_blocks) * BLOCK + offs
    tok = _widen(num_video + pos, WIDE)
    end = tl.where((pid - num_video_blocks) * BLOCK < text_len, num_video + text_len, 0)
    return tok, tok < seq_len, pos < text_len, tok[:, None] * stride_s + offs_d[None, :], end


@_device_fn
def _query_window(q_tile, WIN, h, NT, NH, NW):
    """(wt, wh, ww, first_t, first_h, first_w): head ``h``'s window around ``q_tile``."""
    wt, wh, ww = _head_window(WIN, h, NT, NH, NW)
    first_t = _axis_window(q_tile // (NH * NW), NT, wt)
    first_h = _axis_window((q_tile // NW) % NH, NH, wh)
    first_w = _axis_window(q_tile % NW, NW, ww)
    return wt, wh, ww, first_t, first_h, first_w


@_device_fn
def _frame_offsets(offs, offs_d, stride_s, CH, CW, TH: tl.constexpr, TW: tl.constexpr,
                   HOIST: tl.constexpr):
    """Loop-invariant raster offsets of a block of whole frames relative to its first token:
    rows (BLOCK,) and elements (BLOCK, D); (0, 0) unless ``HOIST``."""
    rows = 0
    inv = 0
    if HOIST:
        rows = _frame_rows(offs, CH, CW, TH, TW)
        inv = rows[:, None] * stride_s + offs_d[None, :]
    return rows, inv


@_device_fn
def _contiguous_kv(K, V, tok, valid, offs_d, stride_s):
    """Key and value rows (N, D) of consecutive tokens ``tok``, zero where not ``valid``."""
    off = tok[:, None] * stride_s + offs_d[None, :]
    return _load_rows(K, off, valid, True), _load_rows(V, off, valid, True)


@_device_fn
def _query_rows(Q, DO, Out, LSE, q_off, q_tok, q_valid, MASKED: tl.constexpr):
    """q, do (BLOCK_M, D), their lse and delta = rowsum(o * do) (BLOCK_M,) in fp32."""
    q = _load_rows(Q, q_off, q_valid, MASKED)
    do = _load_rows(DO, q_off, q_valid, MASKED)
    lse = _load_vec(LSE, q_tok, q_valid, MASKED)
    o = _load_rows(Out, q_off, q_valid, MASKED)
    return q, do, lse, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@_device_fn
def _window_keys(
    j, K, V, KD, VD, b, h, first_t, first_h, first_w, wh, ww, kv_inv, loc_t, loc_h, loc_w,
    offs_n, offs_d, stride_s, CT, CH, CW, NH, NW,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, K_SUBS: tl.constexpr, EVEN: tl.constexpr, WIDE: tl.constexpr,
    HOIST: tl.constexpr, TMA: tl.constexpr,
):
    """Key and value rows (BLOCK_N, D), zero where invalid, and their validity (BLOCK_N,)
    for iteration ``j`` of a query block's loop over its window of key tiles.

    With ``HOIST`` (blocks of whole frames) a block is its first token plus loop-invariant
    offsets (``kv_inv``; ``loc_*``: each row's place in the block, for validity at partial
    tiles), loaded through TMA (``TMA``: out-of-canvas rows read as zeros) or with pointers;
    else every token's index is computed.
    """
    k_valid = offs_n < BLOCK_N
    if HOIST:
        kt, kh, kw = _box_coords(
            j, first_t, first_h, first_w, wh, ww, TT, TH, TW, K_SUBS, BLOCK_N // (TH * TW),
            EVEN,
        )
        if not EVEN:
            k_valid = _frame_valid(kt, kh, kw, loc_t, loc_h, loc_w, CT, CH, CW)
        if TMA:
            k = _tma_rows(KD, b, kt, kh, kw, h, BLOCK_N, HEAD_DIM)
            v = _tma_rows(VD, b, kt, kh, kw, h, BLOCK_N, HEAD_DIM)
        else:
            kv_off = _widen((kt * CH + kh) * CW + kw, WIDE) * stride_s + kv_inv
            k = _load_rows(K, kv_off, k_valid, not EVEN)
            v = _load_rows(V, kv_off, k_valid, not EVEN)
    else:
        k_tile, k_sub = _box_tile(j, first_t, first_h, first_w, wh, ww, NH, NW, K_SUBS, EVEN)
        k_tok, k_valid = _tile_tokens(
            k_tile, k_sub, offs_n, CT, CH, CW, NH, NW, TT, TH, TW, BLOCK_N, WIDE,
        )
        kv_off = k_tok[:, None] * stride_s + offs_d[None, :]  # (BLOCK_N, D)
        k = _load_rows(K, kv_off, k_valid, not EVEN)
        v = _load_rows(V, kv_off, k_valid, not EVEN)
    return k, v, k_valid


# ----------------------------------------------------------------------------- forward


@_device_fn
def _fwd_block(
    q, m_i, l_i, acc, k, v, k_valid, scale_log2,
    MASKED: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One online-softmax step of a (BLOCK_M, D) query block against a key block.

    ``k``, ``v``: (BLOCK_N, D) rows, zero where ``k_valid`` (BLOCK_N,) is false.
    """
    s = _mm(q, tl.trans(k), DOT_F32)  # (BLOCK_M, BLOCK_N) raw scores
    if MASKED:
        s = tl.where(k_valid[None, :], s, NEG_BIG)
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)  # log2 domain
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * scale_log2 - m_new[:, None])  # one FMA per score
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _sta_fwd_kernel(
    Q, K, V, Out, LSE, WIN, TEXT_LEN, KD, VD, PID_BASE,
    stride_b, stride_s, stride_h,
    seq_len, num_video, num_heads, num_video_blocks,
    CT, CH, CW, NT, NH, NW,
    scale_log2,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_SUBS: tl.constexpr, K_SUBS: tl.constexpr, EVEN: tl.constexpr, DOT_F32: tl.constexpr,
    WIDE: tl.constexpr, HOIST: tl.constexpr, TMA: tl.constexpr,
):
    pid, bh, b, h, base = _program(num_heads, stride_b, stride_h)
    pid += PID_BASE  # > 0: only the text query blocks run (the video ones ran elsewhere)
    Q += base
    K += base
    V += base
    Out += base
    LSE += bh.to(tl.int64) * seq_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    text_len = tl.load(TEXT_LEN + b)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if pid < num_video_blocks:
        q_tile, q_sub, q_tok, q_valid, q_off = _own_block(
            pid, offs_m, offs_d, stride_s, CT, CH, CW, NH, NW, TT, TH, TW, BLOCK_M, Q_SUBS, WIDE,
        )
        q = _load_rows(Q, q_off, q_valid, not EVEN)
        wt, wh, ww, first_t, first_h, first_w = _query_window(q_tile, WIN, h, NT, NH, NW)
        _, kv_inv = _frame_offsets(offs_n, offs_d, stride_s, CH, CW, TH, TW, HOIST)
        loc_t, loc_h, loc_w = _frame_local(offs_n, TH, TW)
        live = _live(q_tile, q_sub, CT, NH, NW, TT, TH, TW, BLOCK_M, EVEN)
        trips = _box_trips(first_t, wt, wh * ww, CT, TT, TH, TW, BLOCK_N, K_SUBS, EVEN)
        for j in range(0, trips * live):
            k, v, k_valid = _window_keys(
                j, K, V, KD, VD, b, h, first_t, first_h, first_w, wh, ww, kv_inv, loc_t,
                loc_h, loc_w, offs_n, offs_d, stride_s, CT, CH, CW, NH, NW, TT, TH, TW,
                HEAD_DIM, BLOCK_N, K_SUBS, EVEN, WIDE, HOIST, TMA,
            )
            m_i, l_i, acc = _fwd_block(
                q, m_i, l_i, acc, k, v, k_valid, scale_log2, not EVEN, DOT_F32,
            )
        for start in range(0, text_len * live, BLOCK_N):
            k_pos = start + offs_n
            k_valid = k_pos < text_len
            k, v = _contiguous_kv(K, V, _widen(num_video + k_pos, WIDE), k_valid, offs_d, stride_s)
            m_i, l_i, acc = _fwd_block(
                q, m_i, l_i, acc, k, v, k_valid, scale_log2, True, DOT_F32,
            )
        if EVEN:
            tl.store(Out + q_off, (acc / l_i[:, None]).to(Out.dtype.element_ty))
            tl.store(LSE + q_tok, m_i + tl.math.log2(l_i))
        else:
            l_i = tl.maximum(l_i, 1e-30)  # 0 in an all-padding block, whose rows are masked
            tl.store(Out + q_off, (acc / l_i[:, None]).to(Out.dtype.element_ty),
                     mask=q_valid[:, None])
            tl.store(LSE + q_tok, m_i + tl.math.log2(l_i), mask=q_valid)
    else:
        # text queries: all video keys and the valid text keys, contiguous in memory
        q_tok, in_seq, q_valid, q_off, key_end = _text_block(
            pid, num_video_blocks, num_video, seq_len, text_len, offs_m, offs_d, stride_s,
            BLOCK_M, WIDE,
        )
        q = _load_rows(Q, q_off, q_valid, True)
        for start in range(0, key_end, BLOCK_N):
            k_tok = _widen(start + offs_n, WIDE)
            k_valid = k_tok < key_end
            k, v = _contiguous_kv(K, V, k_tok, k_valid, offs_d, stride_s)
            m_i, l_i, acc = _fwd_block(
                q, m_i, l_i, acc, k, v, k_valid, scale_log2, True, DOT_F32,
            )
        o = tl.where(q_valid[:, None], acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        lse = tl.where(q_valid, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), 0.0)
        tl.store(Out + q_off, o.to(Out.dtype.element_ty), mask=in_seq[:, None])
        tl.store(LSE + q_tok, lse, mask=in_seq)


# ----------------------------------------------------------------------------- backward


@_device_fn
def _dkdv_block(
    k, v, dk, dv, q, do, lse, delta, q_valid, scale_log2,
    MASKED: tl.constexpr, DOT_F32: tl.constexpr, EARLY_DP: tl.constexpr,
):
    """Accumulate a query block's contribution to a key block's dk, dv (unscaled dk).

    ``q``, ``do``: (BLOCK_M, D) rows and ``lse``, ``delta``: (BLOCK_M,), all zero where
    ``q_valid`` is false. ``EARLY_DP``: issue both score matmuls (k q^T, v do^T) before the exp2,
    so the second can run on the tensor cores while the first's exponentials run.
    Returns dk, dv and ds^T (BLOCK_N, BLOCK_M), from which the fused schedule takes dq.
    """
    s_t = _mm(k, tl.trans(q), DOT_F32)  # (BLOCK_N, BLOCK_M)
    if EARLY_DP:
        dp_t = _mm(v, tl.trans(do), DOT_F32)  # (BLOCK_N, BLOCK_M)
    s_t = s_t * scale_log2
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        p_t = tl.where(q_valid[None, :], p_t, 0.0)
    dv += _mm(p_t.to(do.dtype), do, DOT_F32)
    if not EARLY_DP:
        dp_t = _mm(v, tl.trans(do), DOT_F32)  # (BLOCK_N, BLOCK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    ds_t = ds_t.to(q.dtype)
    dk += _mm(ds_t, q, DOT_F32)
    return dk, dv, ds_t


@_device_fn
def _add_rows(PTR, off, x, valid, MASKED: tl.constexpr):
    """Atomically add ``x`` (N, D) fp32 to the rows ``PTR + off`` (where ``valid``)."""
    if MASKED:
        tl.atomic_add(PTR + off, x, mask=valid[:, None], sem="relaxed")
    else:
        tl.atomic_add(PTR + off, x, sem="relaxed")


@_device_fn
def _dkdv_contiguous(
    k, v, dk, dv, Q, DO, LSE, DELTA, DQA, q_tok, q_valid, offs_d, stride_s, scale_log2,
    DOT_F32: tl.constexpr, EARLY_DP: tl.constexpr, FUSED_DQ: tl.constexpr,
):
    """``_dkdv_block`` for a block of consecutive query tokens ``q_tok`` (text queries, or
    all queries of a text key), loaded masked; with ``FUSED_DQ`` also adds their dq."""
    q_off = q_tok[:, None] * stride_s + offs_d[None, :]  # (BLOCK_M, D)
    dk, dv, ds_t = _dkdv_block(
        k, v, dk, dv, _load_rows(Q, q_off, q_valid, True), _load_rows(DO, q_off, q_valid, True),
        _load_vec(LSE, q_tok, q_valid, True), _load_vec(DELTA, q_tok, q_valid, True), q_valid,
        scale_log2, True, DOT_F32, EARLY_DP,
    )
    if FUSED_DQ:
        _add_rows(DQA, q_off, _mm(tl.trans(ds_t), k, DOT_F32), q_valid, True)
    return dk, dv


@triton.jit
def _sta_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, WIN, TEXT_LEN, DQA, DQAD, PID_BASE,
    stride_b, stride_s, stride_h,
    seq_len, num_video, num_heads, num_video_blocks,
    CT, CH, CW, NT, NH, NW,
    scale, scale_log2,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_SUBS: tl.constexpr, K_SUBS: tl.constexpr, EVEN: tl.constexpr, DOT_F32: tl.constexpr,
    WIDE: tl.constexpr, HOIST: tl.constexpr, EARLY_DP: tl.constexpr, FUSED_DQ: tl.constexpr,
    DQ_TMA: tl.constexpr,
):
    """dk, dv of one key block; with ``FUSED_DQ`` also its (unscaled) dq contributions,
    added into the fp32 ``DQA`` (B, S, H, D) with atomics (through the TMA descriptor
    ``DQAD`` for blocks of whole frames when ``DQ_TMA``). ``PID_BASE`` > 0: only the
    text key blocks run (the video ones ran in the Gluon backward)."""
    pid, bh, b, h, base = _program(num_heads, stride_b, stride_h)
    pid += PID_BASE
    Q += base
    K += base
    V += base
    DO += base
    DK += base
    DV += base
    DQA += base
    LSE += bh.to(tl.int64) * seq_len
    DELTA += bh.to(tl.int64) * seq_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    text_len = tl.load(TEXT_LEN + b)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if pid < num_video_blocks:
        k_tile, k_sub, k_tok, k_valid, kv_off = _own_block(
            pid, offs_n, offs_d, stride_s, CT, CH, CW, NH, NW, TT, TH, TW, BLOCK_N, K_SUBS, WIDE,
        )
        k = _load_rows(K, kv_off, k_valid, not EVEN)
        v = _load_rows(V, kv_off, k_valid, not EVEN)
        wt, wh, ww = _head_window(WIN, h, NT, NH, NW)
        first_t, cnt_t = _axis_queries(k_tile // (NH * NW), NT, wt)
        first_h, cnt_h = _axis_queries((k_tile // NW) % NH, NH, wh)
        first_w, cnt_w = _axis_queries(k_tile % NW, NW, ww)
        q_rows, q_inv = _frame_offsets(offs_m, offs_d, stride_s, CH, CW, TH, TW, HOIST)
        loc_t, loc_h, loc_w = _frame_local(offs_m, TH, TW)
        live = _live(k_tile, k_sub, CT, NH, NW, TT, TH, TW, BLOCK_N, EVEN)
        trips = _box_trips(first_t, cnt_t, cnt_h * cnt_w, CT, TT, TH, TW, BLOCK_M, Q_SUBS, EVEN)
        for j in range(0, trips * live):
            q_valid = offs_m < BLOCK_M
            if HOIST:
                qt, qh, qw = _box_coords(
                    j, first_t, first_h, first_w, cnt_h, cnt_w, TT, TH, TW, Q_SUBS,
                    BLOCK_M // (TH * TW), EVEN,
                )
                if not EVEN:
                    q_valid = _frame_valid(qt, qh, qw, loc_t, loc_h, loc_w, CT, CH, CW)
                q_start = _widen((qt * CH + qh) * CW + qw, WIDE)
                q_tok = q_start + q_rows
                q_off = q_start * stride_s + q_inv
                q = _load_rows(Q, q_off, q_valid, not EVEN)
                do = _load_rows(DO, q_off, q_valid, not EVEN)
            else:
                q_tile, q_sub = _box_tile(
                    j, first_t, first_h, first_w, cnt_h, cnt_w, NH, NW, Q_SUBS, EVEN,
                )
                q_tok, q_valid = _tile_tokens(
                    q_tile, q_sub, offs_m, CT, CH, CW, NH, NW, TT, TH, TW, BLOCK_M, WIDE,
                )
                q_off = q_tok[:, None] * stride_s + offs_d[None, :]  # (BLOCK_M, D)
                q = _load_rows(Q, q_off, q_valid, not EVEN)
                do = _load_rows(DO, q_off, q_valid, not EVEN)
            lse = _load_vec(LSE, q_tok, q_valid, not EVEN)
            delta = _load_vec(DELTA, q_tok, q_valid, not EVEN)
            dk, dv, ds_t = _dkdv_block(
                k, v, dk, dv, q, do, lse, delta, q_valid, scale_log2,
                not EVEN, DOT_F32, EARLY_DP,
            )
            if FUSED_DQ:
                dq = _mm(tl.trans(ds_t), k, DOT_F32)  # (BLOCK_M, D)
                if DQ_TMA:
                    DQAD.atomic_add(
                        [b, qt, qh, qw, h * HEAD_DIM],
                        dq.reshape(1, BLOCK_M // (TH * TW), TH, TW, HEAD_DIM),
                    )
                else:
                    _add_rows(DQA, q_off, dq, q_valid, not EVEN)
        for start in range(0, text_len * live, BLOCK_M):
            q_pos = start + offs_m
            q_tok = _widen(num_video + q_pos, WIDE)
            q_valid = q_pos < text_len
            dk, dv = _dkdv_contiguous(
                k, v, dk, dv, Q, DO, LSE, DELTA, DQA, q_tok, q_valid, offs_d, stride_s,
                scale_log2, DOT_F32, EARLY_DP, FUSED_DQ,
            )
        if EVEN:
            tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty))
            tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))
        else:
            tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=k_valid[:, None])
            tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=k_valid[:, None])
    else:
        # text keys: attended by every video query and every valid text query
        k_tok, in_seq, k_valid, kv_off, query_end = _text_block(
            pid, num_video_blocks, num_video, seq_len, text_len, offs_n, offs_d, stride_s,
            BLOCK_N, WIDE,
        )
        k, v = _contiguous_kv(K, V, k_tok, k_valid, offs_d, stride_s)
        for start in range(0, query_end, BLOCK_M):
            q_tok = _widen(start + offs_m, WIDE)
            q_valid = q_tok < query_end
            dk, dv = _dkdv_contiguous(
                k, v, dk, dv, Q, DO, LSE, DELTA, DQA, q_tok, q_valid, offs_d, stride_s,
                scale_log2, DOT_F32, EARLY_DP, FUSED_DQ,
            )
        dk = tl.where(k_valid[:, None], dk * scale, 0.0)
        dv = tl.where(k_valid[:, None], dv, 0.0)
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=in_seq[:, None])
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=in_seq[:, None])


@triton.jit
def _sta_delta_kernel(
    Out, DO, DELTA, stride_b, stride_s, stride_h, seq_len, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):
    """delta (B, H, S) = rowsum(o * do) in fp32, for the fused dk/dv/dq kernel."""
    pid, bh, b, h, base = _program(num_heads, stride_b, stride_h)
    tok = _widen(pid * BLOCK + tl.arange(0, BLOCK), WIDE)
    valid = tok < seq_len
    off = tok[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(Out + base + off, mask=valid[:, None], other=0.0)
    do = tl.load(DO + base + off, mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + tok, delta, mask=valid)


@triton.jit
def _scale_cast_kernel(X, Y, numel, scale, BLOCK: tl.constexpr):
    """y = (x * scale) in y's dtype, flat: the fused dq's fp32 sum to the output dtype in
    one pass (a torch multiply then cast would read and write the fp32 buffer twice)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0)
    tl.store(Y + offs, (x * scale).to(Y.dtype.element_ty), mask=mask)


@_device_fn
def _dq_block(
    q, do, lse, delta, dq, k, v, k_valid, scale_log2,
    MASKED: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Accumulate a key block's contribution to a query block's (unscaled) dq.

    ``k``, ``v``: (BLOCK_N, D) rows, zero where ``k_valid`` is false.
    """
    s = _mm(q, tl.trans(k), DOT_F32)  # (BLOCK_M, BLOCK_N)
    s = s * scale_log2
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(k_valid[None, :], p, 0.0)
    dp = _mm(do, tl.trans(v), DOT_F32)  # (BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    dq += _mm(ds.to(k.dtype), k, DOT_F32)
    return dq


@triton.jit
def _sta_dq_kernel(
    Q, K, V, Out, DO, LSE, DELTA, DQ, WIN, TEXT_LEN, KD, VD,
    stride_b, stride_s, stride_h,
    seq_len, num_video, num_heads, num_video_blocks,
    CT, CH, CW, NT, NH, NW,
    scale, scale_log2,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_SUBS: tl.constexpr, K_SUBS: tl.constexpr, EVEN: tl.constexpr, DOT_F32: tl.constexpr,
    WIDE: tl.constexpr, HOIST: tl.constexpr, TMA: tl.constexpr,
):
    pid, bh, b, h, base = _program(num_heads, stride_b, stride_h)
    Q += base
    K += base
    V += base
    Out += base
    DO += base
    DQ += base
    LSE += bh.to(tl.int64) * seq_len
    DELTA += bh.to(tl.int64) * seq_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    text_len = tl.load(TEXT_LEN + b)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if pid < num_video_blocks:
        q_tile, q_sub, q_tok, q_valid, q_off = _own_block(
            pid, offs_m, offs_d, stride_s, CT, CH, CW, NH, NW, TT, TH, TW, BLOCK_M, Q_SUBS, WIDE,
        )
        q, do, lse, delta = _query_rows(Q, DO, Out, LSE, q_off, q_tok, q_valid, not EVEN)
        if EVEN:
            tl.store(DELTA + q_tok, delta)
        else:
            tl.store(DELTA + q_tok, delta, mask=q_valid)
        wt, wh, ww, first_t, first_h, first_w = _query_window(q_tile, WIN, h, NT, NH, NW)
        _, kv_inv = _frame_offsets(offs_n, offs_d, stride_s, CH, CW, TH, TW, HOIST)
        loc_t, loc_h, loc_w = _frame_local(offs_n, TH, TW)
        live = _live(q_tile, q_sub, CT, NH, NW, TT, TH, TW, BLOCK_M, EVEN)
        trips = _box_trips(first_t, wt, wh * ww, CT, TT, TH, TW, BLOCK_N, K_SUBS, EVEN)
        for j in range(0, trips * live):
            k, v, k_valid = _window_keys(
                j, K, V, KD, VD, b, h, first_t, first_h, first_w, wh, ww, kv_inv, loc_t,
                loc_h, loc_w, offs_n, offs_d, stride_s, CT, CH, CW, NH, NW, TT, TH, TW,
                HEAD_DIM, BLOCK_N, K_SUBS, EVEN, WIDE, HOIST, TMA,
            )
            dq = _dq_block(
                q, do, lse, delta, dq, k, v, k_valid, scale_log2, not EVEN, DOT_F32,
            )
        for start in range(0, text_len * live, BLOCK_N):
            k_pos = start + offs_n
            k_valid = k_pos < text_len
            k, v = _contiguous_kv(K, V, _widen(num_video + k_pos, WIDE), k_valid, offs_d, stride_s)
            dq = _dq_block(q, do, lse, delta, dq, k, v, k_valid, scale_log2, True, DOT_F32)
        if EVEN:
            tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty))
        else:
            tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_valid[:, None])
    else:
        q_tok, in_seq, q_valid, q_off, key_end = _text_block(
            pid, num_video_blocks, num_video, seq_len, text_len, offs_m, offs_d, stride_s,
            BLOCK_M, WIDE,
        )
        q, do, lse, delta = _query_rows(Q, DO, Out, LSE, q_off, q_tok, q_valid, True)
        tl.store(DELTA + q_tok, delta, mask=in_seq)
        for start in range(0, key_end, BLOCK_N):
            k_tok = _widen(start + offs_n, WIDE)
            k_valid = k_tok < key_end
            k, v = _contiguous_kv(K, V, k_tok, k_valid, offs_d, stride_s)
            dq = _dq_block(q, do, lse, delta, dq, k, v, k_valid, scale_log2, True, DOT_F32)
        dq = tl.where(q_valid[:, None], dq * scale, 0.0)
        tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=in_seq[:, None])


# ----------------------------------------------------------------------------- launchers


def is_interpreter() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRETED


class LaunchGeometry:
    """Launch-time integers derived from (S, canvas, tile), shared by the Triton kernels."""

    def __init__(self, seq_len: int, canvas: Sequence[int], tile: Sequence[int]):
        self.canvas = tuple(int(c) for c in canvas)
        self.tile = tuple(int(t) for t in tile)
        self.n = num_tiles(self.canvas, self.tile)
        self.num_tiles = self.n[0] * self.n[1] * self.n[2]
        self.tile_tokens = self.tile[0] * self.tile[1] * self.tile[2]
        self.seq_len = seq_len
        self.num_video = self.canvas[0] * self.canvas[1] * self.canvas[2]
        self.num_text = seq_len - self.num_video
        # a tile that does not divide the canvas on some axis: partial tiles at its end
        self.partial = any(c % t for c, t in zip(self.canvas, self.tile, strict=True))

    def subs(self, block: int) -> int:
        """Blocks of ``block`` tokens per tile (the last one partial if it does not divide)."""
        return math.ceil(self.tile_tokens / block)

    def even(self, *blocks: int) -> bool:
        """No partial tile on any axis and every block full: masks can be compiled out."""
        return not self.partial and all(self.tile_tokens % b == 0 for b in blocks)

    def hoist(self, inner: int, *blocks: int, partial: bool = True) -> bool:
        """Blocks that divide the tile and an inner-loop block of whole tile frames: its
        tokens are its first token plus loop-invariant offsets; at partial tiles too
        unless ``partial`` is false."""
        tiled = all(self.tile_tokens % b == 0 for b in blocks)
        if not partial:
            tiled = self.even(*blocks)
        return tiled and inner % (self.tile[1] * self.tile[2]) == 0

    def descriptor(self, x: torch.Tensor, block: int, use: bool):
        """A TMA descriptor of ``x``'s video tokens in blocks of ``block`` whole frames.

        ``x`` (B, S, H, D) contiguous is viewed as (B, CT, CH, CW, H * D) with a
        (1, block / (TH * TW), TH, TW, D) box. Returns ``x`` itself (an unused pointer
        argument) when ``use`` (see ``_tma_enabled``) is false.
        """
        if not use:
            return x
        batch, _, heads, head_dim = x.shape
        ct, ch, cw = self.canvas
        row = x.stride(1)  # = H * D
        return TensorDescriptor(
            x,
            shape=[batch, ct, ch, cw, heads * head_dim],
            strides=[x.stride(0), ch * cw * row, cw * row, row, 1],
            block_shape=[1, block // (self.tile[1] * self.tile[2]), self.tile[1],
                         self.tile[2], head_dim],
        )

    def wide(self, x: torch.Tensor) -> bool:
        """Whether token offsets within one (batch, head) need 64-bit integers: those of
        padding rows (masked, never accessed) included, which may lie past the sequence."""
        padded = math.prod(n * t for n, t in zip(self.n, self.tile, strict=True))
        return (max(self.seq_len, padded + self.num_text)) * x.stride(1) >= 2**31

    def kernel_args(self, x: torch.Tensor, video_blocks: int, block_m: int, block_n: int,
                    hoist: bool) -> dict:
        """The arguments the forward, dq and dk/dv kernels share, by name: the strides of
        ``x`` (B, S, H, D), which every (B, S, H, D) tensor of the launch shares, the
        sequence and canvas sizes, tile counts, the ``video_blocks`` programs per
        (batch, head) that own video blocks, and the constexprs of ``block_m`` queries by
        ``block_n`` keys (``hoist``: see ``hoist``)."""
        return dict(
            stride_b=x.stride(0), stride_s=x.stride(1), stride_h=x.stride(2),
            seq_len=self.seq_len, num_video=self.num_video, num_heads=x.shape[2],
            num_video_blocks=video_blocks,
            CT=self.canvas[0], CH=self.canvas[1], CW=self.canvas[2],
            NT=self.n[0], NH=self.n[1], NW=self.n[2],
            TT=self.tile[0], TH=self.tile[1], TW=self.tile[2], HEAD_DIM=x.shape[3],
            BLOCK_M=block_m, BLOCK_N=block_n,
            Q_SUBS=self.subs(block_m), K_SUBS=self.subs(block_n),
            EVEN=self.even(block_m, block_n), DOT_F32=INTERPRETED, WIDE=self.wide(x),
            HOIST=hoist,
        )


def _tma_enabled(requested: bool, hoist: bool) -> bool:
    """Whether a kernel takes its TMA path: asked for, blocks of whole frames (``hoist``),
    and host-side descriptors in this triton."""
    return requested and hoist and TensorDescriptor is not None


def launch_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    windows: torch.Tensor, text_len: torch.Tensor, geo: LaunchGeometry, scale: float, *,
    block_m: int, block_n: int, warps: int, stages: int, tma: bool, frames_partial: bool,
    first: int = 0,
) -> CompiledKernel | None:
    """The forward kernel for the query blocks from program ``first`` on (past the video
    blocks when a Gluon kernel wrote their rows): their rows of o (B, S, H, D) and lse
    (B, H, S, log2 domain).

    ``windows``: (H, 3) int32 and ``text_len``: (B,) int32 on the kernel device; ``tma``:
    k/v through TMA where a key block is whole frames; ``frames_partial``: such blocks keep
    hoisted addressing and TMA at partial tiles. Returns the compiled kernel, or None when
    no block is left (or under the interpreter).
    """
    batch, _, heads, _ = q.shape
    video_blocks = geo.num_tiles * geo.subs(block_m)
    programs = video_blocks + triton.cdiv(geo.num_text, block_m) - first
    if programs == 0:
        return None
    hoist = geo.hoist(block_n, block_m, block_n, partial=frames_partial)
    tma = _tma_enabled(tma, hoist)
    return _sta_fwd_kernel[(programs, batch * heads)](
        q, k, v, o, lse, windows, text_len,
        geo.descriptor(k, block_n, tma), geo.descriptor(v, block_n, tma), first,
        scale_log2=scale * LOG2E, TMA=tma,
        **geo.kernel_args(q, video_blocks, block_m, block_n, hoist),
        num_warps=warps, num_stages=stages,
    )


def launch_dq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
    lse: torch.Tensor, delta: torch.Tensor, dq: torch.Tensor, windows: torch.Tensor,
    text_len: torch.Tensor, geo: LaunchGeometry, scale: float, *,
    block_m: int, block_n: int, warps: int, stages: int, tma: bool, frames_partial: bool,
) -> CompiledKernel | None:
    """The dq kernel of the two-kernel backward: dq (B, S, H, D), and delta = rowsum(o * do)
    (B, H, S) for the dk/dv kernel after it. Arguments as in ``launch_forward``; returns
    the compiled kernel (None under the interpreter)."""
    batch, _, heads, _ = q.shape
    video_blocks = geo.num_tiles * geo.subs(block_m)
    grid = (video_blocks + triton.cdiv(geo.num_text, block_m), batch * heads)
    hoist = geo.hoist(block_n, block_m, block_n, partial=frames_partial)
    tma = _tma_enabled(tma, hoist)
    return _sta_dq_kernel[grid](
        q, k, v, o, do, lse, delta, dq, windows, text_len,
        geo.descriptor(k, block_n, tma), geo.descriptor(v, block_n, tma),
        scale=scale, scale_log2=scale * LOG2E, TMA=tma,
        **geo.kernel_args(q, video_blocks, block_m, block_n, hoist),
        num_warps=warps, num_stages=stages,
    )


def launch_dkdv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
    delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, windows: torch.Tensor,
    text_len: torch.Tensor, geo: LaunchGeometry, scale: float, *,
    block_m: int, block_n: int, warps: int, stages: int, early_dp: bool,
    frames_partial: bool, dq_acc: torch.Tensor | None = None, dq_tma: bool = False,
    text_only: bool = False,
) -> CompiledKernel | None:
    """The dk/dv kernel over the video, then the text key blocks: dk, dv (B, S, H, D) from
    delta (B, H, S).

    ``dq_acc``: the fused schedule's fp32 (B, S, H, D) buffer, zeroed, into which the kernel
    also adds each block pair's unscaled dq (``dq_tma``: through a TMA reduce where a query
    block is whole frames). ``text_only``: the Gluon backward ran the video key blocks, so
    the programs start past them. ``early_dp``: both score matmuls issued before the exp2.
    Returns the compiled kernel, or None when no block is left (or under the interpreter).
    """
    batch, _, heads, _ = q.shape
    video_blocks = geo.num_tiles * geo.subs(block_n)
    first = video_blocks if text_only else 0
    programs = video_blocks + triton.cdiv(geo.num_text, block_n) - first
    if programs == 0:
        return None
    hoist = geo.hoist(block_m, block_m, block_n, partial=frames_partial)
    # (triton's CPU interpreter has no descriptor reduce: pointer atomics there)
    dq_tma = _tma_enabled(dq_tma, hoist and dq_acc is not None and not INTERPRETED)
    dqa = q if dq_acc is None else dq_acc  # an unused pointer without the fused dq
    return _sta_dkdv_kernel[(programs, batch * heads)](
        q, k, v, do, lse, delta, dk, dv, windows, text_len,
        dqa, geo.descriptor(dqa, block_m, dq_tma), first,
        scale=scale, scale_log2=scale * LOG2E, EARLY_DP=early_dp,
        FUSED_DQ=dq_acc is not None, DQ_TMA=dq_tma,
        **geo.kernel_args(q, video_blocks, block_m, block_n, hoist),
        num_warps=warps, num_stages=stages,
    )


def launch_delta(o: torch.Tensor, do: torch.Tensor, delta: torch.Tensor,
                 geo: LaunchGeometry) -> None:
    """delta (B, H, S) = rowsum(o * do) in fp32, before the fused dk/dv kernel; o and do
    (B, S, H, D) share their strides."""
    batch, seq, heads, head_dim = o.shape
    _sta_delta_kernel[(triton.cdiv(seq, 128), batch * heads)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), seq, heads,
        HEAD_DIM=head_dim, BLOCK=128, WIDE=geo.wide(o),
    )


def launch_scale_cast(x: torch.Tensor, y: torch.Tensor, scale: float) -> None:
    """y = x * scale in y's dtype (the fused dq's fp32 sum to the output dtype)."""
    _scale_cast_kernel[(triton.cdiv(y.numel(), 4096),)](x, y, y.numel(), scale, BLOCK=4096)
