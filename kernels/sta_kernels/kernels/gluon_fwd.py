"""A warp-specialised STA forward for Hopper, written in triton's Gluon dialect.

The Triton forward (``triton_sta._sta_fwd_kernel``) runs every warp through the same
program: both warpgroups issue the score matmul, wait for it, run the exp2s, then issue the
PV matmul, so the tensor cores idle while the softmax runs. This kernel splits the work
the way FlashAttention-3 does on Hopper:

- one producer warp issues the TMA loads of q once and of k and v into rings of
  ``STAGES`` and ``V_STAGES`` buffers (``ring_stages``), k and v on separate barriers so a
  score matmul can start before its v has landed;
- one consumer warpgroup per 64-query frame of the program's query block, all sharing
  every k/v buffer, so that one's softmax runs while the others' matmuls hold the tensor
  cores. Where the tile's frames divide by 3, three consumers (``_consumer_seq``) take a
  192-query block, which streams each k/v block from L2 once per 192 queries instead of
  128 (a third less of the k/v traffic); at the 160 registers a thread then gets, q stays
  in shared memory and each key block runs in sequence. Otherwise two consumers
  (``_consumer``) hold q in registers (the score matmul's A operand) and issue the score
  matmul of key block j before the PV matmul of block j - 1. (The source waits for that
  PV matmul after block j's exp2s, but ptxas moves the wait before them, so within one
  warpgroup the two do not overlap.) Both give the same bits.

Scope: the video queries (which attend their window's video keys and the valid text keys)
of a canvas the tile divides (full tiles), tiles of an even number of (TH, TW) frames with
TH * TW = 64, bf16, D of 64 or 128, on Hopper. ``supports`` says whether a call is in
scope; ``sta_kernels.ops`` runs this kernel for the video queries of such calls and the
Triton forward for the text queries and for everything else.

Layout and semantics are those of ``triton_sta``: q, k, v, o are (B, S, H, D) contiguous
with video tokens in raster (t, h, w) order, a block of whole frames is one box of a TMA
descriptor of the (B, CT, CH, CW, H * D) view, and the saved lse (B, H, S) is in the log2
domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..geometry import num_tiles
from .gluon_common import (
    AVAILABLE,
    LOG2E,
    MAXNREG,
    MAXNREG_3,
    check_consumers,
    frames_descriptor,
    in_scope,
    rows_descriptor,
    tile_constexprs,
    video_blocks,
)

if TYPE_CHECKING:
    from triton.compiler import CompiledKernel

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .gluon_common import (
        CONSUMER_REGS,
        CONSUMER_REGS_3,
        NEG_BIG,
        PRODUCER_REGS,
        as_box,
        ring_barriers,
        tma_load,
        tma_store,
        window_loop,
    )

    @gluon.jit
    def _key_coords(j, ft, fh, fw, wh, ww, TT: gl.constexpr, TH: gl.constexpr,
                    TW: gl.constexpr, K_SUBS: gl.constexpr):
        """(t, h, w) of the first token of key block ``j`` of a query block's window loop:
        a tile's ``K_SUBS`` blocks of two frames one after another, tiles in raster order."""
        sub = j % K_SUBS
        cell = j // K_SUBS
        dt = cell // (ww * wh)
        dh = (cell // ww) % wh
        dw = cell % ww
        return (ft + dt) * TT + sub * 2, (fh + dh) * TH, (fw + dw) * TW

    @gluon.jit
    def _load_block(j, video_trips, desc, rows_desc, buf, ready, b, col, ft, fh, fw, wh, ww,
                    num_video, TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                    K_SUBS: gl.constexpr):
        """TMA copy of key block ``j`` of k or v into ``buf``, completing on ``ready``:
        two video frames of the window (``desc``), or past ``video_trips`` a block of text
        rows (``rows_desc``: the same bytes as a (1, N, D) box of the (B, S, H * D) view)."""
        mbarrier.expect(ready, desc.block_type.nbytes)
        if j < video_trips:
            kt, kh, kw = _key_coords(j, ft, fh, fw, wh, ww, TT, TH, TW, K_SUBS)
            tma_load(desc, [b, kt, kh, kw, col], ready, buf)
        else:
            row = num_video + (j - video_trips) * (2 * TH * TW)
            tma_load(rows_desc, [b, row, col], ready, as_box(buf, rows_desc))

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, kt_desc, vt_desc, q_smem, k_bufs, v_bufs,
                  q_bar, k_ready, k_empty, v_ready, v_empty,
                  b, col, t0, h0, w0, ft, fh, fw, wh, ww, video_trips, trips, num_video,
                  TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                  K_SUBS: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                  V_STAGES: gl.constexpr):
        """The load warp: the query block's ``CONSUMERS`` frames of q once, then k and v of
        every key block in turn: the window's video blocks, then the text blocks."""
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(CONSUMERS):
            tma_load(q_desc, [b, t0 + c, h0, w0, col], q_bar, q_smem.index(c))
        for j in range(trips):
            stage = j % STAGES
            phase = (j // STAGES) & 1
            # a fresh barrier counts as completed for phase 1: the first pass does not wait
            mbarrier.wait(k_empty.index(stage), phase ^ 1)
            _load_block(j, video_trips, k_desc, kt_desc, k_bufs.index(stage),
                        k_ready.index(stage), b, col, ft, fh, fw, wh, ww, num_video, TT, TH,
                        TW, K_SUBS)
            v_stage = j % V_STAGES
            mbarrier.wait(v_empty.index(v_stage), ((j // V_STAGES) & 1) ^ 1)
            _load_block(j, video_trips, v_desc, vt_desc, v_bufs.index(v_stage),
                        v_ready.index(v_stage), b, col, ft, fh, fw, wh, ww, num_video, TT, TH,
                        TW, K_SUBS)

    @gluon.jit
    def _softmax_block(s, m_i, l_i, j, video_trips, text_len, cols, scale_log2,
                       N: gl.constexpr):
        """Online softmax of key block ``j``'s raw scores ``s`` (M, N) against the running
        max ``m_i`` and sum ``l_i`` (M,): (p, alpha, m_new, l_new), in the log2 domain.
        Text key blocks (j past ``video_trips``) mask their slots past ``text_len``."""
        if j >= video_trips:  # text keys: slots past the valid text are padding
            pos = (j - video_trips) * N + cols
            s = gl.where(gl.expand_dims(pos < text_len, 0), s, NEG_BIG)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * scale_log2 - gl.expand_dims(m_new, 1))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)

    @gluon.jit
    def _epilogue(acc, m_i, l_i, q, q_smem, o_desc, LSE, b, col, t0, h0, w0, lse_base, CH,
                  CW, row_s: gl.constexpr, row_o: gl.constexpr, TW: gl.constexpr,
                  C: gl.constexpr):
        """Frame ``C``'s o through its q buffer (whose last reader has finished) and TMA,
        and its lse (log2 domain)."""
        M: gl.constexpr = q.shape[0]
        o = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
        q.store(o.to(gl.bfloat16))
        fence_async_shared()
        tma_store(o_desc, [b, t0 + C, h0, w0, col], q_smem.index(C))
        rows = gl.arange(0, M, layout=row_s)
        tok = ((t0 + C) * CH + h0 + rows // TW) * CW + w0 + rows % TW
        gl.store(LSE + lse_base + tok, m_i + gl.log2(l_i))
        tma.store_wait(0)

    @gluon.jit
    def _consumer(o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty,
                  LSE, b, col, t0, h0, w0, video_trips, trips, text_len, lse_base, CH, CW,
                  scale_log2, HEAD_DIM: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                  STAGES: gl.constexpr, V_STAGES: gl.constexpr, C: gl.constexpr):
        """Consumer warpgroup ``C`` of two: the online softmax of frame ``C`` of the query
        block, q in registers.

        Key block j's score matmul is issued before block j - 1's PV matmul, whose wait
        the source places after block j's exp2s (ptxas moves it before them).
        """
        M: gl.constexpr = TH * TW  # query rows: one frame
        N: gl.constexpr = 2 * TH * TW  # keys per block: two frames
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, s_layout))
        q = q_smem.index(C).reshape([M, HEAD_DIM])
        zero_s = gl.zeros([M, N], gl.float32, s_layout)
        mbarrier.wait(q_bar, 0)
        # q as the score matmul's register operand: loaded once, it is not re-read from
        # shared memory by every score wgmma (both consumers also read each k/v tile there)
        q_op = q.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))

        # key block 0 (always video): scores, then softmax; its PV matmul waits for the
        # next block's score matmul
        mbarrier.wait(k_ready.index(0), 0)
        kt = k_bufs.index(0).reshape([N, HEAD_DIM]).permute((1, 0))  # (D, N)
        s_tok = warpgroup_mma(q_op, kt, zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))  # (M, N) raw scores
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.max(s, axis=1) * scale_log2  # (M,) running max, log2 domain
        p = gl.exp2(s * scale_log2 - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        acc = gl.zeros([M, HEAD_DIM], gl.float32, o_layout)
        for j in range(1, trips):
            stage = j % STAGES
            prev = (j - 1) % V_STAGES
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            kt = k_bufs.index(stage).reshape([N, HEAD_DIM]).permute((1, 0))
            mbarrier.wait(v_ready.index(prev), ((j - 1) // V_STAGES) & 1)
            v = v_bufs.index(prev).reshape([N, HEAD_DIM])
            s_tok = warpgroup_mma(q_op, kt, zero_s, use_acc=False, is_async=True)
            o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))  # the scores; PV may still run
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, j, video_trips, text_len, cols,
                                                scale_log2, N)
            acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        last = (trips - 1) % V_STAGES
        mbarrier.wait(v_ready.index(last), ((trips - 1) // V_STAGES) & 1)
        v = v_bufs.index(last).reshape([N, HEAD_DIM])
        o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(last), count=1)
        _epilogue(acc, m_i, l_i, q, q_smem, o_desc, LSE, b, col, t0, h0, w0, lse_base, CH, CW,
                  row_s, row_o, TW, C)

    @gluon.jit
    def _consumer_seq(o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                      v_empty, LSE, b, col, t0, h0, w0, video_trips, trips, text_len, lse_base,
                      CH, CW, scale_log2, HEAD_DIM: gl.constexpr, TH: gl.constexpr,
                      TW: gl.constexpr, STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                      C: gl.constexpr):
        """Consumer warpgroup ``C`` of three: the online softmax of frame ``C`` of the query
        block, each key block in sequence (score matmul, softmax, PV matmul) with q read
        from shared memory.

        At the 160 registers a thread of three consumers gets, the scores (64), the
        accumulator (64) and p fit only if p takes the scores' registers, i.e. if block
        j's PV matmul finishes before block j + 1's score matmul is issued (and q stays in
        shared memory); the other two consumers keep the tensor cores busy meanwhile. The
        arithmetic is ``_consumer``'s, in the same order: the outputs are bitwise equal.
        """
        M: gl.constexpr = TH * TW
        N: gl.constexpr = 2 * TH * TW
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, s_layout))
        q = q_smem.index(C).reshape([M, HEAD_DIM])  # (M, D), the score matmul's A operand
        zero_s = gl.zeros([M, N], gl.float32, s_layout)
        m_i = gl.full([M], NEG_BIG, gl.float32, row_s)  # alpha of block 0 is exp2(-1e30) = 0
        l_i = gl.zeros([M], gl.float32, row_s)
        acc = gl.zeros([M, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, 0)
        for j in range(trips):
            stage = j % STAGES
            phase = (j // STAGES) & 1
            mbarrier.wait(k_ready.index(stage), phase)
            kt = k_bufs.index(stage).reshape([N, HEAD_DIM]).permute((1, 0))  # (D, N)
            s_tok = warpgroup_mma(q, kt, zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok,))  # (M, N) raw scores
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, j, video_trips, text_len, cols,
                                                scale_log2, N)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            v_stage = j % V_STAGES
            mbarrier.wait(v_ready.index(v_stage), (j // V_STAGES) & 1)
            v = v_bufs.index(v_stage).reshape([N, HEAD_DIM])
            o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            mbarrier.arrive(v_empty.index(v_stage), count=1)
        _epilogue(acc, m_i, l_i, q, q_smem, o_desc, LSE, b, col, t0, h0, w0, lse_base, CH, CW,
                  row_s, row_o, TW, C)

    @gluon.jit
    def _sta_fwd_ws_kernel(
        q_desc, k_desc, v_desc, o_desc, kt_desc, vt_desc, LSE, WIN, TEXT_LEN,
        seq_len, num_video, num_heads, CH, CW, NT, NH, NW, scale_log2,
        TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr, TEXT: gl.constexpr, CONSUMERS: gl.constexpr,
        V_STAGES: gl.constexpr,
    ):
        """One program per video query block (``CONSUMERS`` frames of a tile, one consumer
        warpgroup each) and (batch, head)."""
        K_SUBS: gl.constexpr = TT // 2  # key blocks of two frames per tile
        N: gl.constexpr = 2 * TH * TW
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        col = h * HEAD_DIM
        lse_base = bh.to(gl.int64) * seq_len
        t0, h0, w0, ft, fh, fw, wh, ww, video_trips, text_len, trips = window_loop(
            pid, b, h, WIN, TEXT_LEN, NT, NH, NW, TT, TH, TW, K_SUBS, N, TEXT, CONSUMERS)

        q_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS] + q_desc.block_type.shape,
                                           q_desc.layout)
        k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES] + k_desc.block_type.shape,
                                           k_desc.layout)
        v_bufs = gl.allocate_shared_memory(gl.bfloat16, [V_STAGES] + v_desc.block_type.shape,
                                           v_desc.layout)
        q_bar, k_ready, k_empty, v_ready, v_empty = ring_barriers(STAGES, CONSUMERS, V_STAGES)
        # (triton 3.6 builds warp_specialize only from partitions written out in place: a
        # tuple of the shared arguments, assigned first, does not compile)
        if CONSUMERS == 3:
            gl.warp_specialize([
                (_consumer_seq, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                                v_empty, LSE, b, col, t0, h0, w0, video_trips, trips, text_len,
                                lse_base, CH, CW, scale_log2, HEAD_DIM, TH, TW, STAGES,
                                V_STAGES, 0)),
                (_consumer_seq, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                                v_empty, LSE, b, col, t0, h0, w0, video_trips, trips, text_len,
                                lse_base, CH, CW, scale_log2, HEAD_DIM, TH, TW, STAGES,
                                V_STAGES, 1)),
                (_consumer_seq, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                                v_empty, LSE, b, col, t0, h0, w0, video_trips, trips, text_len,
                                lse_base, CH, CW, scale_log2, HEAD_DIM, TH, TW, STAGES,
                                V_STAGES, 2)),
                (_producer, (q_desc, k_desc, v_desc, kt_desc, vt_desc, q_smem, k_bufs, v_bufs,
                             q_bar, k_ready, k_empty, v_ready, v_empty, b, col, t0, h0, w0, ft,
                             fh, fw, wh, ww, video_trips, trips, num_video, TT, TH, TW, K_SUBS,
                             STAGES, CONSUMERS, V_STAGES)),
            ], [4, 4, 1], [CONSUMER_REGS_3, CONSUMER_REGS_3, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                             v_empty, LSE, b, col, t0, h0, w0, video_trips, trips, text_len,
                             lse_base, CH, CW, scale_log2, HEAD_DIM, TH, TW, STAGES, V_STAGES,
                             0)),
                (_consumer, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                             v_empty, LSE, b, col, t0, h0, w0, video_trips, trips, text_len,
                             lse_base, CH, CW, scale_log2, HEAD_DIM, TH, TW, STAGES, V_STAGES,
                             1)),
                (_producer, (q_desc, k_desc, v_desc, kt_desc, vt_desc, q_smem, k_bufs, v_bufs,
                             q_bar, k_ready, k_empty, v_ready, v_empty, b, col, t0, h0, w0, ft,
                             fh, fw, wh, ww, video_trips, trips, num_video, TT, TH, TW, K_SUBS,
                             STAGES, CONSUMERS, V_STAGES)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def supports(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]) -> bool:
    """Whether ``sta_gluon_video_forward`` covers the video queries of this call: Gluon
    present, a Hopper GPU, contiguous bf16 with D in (64, 128), and full tiles (the tile
    divides the canvas) of an even number of 64-token frames."""
    return in_scope(q, canvas, tile, (64, 128))


