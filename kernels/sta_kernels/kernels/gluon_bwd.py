"""A warp-specialised STA backward (dk, dv and the fused dq) for Hopper, in Gluon.

The Triton backward (``triton_sta._sta_dkdv_kernel`` with the fused dq) holds a key block's
dk and dv, the score tiles and the dq block in the registers of every thread of 8 warps,
more than fit, so it spills. This kernel gives each key frame its own warpgroup, as
FlashAttention-3's Hopper backward does:

- one producer warp loads the key block (two frames of k and v) once, then q, do and the
  query block's (lse, delta) row for every query block of the window into a ring of
  ``STAGES`` buffers;
- two consumer warpgroups, one per 64-key frame, each compute s^T = k q^T and dp^T = v do^T
  for their keys against the 64-query block (both issued before the exp2s), p^T, ds^T, and
  accumulate dv += p^T do and dk += ds^T q in registers (240 per thread);
- each consumer writes its ds^T rows to shared memory; once both halves are there, consumer
  c computes columns [c * D / 2, (c + 1) * D / 2) of dq = ds k over all 128 keys, stages
  them in shared memory and adds them into the fp32 dq buffer with one TMA reduce (pointer
  atomics from registers cost more than the staging).

The (lse, delta) rows come from ``_frame_stats_kernel``, which computes delta = rowsum(o *
do) (also in the raster layout the Triton kernel reads) and writes, per 64-query block in
the order the kernel visits them, the 64 lse values (log2 domain) then the 64 deltas; rows
that are not queries (text padding) get an lse of +1e30, so their p and ds are exactly 0
and no mask is needed inside the loop.

Scope: the video key blocks of a call the Gluon forward covers (``gluon_fwd.supports``) with
D = 128; text key blocks (attended by every query) stay with the Triton kernel.
``sta_kernels.ops`` runs the two and the cast of dq.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from ..geometry import num_tiles
from .gluon_common import (
    AVAILABLE,
    FRAME,
    LOG2E,
    MAXNREG,
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
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .gluon_common import (
        CONSUMER_REGS,
        PRODUCER_REGS,
        as_box,
        frame_block,
        head_window,
        sync_threads,
        tma_load,
    )

    if hasattr(tma, "async_atomic_add"):  # triton >= 3.7 names the TMA reduce
        _tma_add = tma.async_atomic_add
    else:  # 3.6 builds it (create_async_tma_reduce) but has no Python wrapper yet
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            """Add ``src`` (shared memory) into the box of ``tensor_desc`` at ``coord``
            with a TMA reduce (cp.reduce.async.bulk.tensor .add)."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                      tensor_desc.handle, coord, src.handle)