def ring_stages(consumers: int, stages: int | None = None) -> tuple[int, int]:
    """Buffers of the (k, v) rings for ``consumers`` and a requested k depth ``stages``
    (None: the default, 3 with three consumers, 2 with two). Two consumers use ``stages``
    for both rings. Three hold three q frames, so a third v buffer does not fit in shared
    memory: their v ring has 2, and the spare buffer goes to k, so that the consumers can
    drift apart by more than one key block."""
    if stages is None:
        stages = 3 if consumers == 3 else 2
    if stages not in (2, 3):
        raise ValueError(f"sta_gluon_video_forward: stages must be 2 or 3 (or None), got "
                         f"{stages}")
    return stages, (2 if consumers == 3 else stages)


def sta_gluon_video_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    windows: torch.Tensor,
    text_len: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    scale: float,
    stages: int | None = None,
    consumers: int | None = None,
) -> CompiledKernel:
    """Write the video query rows of ``o`` and ``lse`` with the warp-specialised kernel;
    the same values as ``sta_triton_forward`` gives those rows. Text query rows (if any)
    are left to the caller.

    Args:
        q, k, v, o: (B, S, H, D) contiguous bf16 on a Hopper GPU (see ``supports``), video
            tokens first in raster order, then S - CT*CH*CW text slots.
        lse: (B, H, S) float32, written in the log2 domain.
        windows: (H, 3) int32; text_len: (B,) int32 valid text tokens; both on the device.
        stages: buffers of the k ring, 2 or 3 (``ring_stages``; None: the default).
        consumers: consumer warpgroups, i.e. 64-query frames per program: 2 (``_consumer``,
            q in registers, PV matmul one block behind) or 3 (``_consumer_seq``, tiles whose
            frames divide by 3); None picks ``default_consumers``. Both give the same bits.
    Returns:
        the launched kernel (its compiled handle: registers, shared memory).
    """
    consumers = check_consumers(tile, consumers, "sta_gluon_video_forward")
    k_stages, v_stages = ring_stages(consumers, stages)
    if not supports(q, canvas, tile):
        raise ValueError("sta_gluon_video_forward: call outside the kernel's scope (see "
                         "gluon_fwd.supports)")
    return _launch(q, k, v, o, lse, windows, text_len, canvas, tile, scale, k_stages,
                   consumers, v_stages)