def _launch_options() -> dict:
    """Compile options of the main kernel's launch beyond its warps and registers:
    ``sched4reg`` (LLVM's NVPTX scheduler ordering for register pressure) where triton has
    it. It cuts the kernel's spills to a few words and changes no result bit."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a triton without the NVIDIA backend
        return {}
    return {"sched4reg": True} if "sched4reg" in CUDAOptions.__dataclass_fields__ else {}


LAUNCH_OPTIONS = _launch_options()

NOT_A_QUERY = tl.constexpr(1.0e30)  # the lse of a row that is not a query: exp2(s - it) = 0
STATS = 2 * FRAME  # floats per query block in the kernel's stats rows: 64 lse, then 64 delta


@triton.jit
def _frame_stats_kernel(
    Out, DO, LSE, DELTA, STATS_OUT, TEXT_LEN, stride_b, stride_s, stride_h, seq_len, num_video,
    num_heads, CH, CW, NH, NW, num_frames, num_blocks,
    TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """delta = rowsum(o * do) of one 64-query block, into DELTA (B, H, S) and, with the
    block's lse, into its row of STATS_OUT (B * H * num_blocks, 128).

    Blocks: the (TH, TW) frames of the canvas (frame t, tile row, tile column in raster
    order), then the text rows in blocks of 64. Rows that are not queries (text padding,
    or past the sequence) get lse +1e30 and delta 0.
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    r = tl.arange(0, TH * TW)
    t = blk // (NH * NW)
    frame_tok = (t * CH + ((blk // NW) % NH) * TH + r // TW) * CW + (blk % NW) * TW + r % TW
    pos = (blk - num_frames) * (TH * TW) + r  # text position (text blocks)
    is_video = blk < num_frames
    tok = tl.where(is_video, frame_tok, num_video + pos)
    in_seq = tok < seq_len
    query = is_video | (pos < tl.load(TEXT_LEN + b))
    base = b.to(tl.int64) * stride_b + h * stride_h
    off = tok[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :]  # (64, D)
    o = tl.load(Out + base + off, mask=in_seq[:, None], other=0.0)
    do = tl.load(DO + base + off, mask=in_seq[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * seq_len
    tl.store(DELTA + row + tok, delta, mask=in_seq)
    lse = tl.load(LSE + row + tok, mask=in_seq, other=0.0)
    out = STATS_OUT + (bh.to(tl.int64) * num_blocks + blk) * (2 * TH * TW)
    tl.store(out + r, tl.where(query & in_seq, lse, NOT_A_QUERY))
    tl.store(out + TH * TW + r, tl.where(query & in_seq, delta, 0.0))


if AVAILABLE:

    @gluon.jit
    def _axis_queries(ki, n, w):
        """(first, count) of the query tiles (of ``n``) whose window of ``w`` holds key tile
        ``ki`` (the inverse of ``gluon_common.axis_start``)."""
        first = gl.where(ki <= w - 1, 0, ki - w + 1 + w // 2)
        last = gl.where(ki >= n - w, n - 1, ki + w // 2)
        return first, last - first + 1

    @gluon.jit
    def _query_coords(j, first_t, first_h, first_w, cnt_h, cnt_w, TT: gl.constexpr,
                      TH: gl.constexpr, TW: gl.constexpr):
        """(t, h, w) of the first token of video query block ``j`` (one frame): a tile's TT
        frames one after another, the window's query tiles in raster order (the key blocks
        of a tile, which run side by side, then add into the same dq rows at about the same
        time, which L2 serves better than staggered adds)."""
        sub = j % TT
        cell = j // TT
        dt = cell // (cnt_w * cnt_h)
        dh = (cell // cnt_w) % cnt_h
        dw = cell % cnt_w
        return (first_t + dt) * TT + sub, (first_h + dh) * TH, (first_w + dw) * TW

    @gluon.jit
    def _bwd_producer(q_desc, do_desc, k_desc, v_desc, qr_desc, dor_desc, st_desc,
                      k_smem, v_smem, q_bufs, do_bufs, st_bufs, kv_bar, ready, empty,
                      b, col, kt0, kh0, kw0, first_t, first_h, first_w, cnt_h, cnt_w,
                      video_trips, trips, num_video, st_row0, NH, NW, num_frames,
                      TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                      STAGES: gl.constexpr):
        """The load warp: the key block's k and v once, then q, do and the stats row of
        every query block: the window's video frames, then the text blocks."""
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma_load(k_desc, [b, kt0, kh0, kw0, col], kv_bar, k_smem)
        tma_load(v_desc, [b, kt0, kh0, kw0, col], kv_bar, v_smem)
        NBYTES: gl.constexpr = (q_desc.block_type.nbytes + do_desc.block_type.nbytes
                                + st_desc.block_type.nbytes)
        for j in range(trips):
            stage = j % STAGES
            # a fresh barrier counts as completed for phase 1: the first pass does not wait
            mbarrier.wait(empty.index(stage), ((j // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, NBYTES)
            if j < video_trips:
                qt, qh, qw = _query_coords(j, first_t, first_h, first_w, cnt_h, cnt_w, TT, TH,
                                           TW)
                tma_load(q_desc, [b, qt, qh, qw, col], bar, q_bufs.index(stage))
                tma_load(do_desc, [b, qt, qh, qw, col], bar, do_bufs.index(stage))
                blk = (qt * NH + qh // TH) * NW + qw // TW
            else:
                row = num_video + (j - video_trips) * (TH * TW)
                tma_load(qr_desc, [b, row, col], bar, as_box(q_bufs.index(stage), qr_desc))
                tma_load(dor_desc, [b, row, col], bar,
                          as_box(do_bufs.index(stage), dor_desc))
                blk = num_frames + (j - video_trips)
            tma_load(st_desc, [st_row0 + blk, 0], bar, st_bufs.index(stage))

    @gluon.jit
    def _bwd_consumer(k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_bufs, dq_buf, kv_bar, ready,
                      empty, ds_ready, dq_desc, dqr_desc, DK, DV, b, col, base, kt0, kh0, kw0,
                      first_t, first_h, first_w, cnt_h, cnt_w, video_trips, trips, num_video,
                      row_stride, CH, CW, scale, scale_log2, HEAD_DIM: gl.constexpr,
                      TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                      STAGES: gl.constexpr, C: gl.constexpr):
        """Consumer warpgroup ``C``: dk and dv of key frame ``C`` of the key block, and
        columns [C * D / 2, (C + 1) * D / 2) of every query block's dq."""
        M: gl.constexpr = TH * TW  # keys of this warpgroup, and queries of a block
        HALF: gl.constexpr = HEAD_DIM // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                      k_width=2)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        k_all = k_smem.reshape([2 * M, HEAD_DIM])  # (128 keys, D)
        k_c = k_all.slice(C * M, M, dim=0)  # (64 keys, D): this warpgroup's frame
        v_c = v_smem.reshape([2 * M, HEAD_DIM]).slice(C * M, M, dim=0)
        k_half = k_all.slice(C * HALF, HALF, dim=1)  # (128 keys, D / 2)
        zero_s = gl.zeros([M, M], gl.float32, s_layout)
        zero_dq = gl.zeros([M, HALF], gl.float32, dq_layout)
        dk = gl.zeros([M, HEAD_DIM], gl.float32, acc_layout)  # (keys, D), unscaled
        dv = gl.zeros([M, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(kv_bar, 0)
        for j in range(trips):
            stage = j % STAGES
            mbarrier.wait(ready.index(stage), (j // STAGES) & 1)
            qb = q_bufs.index(stage).reshape([M, HEAD_DIM])  # (queries, D)
            dob = do_bufs.index(stage).reshape([M, HEAD_DIM])
            st = st_bufs.index(stage).reshape([2 * M])  # lse then delta of the queries
            s_tok = warpgroup_mma(k_c, qb.permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
            dp_tok = warpgroup_mma(v_c, dob.permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
            lse = st.slice(0, M).load(col_s)
            s = warpgroup_mma_wait(1, deps=(s_tok,))  # s^T (keys, queries); dp^T may run
            p = gl.exp2(s * scale_log2 - gl.expand_dims(lse, 0))
            p_op = gl.convert_layout(p.to(gl.bfloat16), op_layout)
            dv_tok = warpgroup_mma(p_op, dob, dv, is_async=True)
            delta = st.slice(M, M).load(col_s)
            dp = warpgroup_mma_wait(1, deps=(dp_tok,))  # dv may run
            ds = (p * (dp - gl.expand_dims(delta, 0))).to(gl.bfloat16)  # ds^T (keys, queries)
            ds_op = gl.convert_layout(ds, op_layout)
            dk_tok = warpgroup_mma(ds_op, qb, dk, is_async=True)
            # both frames' ds^T rows in shared memory, then dq = ds k (this half of D)
            dsb = ds_bufs.index(j % 2)  # (128 keys, 64 queries)
            dsb.slice(C * M, M, dim=0).store(ds)
            sync_threads()
            fence_async_shared()
            mbarrier.arrive(ds_ready.index(j % 2), count=1)
            mbarrier.wait(ds_ready.index(j % 2), (j // 2) & 1)
            dq_tok = warpgroup_mma(dsb.permute((1, 0)), k_half, zero_dq, use_acc=False,
                                   is_async=True)
            dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(
                0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
            mbarrier.arrive(empty.index(stage), count=1)
            # stage this half of dq in shared memory (once the previous reduce has read it)
            # and add it into the fp32 buffer with one TMA reduce
            tma.store_wait(0)
            sync_threads()
            dq_buf.reshape([M, HALF]).store(dq)
            sync_threads()
            fence_async_shared()
            if j < video_trips:
                qt, qh, qw = _query_coords(j, first_t, first_h, first_w, cnt_h, cnt_w, TT, TH,
                                           TW)
                _tma_add(dq_desc, [b, qt, qh, qw, col + C * HALF], dq_buf)
            else:  # rows past the sequence are dropped by the TMA unit
                _tma_add(dqr_desc, [b, num_video + (j - video_trips) * M, col + C * HALF],
                         as_box(dq_buf, dqr_desc))
        tma.store_wait(0)  # the last reduce has read its shared memory

        # epilogue: this frame's dk (scaled) and dv, straight from registers
        k_rows = gl.arange(0, M, layout=gl.SliceLayout(1, acc_layout))
        k_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        k_tok = ((kt0 + C) * CH + kh0) * CW + kw0 + (k_rows // TW) * CW + k_rows % TW
        k_offs = gl.expand_dims(k_tok * row_stride, 1) + gl.expand_dims(k_cols, 0)
        gl.store(DK + base + k_offs, (dk * scale).to(gl.bfloat16))
        gl.store(DV + base + k_offs, dv.to(gl.bfloat16))

    @gluon.jit
    def _sta_bwd_ws_kernel(
        q_desc, do_desc, k_desc, v_desc, qr_desc, dor_desc, st_desc, dq_desc, dqr_desc, DK, DV,
        WIN, TEXT_LEN, stride_b, num_video, num_heads, CH, CW, NT, NH, NW, num_blocks,
        scale, scale_log2,
        TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr, TEXT: gl.constexpr,
    ):
        """One program per video key block (two frames of a tile) and (batch, head)."""
        M: gl.constexpr = TH * TW
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        col = h * HEAD_DIM
        base = b.to(gl.int64) * stride_b + col  # (B, S, H, D) element offset of (b, 0, h, 0)
        tile_t, tile_h, tile_w, kt0, kh0, kw0 = frame_block(pid, NH, NW, TT, TH, TW, 2)
        wt, wh, ww = head_window(WIN, h, NT, NH, NW)
        first_t, cnt_t = _axis_queries(tile_t, NT, wt)
        first_h, cnt_h = _axis_queries(tile_h, NH, wh)
        first_w, cnt_w = _axis_queries(tile_w, NW, ww)
        video_trips = cnt_t * cnt_h * cnt_w * TT
        text_len = 0
        if TEXT:
            text_len = gl.load(TEXT_LEN + b)
        trips = video_trips + (text_len + M - 1) // M
        num_frames = num_video // M
        st_row0 = bh * num_blocks
        row_stride = num_heads * HEAD_DIM

        k_smem = gl.allocate_shared_memory(gl.bfloat16, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.bfloat16, v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES] + q_desc.block_type.shape,
                                           q_desc.layout)
        do_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        st_bufs = gl.allocate_shared_memory(gl.float32, [STAGES] + st_desc.block_type.shape,
                                            st_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * M, M],
                                                                       gl.bfloat16)
        ds_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, 2 * M, M], ds_layout)
        dq_bufs = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape,
                                            dq_desc.layout)  # one half of dq per consumer
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release a buffer
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)  # both consumers' halves written

        gl.warp_specialize([
            (_bwd_consumer, (k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_bufs,
                             dq_bufs.index(0), kv_bar, ready, empty, ds_ready, dq_desc,
                             dqr_desc, DK, DV, b, col, base, kt0, kh0, kw0, first_t, first_h,
                             first_w, cnt_h, cnt_w, video_trips, trips, num_video, row_stride,
                             CH, CW, scale, scale_log2, HEAD_DIM, TT, TH, TW, STAGES, 0)),
            (_bwd_consumer, (k_smem, v_smem, q_bufs, do_bufs, st_bufs, ds_bufs,
                             dq_bufs.index(1), kv_bar, ready, empty, ds_ready, dq_desc,
                             dqr_desc, DK, DV, b, col, base, kt0, kh0, kw0, first_t, first_h,
                             first_w, cnt_h, cnt_w, video_trips, trips, num_video, row_stride,
                             CH, CW, scale, scale_log2, HEAD_DIM, TT, TH, TW, STAGES, 1)),
            (_bwd_producer, (q_desc, do_desc, k_desc, v_desc, qr_desc, dor_desc, st_desc,
                             k_smem, v_smem, q_bufs, do_bufs, st_bufs, kv_bar, ready, empty,
                             b, col, kt0, kh0, kw0, first_t, first_h, first_w, cnt_h, cnt_w,
                             video_trips, trips, num_video, st_row0, NH, NW, num_frames, TT,
                             TH, TW, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def supports(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]) -> bool:
    """Whether ``sta_gluon_backward`` covers this call's video key blocks: the Gluon
    forward's scope (``gluon_fwd.supports``) with D = 128."""
    return in_scope(q, canvas, tile, (128,))


def _stats_descriptor(stats: torch.Tensor):
    """TMA descriptor of the (rows, 128) fp32 stats buffer, box one row."""
    block = [1, STATS]
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return TensorDescriptor(stats, list(stats.shape), [stats.stride(0), 1], block, layout)


def sta_gluon_backward(
    do: torch.Tensor,
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
    delta: torch.Tensor,
    dq_acc: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    stages: int = 2,
) -> CompiledKernel:
    """The video key blocks' part of the fused backward: writes ``delta`` (all rows), the
    video rows of ``dk`` and ``dv``, and adds their (unscaled) dq into ``dq_acc``.

    Args:
        do, q, k, v, o: (B, S, H, D) contiguous bf16 on a Hopper GPU (see ``supports``).
        lse: (B, H, S) float32 from the forward (log2 domain); delta: (B, H, S) float32 out.
        windows: (H, 3) int32; text_len: (B,) int32 valid text tokens; both on the device.
        dq_acc: (B, S, H, D) float32, zeroed by the caller; dk, dv: (B, S, H, D) bf16 out.
    Returns:
        the launched main kernel (its compiled handle: registers, shared memory).
    """
    if not supports(q, canvas, tile):
        raise ValueError("sta_gluon_backward: call outside the kernel's scope (see "
                         "gluon_bwd.supports)")
    return _launch(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale, delta, dq_acc,
                   dk, dv, stages)


def frame_stats(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                text_len: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]
                ) -> torch.Tensor:
    """Write delta = rowsum(o * do) into ``delta`` (B, H, S) and return the stats rows the
    backward kernel loads: (B * H * blocks, 2 * TH * TW) float32, per block of TH * TW
    queries (the canvas's (TH, TW) frames, then the text rows) its lse, then its delta;
    rows that are not queries hold lse +1e30 and delta 0.

    Args:
        o, do: (B, S, H, D) contiguous; lse: (B, H, S) float32 (log2 domain);
        text_len: (B,) int32 valid text tokens on the device of ``o``.
    """
    batch, seq, heads, head_dim = o.shape
    n = num_tiles(canvas, tile)
    frame = int(tile[1]) * int(tile[2])
    num_video = int(canvas[0]) * int(canvas[1]) * int(canvas[2])
    num_frames = num_video // frame
    num_blocks = num_frames + triton.cdiv(seq - num_video, frame)
    stats = torch.empty(batch * heads * num_blocks, 2 * frame, device=o.device,
                        dtype=torch.float32)
    _frame_stats_kernel[(num_blocks, batch * heads)](
        o, do, lse, delta, stats, text_len, o.stride(0), o.stride(1), o.stride(2), seq,
        num_video, heads, int(canvas[1]), int(canvas[2]), n[1], n[2], num_frames, num_blocks,
        TH=int(tile[1]), TW=int(tile[2]), HEAD_DIM=head_dim, num_warps=4)
    return stats


def _launch(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale, delta, dq_acc, dk,
            dv, stages):
    """The two launches of ``sta_gluon_backward`` without its device checks."""
    batch, _, heads, head_dim = q.shape
    num_video = int(canvas[0]) * int(canvas[1]) * int(canvas[2])
    stats = frame_stats(o, do, lse, delta, text_len, canvas, tile)
    num_blocks = stats.shape[0] // (batch * heads)
    return _sta_bwd_ws_kernel[(video_blocks(canvas, tile), batch * heads)](
        frames_descriptor(q, canvas, tile, 1), frames_descriptor(do, canvas, tile, 1),
        frames_descriptor(k, canvas, tile, 2), frames_descriptor(v, canvas, tile, 2),
        rows_descriptor(q, FRAME), rows_descriptor(do, FRAME), _stats_descriptor(stats),
        frames_descriptor(dq_acc, canvas, tile, 1, head_dim // 2),  # half a head of dq
        rows_descriptor(dq_acc, FRAME, head_dim // 2), dk, dv, windows, text_len,
        q.stride(0), num_video, heads, int(canvas[1]), int(canvas[2]), *num_tiles(canvas, tile),
        num_blocks, scale, scale * LOG2E, STAGES=stages, **tile_constexprs(q, canvas, tile),
        num_warps=4, maxnreg=MAXNREG, **LAUNCH_OPTIONS,
    )