def _launch(q, k, v, o, lse, windows, text_len, canvas, tile, scale, stages, consumers,
            v_stages):
    """The kernel launch of ``sta_gluon_video_forward`` without its device checks
    (``benchmarks/compile_report.py`` records it on CPU tensors): ``stages`` k buffers and
    ``v_stages`` v buffers (``ring_stages``), ``consumers`` (``check_consumers``)."""
    batch, seq, heads, _ = q.shape
    num_video = int(canvas[0]) * int(canvas[1]) * int(canvas[2])
    block_n = 2 * int(tile[1]) * int(tile[2])
    return _sta_fwd_ws_kernel[(video_blocks(canvas, tile, consumers), batch * heads)](
        frames_descriptor(q, canvas, tile, 1), frames_descriptor(k, canvas, tile, 2),
        frames_descriptor(v, canvas, tile, 2), frames_descriptor(o, canvas, tile, 1),
        rows_descriptor(k, block_n), rows_descriptor(v, block_n), lse, windows, text_len,
        seq, num_video, heads, int(canvas[1]), int(canvas[2]), *num_tiles(canvas, tile),
        scale * LOG2E, STAGES=stages, CONSUMERS=consumers, V_STAGES=v_stages,
        **tile_constexprs(q, canvas, tile),
        num_warps=4, maxnreg=MAXNREG_3 if consumers == 3 else MAXNREG,
    )
