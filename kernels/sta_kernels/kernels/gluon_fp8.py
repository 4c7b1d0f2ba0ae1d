"""An FP8 (e4m3) STA forward for sampling on Hopper: both matmuls in float8, in Gluon.

Inference only (no backward). The bf16 Gluon forward (``gluon_fwd``) spends most of a key
block's time on its two bf16 matmuls; Hopper's FP8 tensor cores run twice as fast, so
this kernel runs QK^T and PV in e4m3 with fp32 accumulation and the online softmax in fp32,
under the same warp specialisation (one producer warp, one consumer warpgroup per 64-query
frame). As in the bf16 forward, where the tile's frames divide by 3 three consumers take a
192-query block (``_fp8_consumer_seq``: each key block in sequence, q's e4m3 copy in shared
memory), which streams each k/v block for 192 queries instead of 128; elsewhere two
(``_fp8_consumer``: q in registers, the score matmul of block j issued before the PV matmul
of block j - 1). The two differ by fp32 rounding only.

Quantisation:

- q: in the kernel, once per query frame: one scale per row (token, head).
- k (``quantize_kv``, before the kernel): shifted by a per-(batch, head) channel mean (the
  scores of one query then all move by the same constant, which the softmax ignores
  exactly; the mean of every 8th video token is enough to remove channel offsets), then one
  scale per key block of 128 tokens.
- v (``quantize_kv``): one power-of-two scale 2^e per key block, stored transposed (D,
  keys), the K-major operand FP8 wgmma needs, with the keys of every 16 reordered to the
  order in which the score accumulator holds p, so p becomes the PV matmul's register
  operand without shuffles between threads.
- p: exp2(x - m + 8 + e - E) with E the head's largest block exponent: in [0, 256], so
  small probabilities keep e4m3's precision, and the block's v scale is folded into the
  exponent instead of a multiply per score; the output is multiplied by 2^E once.

The quantised k and v are packed per block in the kernel's visiting order: the video blocks
(two (TH, TW) frames of a tile, tiles in raster order), then the text slots in blocks of
128, zero padded. The pack kernel is triton and runs on CPU under ``TRITON_INTERPRET=1``.
Scope: ``gluon_fwd.supports`` with D = 128 (the PV matmul's B operand is a (D, 128) box).
``sta_gluon_fp8_video_forward`` writes the video query rows of o; the caller runs the text
queries in bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    MAXNREG_3,
    check_consumers,
    frames_descriptor,
    in_scope,
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
        CONSUMER_REGS_3,
        NEG_BIG,
        PRODUCER_REGS,
        ring_barriers,
        sync_threads,
        tma_load,
        tma_store,
        window_loop,
    )

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
BLOCK = 2 * FRAME  # tokens per packed block: two 64-token frames, the kernel's key block
SHIFT_STRIDE = 8  # k's shift is the mean of every 8th video token
PACK_WARPS = 16  # a (128, 128) float32 tile at 64 registers per thread: 2 programs per SM
MIN_V_EXP = tl.constexpr(-20)  # v block scales >= 2^-20 (a block of |v| < 4e-4 is ~zero)


@dataclass
class Fp8Operands:
    """The packed, quantised k and v of one call (see the module docstring).

    k8: (B, H, NK, D) e4m3, NK = blocks x 128; k_scale: (B, H, blocks) float32.
    vt8: (B, H, D, NK) e4m3; v_exp: (B, H, blocks) float32, e - E of each block's scale 2^e
    (<= 0); v_max: (B, H) float32, 2^E.
    """

    k8: torch.Tensor
    k_scale: torch.Tensor
    vt8: torch.Tensor
    v_exp: torch.Tensor
    v_max: torch.Tensor
    video_blocks: int
    blocks: int


@triton.jit
def _block_tokens(blk, rows, seq_len, num_video, video_blocks, CH, CW, NH, NW,
                  TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Token index (into S) of each of the ``rows`` of packed block ``blk`` and whether it
    exists: two frames of a tile for a video block, 128 text slots after the video."""
    SUBS: tl.constexpr = TT // 2
    if blk < video_blocks:
        tile = blk // SUBS
        t = (tile // (NH * NW)) * TT + (blk % SUBS) * 2 + rows // (TH * TW)
        h = ((tile // NW) % NH) * TH + (rows % (TH * TW)) // TW
        w = (tile % NW) * TW + rows % TW
        tok = (t * CH + h) * CW + w
    else:
        tok = num_video + (blk - video_blocks) * (2 * TH * TW) + rows
    return tok, tok < seq_len


@triton.jit
def _round_e4m3(y):
    """``y`` (float32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, still in
    float32: the cast to float8e4nv after it is exact on every backend (the CPU
    interpreter's own cast rounds differently from the GPU's cvt.rn)."""
    bits = y.to(tl.int32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)  # subnormals: the ulp of 2^-6
    ulp = ((exponent - 3) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    x = y / ulp  # exact: ulp is a power of two
    r = ((x + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: float32 adds round to even
    return tl.where(r == 0.0, y * 0.0, r)  # zero keeps y's sign, as the cast does


@triton.jit
def _key_of_column(c):
    """Key (row of the block) stored in column ``c`` of the packed v8^T: within every 16,
    column 4i + 2h + e holds key 8h + 2i + e, the order in which a thread of the PV matmul
    holds p (see ``_p_operand``)."""
    return (c // 16) * 16 + ((c // 2) % 2) * 8 + ((c // 4) % 4) * 2 + c % 2


@triton.jit
def _fp8_pack_kernel(
    K, V, K8, VT8, K_SCALE, V_EXP, SHIFT, seq_len, num_video, video_blocks, blocks, num_heads,
    CH, CW, NH, NW, stride_b, stride_s,
    TT: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One packed block of one (batch, head) of k (program_id(2) == 0: shifted, scaled by
    the block's amax) or of v (1: scaled by a power of two, stored transposed in the PV
    operand's key order)."""
    ROWS: tl.constexpr = 2 * TH * TW
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    rows = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    tok, valid = _block_tokens(blk, rows, seq_len, num_video, video_blocks, CH, CW, NH, NW,
                               TT, TH, TW)
    src = b.to(tl.int64) * stride_b + tok.to(tl.int64)[:, None] * stride_s \
        + h * HEAD_DIM + offs_d[None, :]
    if tl.program_id(2) == 0:  # k
        k = tl.load(K + src, mask=valid[:, None], other=0.0).to(tl.float32)  # (ROWS, D)
        shift = tl.load(SHIFT + bh * HEAD_DIM + offs_d)  # (D,)
        k = tl.where(valid[:, None], k - shift[None, :], 0.0)
        k_scale = tl.maximum(tl.max(tl.max(tl.abs(k), axis=1), axis=0), 1e-30) / FP8_MAX
        packed = bh.to(tl.int64) * blocks * ROWS + blk * ROWS  # the block's first packed row
        tl.store(K8 + (packed + rows)[:, None] * HEAD_DIM + offs_d[None, :],
                 _round_e4m3(tl.math.div_rn(k, k_scale)).to(tl.float8e4nv))
        tl.store(K_SCALE + bh * blocks + blk, k_scale)
    else:  # v: the smallest power of two 2^e with amax / 2^e <= 448
        # row c of the tile is the key stored in column c of the block (its operand order),
        # so the transposed tile's rows are contiguous in v8^T
        tok, valid = _block_tokens(blk, _key_of_column(rows), seq_len, num_video,
                                   video_blocks, CH, CW, NH, NW, TT, TH, TW)
        src = b.to(tl.int64) * stride_b + tok.to(tl.int64)[:, None] * stride_s \
            + h * HEAD_DIM + offs_d[None, :]
        v = tl.load(V + src, mask=valid[:, None], other=0.0).to(tl.float32)
        need = tl.math.div_rn(tl.max(tl.max(tl.abs(v), axis=1), axis=0), FP8_MAX)
        bits = need.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32) - 127
        exponent = tl.maximum(exponent, MIN_V_EXP)
        v_scale = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
        dst = VT8 + bh.to(tl.int64) * HEAD_DIM * blocks * ROWS \
            + offs_d[:, None] * (blocks * ROWS) + blk * ROWS + rows[None, :]
        v8 = _round_e4m3(v / v_scale).to(tl.float8e4nv)  # exact division: a power of two
        tl.store(dst, tl.trans(v8))  # (D, ROWS)
        tl.store(V_EXP + bh * blocks + blk, exponent.to(tl.float32))


def packed_blocks(canvas: Sequence[int], tile: Sequence[int], seq_len: int) -> tuple[int, int]:
    """(video blocks, all blocks) of the packed layout: two frames of every tile, then the
    text slots in blocks of 2 * TH * TW."""
    n = num_tiles(canvas, tile)
    video = n[0] * n[1] * n[2] * (int(tile[0]) // 2)
    rows = 2 * int(tile[1]) * int(tile[2])
    num_video = int(canvas[0]) * int(canvas[1]) * int(canvas[2])
    return video, video + triton.cdiv(seq_len - num_video, rows)


def k_shift(k: torch.Tensor, num_video: int) -> torch.Tensor:
    """(B, H, D) float32: the mean of every ``SHIFT_STRIDE``-th video key (any per-(batch,
    head) constant leaves the softmax unchanged; this one removes channel offsets)."""
    return k[:, :num_video:SHIFT_STRIDE].mean(dim=1, dtype=torch.float32).contiguous()


def quantize_kv(k: torch.Tensor, v: torch.Tensor, canvas: Sequence[int],
                tile: Sequence[int]) -> Fp8Operands:
    """Quantise and pack k, v (B, S, H, D) for ``sta_gluon_fp8_video_forward``: one triton
    launch plus small torch reductions (k's shift, v's largest block exponent). Full tiles of an even number of frames are
    required (the kernel's scope). Runs on any triton device, the CPU interpreter included.
    """
    batch, seq, heads, head_dim = k.shape
    tt, th, tw = (int(t) for t in tile)
    if tt % 2 or any(int(c) % int(t) for c, t in zip(canvas, tile, strict=True)):
        raise ValueError(f"quantize_kv needs full tiles of an even frame count, got canvas "
                         f"{tuple(canvas)} tile {tuple(tile)}")
    video, blocks = packed_blocks(canvas, tile, seq)
    rows = 2 * th * tw
    num_video = int(canvas[0]) * int(canvas[1]) * int(canvas[2])
    n = num_tiles(canvas, tile)
    f8, dev = torch.float8_e4m3fn, k.device
    k8 = torch.empty(batch, heads, blocks * rows, head_dim, device=dev, dtype=f8)
    vt8 = torch.empty(batch, heads, head_dim, blocks * rows, device=dev, dtype=f8)
    k_scale = torch.empty(batch, heads, blocks, device=dev, dtype=torch.float32)
    v_exp = torch.empty(batch, heads, blocks, device=dev, dtype=torch.float32)
    _fp8_pack_kernel[(blocks, batch * heads, 2)](
        k, v, k8, vt8, k_scale, v_exp, k_shift(k, num_video), seq, num_video, video, blocks,
        heads, int(canvas[1]), int(canvas[2]), n[1], n[2], k.stride(0), k.stride(1),
        TT=tt, TH=th, TW=tw, HEAD_DIM=head_dim, num_warps=PACK_WARPS,
    )
    top = v_exp.amax(dim=-1, keepdim=True)  # (B, H, 1): E
    return Fp8Operands(k8, k_scale, vt8, v_exp - top, torch.exp2(top[..., 0]), video, blocks)


def quantize_q(q: torch.Tensor) -> torch.Tensor:
    """q (B, S, H, D) as the kernel quantises it, in float64: per row, amax -> 448 (for
    tests and error reports; the kernel does this in registers)."""
    x = q.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448.0
    return (x / scale).to(torch.float8_e4m3fn).double() * scale.double()


def dequantized(ops: Fp8Operands, q: torch.Tensor, canvas: Sequence[int],
                tile: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (B, S, H, D) float64 q, k - shift and v the kernel computes with, for tests and
    error reports."""
    rows = BLOCK
    tok = packed_tokens(canvas, tile, q.shape[1]).to(q.device)  # (blocks * 128,) token or -1
    k = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    v = torch.zeros_like(k)
    k_rows = ops.k8.double() * ops.k_scale.double().repeat_interleave(rows, dim=2)[..., None]
    r = torch.arange(ops.blocks * rows, device=q.device)
    column = (r // 16) * 16 + ((r // 2) % 4) * 4 + ((r // 8) % 2) * 2 + r % 2
    v_scale = torch.exp2(ops.v_exp.double()) * ops.v_max.double()[..., None]  # (B, H, blocks)
    v_rows = ops.vt8.double()[..., column].transpose(2, 3) \
        * v_scale.repeat_interleave(rows, dim=2)[..., None]
    keep = tok >= 0
    k[:, tok[keep]] = k_rows[:, :, keep].permute(0, 2, 1, 3)
    v[:, tok[keep]] = v_rows[:, :, keep].permute(0, 2, 1, 3)
    return quantize_q(q), k, v


def packed_tokens(canvas: Sequence[int], tile: Sequence[int], seq_len: int) -> torch.Tensor:
    """The token (index into S) of every packed row, -1 for padding rows (CPU, int64)."""
    tt, th, tw = (int(t) for t in tile)
    ct, ch, cw = (int(c) for c in canvas)
    video, blocks = packed_blocks(canvas, tile, seq_len)
    grid = torch.arange(ct * ch * cw).reshape(ct // tt, tt // 2, 2, ch // th, th, cw // tw, tw)
    vid = grid.permute(0, 3, 5, 1, 2, 4, 6).reshape(-1)  # tiles raster, sub, frame, h, w
    text = torch.arange(ct * ch * cw, ct * ch * cw + (blocks - video) * 2 * th * tw)
    text[text >= seq_len] = -1
    return torch.cat([vid, text])


if AVAILABLE:
    F8 = gl.constexpr(gl.float8e4nv)
    ROWS_M = gl.constexpr(FRAME)  # query rows of a consumer: one frame
    P_BOOST = gl.constexpr(8.0)  # p is exp2(x - m + 8 + e - E): in [0, 256], inside e4m3
    Q_MAX = gl.constexpr(448.0)

    @gluon.jit
    def _p_operand(p, p_layout: gl.constexpr):
        """p (M, N) float32 in the score accumulator's layout as the e4m3 A operand of the
        PV matmul, its keys reordered within every 16: operand column 4i + 2h + e is key
        8h + 2i + e, the column a thread already holds (v8 is packed in the same order),
        so no shuffles between threads are needed."""
        M: gl.constexpr = p.shape[0]
        N: gl.constexpr = p.shape[1]
        p = p.reshape([M, N // 16, 2, 4, 2]).permute((0, 1, 3, 2, 4)).reshape([M, N])
        p = gl.convert_layout(p, p_layout)
        # four values per register with two cvt.e4m3x2 (the generic cast packs byte by byte)
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi;\n"
            "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
            "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
            "mov.b32 $0, {lo, hi}; }",
            "=r,r,r,r,r", [p], dtype=gl.float8e4nv, is_pure=True, pack=4)

    @gluon.jit
    def _key_block(j, video_trips, ft, fh, fw, wh, ww, NH, NW, video_blocks,
                   K_SUBS: gl.constexpr):
        """Packed block index of key block ``j`` of a query block's window loop."""
        if j < video_trips:
            cell = j // K_SUBS
            tile = ((ft + cell // (ww * wh)) * NH + fh + (cell // ww) % wh) * NW + fw + cell % ww
            blk = tile * K_SUBS + j % K_SUBS
        else:
            blk = video_blocks + j - video_trips
        return blk

    @gluon.jit
    def _fp8_producer(q_desc, k_desc, vt_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready,
                      k_empty, v_ready, v_empty, b, col, t0, h0, w0, k_row, vt_row, ft, fh,
                      fw, wh, ww, video_trips, trips, NH, NW, video_blocks,
                      K_SUBS: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """The load warp: the query block's ``CONSUMERS`` bf16 q frames once, then k8 and
        v8^T of every key block of the window and of the text."""
        N: gl.constexpr = 2 * ROWS_M
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(CONSUMERS):
            tma_load(q_desc, [b, t0 + c, h0, w0, col], q_bar, q_smem.index(c))
        for j in range(trips):
            stage = j % STAGES
            phase = (j // STAGES) & 1
            blk = _key_block(j, video_trips, ft, fh, fw, wh, ww, NH, NW, video_blocks, K_SUBS)
            mbarrier.wait(k_empty.index(stage), phase ^ 1)
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            tma_load(k_desc, [k_row + blk * N, 0], k_ready.index(stage), k_bufs.index(stage))
            mbarrier.wait(v_empty.index(stage), phase ^ 1)
            mbarrier.expect(v_ready.index(stage), vt_desc.block_type.nbytes)
            tma_load(vt_desc, [vt_row, blk * N], v_ready.index(stage), v_bufs.index(stage))

    @gluon.jit
    def _q_rows_e4m3(q, HEAD_DIM: gl.constexpr):
        """This consumer's bf16 q frame (shared memory) in e4m3, one scale per row: (q8,
        scale) in a blocked layout."""
        blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        x = q.reshape([ROWS_M, HEAD_DIM]).load(blocked).to(gl.float32)
        scale = gl.maximum(gl.max(gl.abs(x), axis=1), 1e-30) / Q_MAX
        return (x / gl.expand_dims(scale, 1)).to(F8), scale

    @gluon.jit
    def _quantize_q(q, s_layout: gl.constexpr, HEAD_DIM: gl.constexpr):
        """This consumer's bf16 q frame (shared memory) as the e4m3 A operand of the score
        matmul, and each row's scale."""
        x8, scale = _q_rows_e4m3(q, HEAD_DIM)
        q_op = gl.convert_layout(x8, gl.DotOperandLayout(operand_index=0, parent=s_layout,
                                                         k_width=4))
        return q_op, gl.convert_layout(scale, gl.SliceLayout(1, s_layout))

    @gluon.jit
    def _quantize_q_smem(q, q8, s_layout: gl.constexpr, HEAD_DIM: gl.constexpr):
        """This consumer's bf16 q frame quantised as ``_quantize_q`` does, into ``q8``
        (shared memory: the score matmul's A operand, which leaves the three-consumer loop
        the 16 registers per thread that q8 would hold), and each row's scale."""
        x8, scale = _q_rows_e4m3(q, HEAD_DIM)
        q8.store(x8)
        fence_async_shared()
        sync_threads()  # every thread's part of q8 written before the wgmma reads it
        return gl.convert_layout(scale, gl.SliceLayout(1, s_layout))

    @gluon.jit
    def _fp8_softmax_block(s, m_i, l_i, j, video_trips, text_len, cols, q_f, ks, ve,
                           N: gl.constexpr):
        """Online softmax of key block ``j``'s raw e4m3 scores ``s`` (M, N): ``q_f`` (M,)
        times the block's k scale ``ks`` takes them to log2-domain logits, ``ve`` is the
        block's v exponent. Returns (p, alpha, m_new, l_new), p in [0, 256] with the v
        scale folded in (``P_BOOST``), l 256 x the softmax denominator. Text key blocks
        (j past ``video_trips``) mask their slots past ``text_len``."""
        if j >= video_trips:  # text keys: slots past the valid text are padding
            pos = (j - video_trips) * N + cols
            s = gl.where(gl.expand_dims(pos < text_len, 0), s, NEG_BIG)
        f = q_f * ks
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * f)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * gl.expand_dims(f, 1) - gl.expand_dims(m_new - (P_BOOST + ve), 1))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1) * gl.exp2(-ve)

    @gluon.jit
    def _fp8_epilogue(acc, l_i, q, o_desc, VMAX, bh, b, col, t0, h0, w0,
                      row_o: gl.constexpr, C: gl.constexpr):
        """o = acc 2^E / l of frame ``C``, through its q buffer and TMA."""
        M: gl.constexpr = acc.shape[0]
        HEAD_DIM: gl.constexpr = acc.shape[1]
        o = acc * (gl.load(VMAX + bh) / gl.expand_dims(gl.convert_layout(l_i, row_o), 1))
        q.reshape([M, HEAD_DIM]).store(o.to(gl.bfloat16))
        fence_async_shared()
        tma_store(o_desc, [b, t0 + C, h0, w0, col], q)
        tma.store_wait(0)

    @gluon.jit
    def _fp8_consumer(o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready,
                      v_empty, KS, VE, VMAX, bh, b, col, t0, h0, w0, ft, fh, fw, wh, ww,
                      video_trips, trips, text_len, NH, NW, video_blocks, blocks, scale_log2,
                      HEAD_DIM: gl.constexpr, K_SUBS: gl.constexpr, STAGES: gl.constexpr,
                      C: gl.constexpr):
        """Consumer warpgroup ``C``: the online softmax of frame ``C`` of the query block,
        with the score matmul of block j issued before the PV matmul of block j - 1."""
        M: gl.constexpr = ROWS_M
        N: gl.constexpr = 2 * ROWS_M
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=4)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, s_layout))
        zero_s = gl.zeros([M, N], gl.float32, s_layout)
        table = bh * blocks
        q = q_smem.index(C)
        mbarrier.wait(q_bar, 0)
        q_op, q_scale = _quantize_q(q, s_layout, HEAD_DIM)
        q_f = q_scale * scale_log2  # (M,) to log2-domain logits, times the k block's scale

        blk = _key_block(0, video_trips, ft, fh, fw, wh, ww, NH, NW, video_blocks, K_SUBS)
        ks = gl.load(KS + table + blk)
        ve = gl.load(VE + table + blk)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_op, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))  # (M, N) raw scores of q8 and k8
        mbarrier.arrive(k_empty.index(0), count=1)
        f = q_f * ks
        m_i = gl.max(s, axis=1) * f  # (M,) running max, log2 domain
        p = gl.exp2(s * gl.expand_dims(f, 1) - gl.expand_dims(m_i - (P_BOOST + ve), 1))
        l_i = gl.sum(p, axis=1) * gl.exp2(-ve)  # (M,) 256 x the softmax denominator
        acc = gl.zeros([M, HEAD_DIM], gl.float32, o_layout)
        for j in range(1, trips):
            stage = j % STAGES
            prev = (j - 1) % STAGES
            blk = _key_block(j, video_trips, ft, fh, fw, wh, ww, NH, NW, video_blocks, K_SUBS)
            ks = gl.load(KS + table + blk)
            ve = gl.load(VE + table + blk)
            mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            s_tok = warpgroup_mma(q_op, k_bufs.index(stage).permute((1, 0)), zero_s,
                                  use_acc=False, is_async=True)
            # p crosses the loop in float32: converted here, next to its matmul, its bytes
            # go into the operand registers without the byte moves a loop-carried e4m3
            # tensor costs
            o_tok = warpgroup_mma(_p_operand(p, p_layout), v_bufs.index(prev).permute((1, 0)),
                                  acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, alpha, m_new, l_i = _fp8_softmax_block(s, m_i, l_i, j, video_trips, text_len,
                                                      cols, q_f, ks, ve, N)
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            m_i = m_new
        last = (trips - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((trips - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(_p_operand(p, p_layout), v_bufs.index(last).permute((1, 0)),
                              acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok,))
        mbarrier.arrive(v_empty.index(last), count=1)

        _fp8_epilogue(acc, l_i, q, o_desc, VMAX, bh, b, col, t0, h0, w0, row_o, C)

    @gluon.jit
    def _fp8_consumer_seq(o_desc, q_smem, q8_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty,
                          v_ready, v_empty, KS, VE, VMAX, bh, b, col, t0, h0, w0, ft, fh, fw,
                          wh, ww, video_trips, trips, text_len, NH, NW, video_blocks, blocks,
                          scale_log2, HEAD_DIM: gl.constexpr, K_SUBS: gl.constexpr,
                          STAGES: gl.constexpr, C: gl.constexpr):
        """Consumer warpgroup ``C`` of three: ``_fp8_consumer``'s online softmax with each
        key block in sequence (score matmul, softmax, PV matmul) and q8 read from shared
        memory, as ``gluon_fwd._consumer_seq`` does at the 160 registers of three
        consumers."""
        M: gl.constexpr = ROWS_M
        N: gl.constexpr = 2 * ROWS_M
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        cols = gl.arange(0, N, layout=gl.SliceLayout(0, s_layout))
        zero_s = gl.zeros([M, N], gl.float32, s_layout)
        table = bh * blocks
        q = q_smem.index(C)
        q8 = q8_smem.index(C)  # (M, D) e4m3
        mbarrier.wait(q_bar, 0)
        q_f = _quantize_q_smem(q, q8, s_layout, HEAD_DIM) * scale_log2
        m_i = gl.full([M], NEG_BIG, gl.float32, row_s)  # alpha of block 0 is 0
        l_i = gl.zeros([M], gl.float32, row_s)
        acc = gl.zeros([M, HEAD_DIM], gl.float32, o_layout)
        for j in range(trips):
            stage = j % STAGES
            phase = (j // STAGES) & 1
            blk = _key_block(j, video_trips, ft, fh, fw, wh, ww, NH, NW, video_blocks, K_SUBS)
            ks = gl.load(KS + table + blk)
            ve = gl.load(VE + table + blk)
            mbarrier.wait(k_ready.index(stage), phase)
            s_tok = warpgroup_mma(q8, k_bufs.index(stage).permute((1, 0)), zero_s,
                                  use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok,))  # (M, N) raw scores of q8 and k8
            mbarrier.arrive(k_empty.index(stage), count=1)
            p, alpha, m_i, l_i = _fp8_softmax_block(s, m_i, l_i, j, video_trips, text_len,
                                                    cols, q_f, ks, ve, N)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            mbarrier.wait(v_ready.index(stage), phase)
            o_tok = warpgroup_mma(_p_operand(p, p_layout), v_bufs.index(stage).permute((1, 0)),
                                  acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(o_tok,))
            mbarrier.arrive(v_empty.index(stage), count=1)
        _fp8_epilogue(acc, l_i, q, o_desc, VMAX, bh, b, col, t0, h0, w0, row_o, C)

    @gluon.jit
    def _sta_fwd_fp8_kernel(
        q_desc, k_desc, vt_desc, o_desc, KS, VE, VMAX, WIN, TEXT_LEN, num_heads, NT, NH, NW,
        video_blocks, blocks, scale_log2,
        TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr, HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr, TEXT: gl.constexpr, CONSUMERS: gl.constexpr,
    ):
        """One program per video query block (``CONSUMERS`` frames of a tile, one consumer
        warpgroup each) and (batch, head)."""
        K_SUBS: gl.constexpr = TT // 2
        N: gl.constexpr = 2 * ROWS_M
        pid = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // num_heads
        h = bh % num_heads
        t0, h0, w0, ft, fh, fw, wh, ww, video_trips, text_len, trips = window_loop(
            pid, b, h, WIN, TEXT_LEN, NT, NH, NW, TT, TH, TW, K_SUBS, N, TEXT, CONSUMERS)

        q_smem = gl.allocate_shared_memory(gl.bfloat16, [CONSUMERS] + q_desc.block_type.shape,
                                           q_desc.layout)
        k_bufs = gl.allocate_shared_memory(F8, [STAGES] + k_desc.block_type.shape,
                                           k_desc.layout)
        v_bufs = gl.allocate_shared_memory(F8, [STAGES] + vt_desc.block_type.shape,
                                           vt_desc.layout)
        q_bar, k_ready, k_empty, v_ready, v_empty = ring_barriers(STAGES, CONSUMERS, STAGES)

        if CONSUMERS == 3:
            q8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS_M, HEAD_DIM],
                                                                           F8)
            q8_smem = gl.allocate_shared_memory(F8, [3, ROWS_M, HEAD_DIM], q8_layout)
            gl.warp_specialize([
                (_fp8_consumer_seq, (o_desc, q_smem, q8_smem, k_bufs, v_bufs, q_bar, k_ready,
                                     k_empty, v_ready, v_empty, KS, VE, VMAX, bh, b,
                                     h * HEAD_DIM, t0, h0, w0, ft, fh, fw, wh, ww, video_trips,
                                     trips, text_len, NH, NW, video_blocks, blocks, scale_log2,
                                     HEAD_DIM, K_SUBS, STAGES, 0)),
                (_fp8_consumer_seq, (o_desc, q_smem, q8_smem, k_bufs, v_bufs, q_bar, k_ready,
                                     k_empty, v_ready, v_empty, KS, VE, VMAX, bh, b,
                                     h * HEAD_DIM, t0, h0, w0, ft, fh, fw, wh, ww, video_trips,
                                     trips, text_len, NH, NW, video_blocks, blocks, scale_log2,
                                     HEAD_DIM, K_SUBS, STAGES, 1)),
                (_fp8_consumer_seq, (o_desc, q_smem, q8_smem, k_bufs, v_bufs, q_bar, k_ready,
                                     k_empty, v_ready, v_empty, KS, VE, VMAX, bh, b,
                                     h * HEAD_DIM, t0, h0, w0, ft, fh, fw, wh, ww, video_trips,
                                     trips, text_len, NH, NW, video_blocks, blocks, scale_log2,
                                     HEAD_DIM, K_SUBS, STAGES, 2)),
                (_fp8_producer, (q_desc, k_desc, vt_desc, q_smem, k_bufs, v_bufs, q_bar,
                                 k_ready, k_empty, v_ready, v_empty, b, h * HEAD_DIM, t0, h0,
                                 w0, bh * blocks * N, bh * HEAD_DIM, ft, fh, fw, wh, ww,
                                 video_trips, trips, NH, NW, video_blocks, K_SUBS, STAGES,
                                 CONSUMERS)),
            ], [4, 4, 1], [CONSUMER_REGS_3, CONSUMER_REGS_3, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_fp8_consumer, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty,
                                 v_ready, v_empty, KS, VE, VMAX, bh, b, h * HEAD_DIM, t0, h0,
                                 w0, ft, fh, fw, wh, ww, video_trips, trips, text_len, NH, NW,
                                 video_blocks, blocks, scale_log2, HEAD_DIM, K_SUBS, STAGES,
                                 0)),
                (_fp8_consumer, (o_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, k_empty,
                                 v_ready, v_empty, KS, VE, VMAX, bh, b, h * HEAD_DIM, t0, h0,
                                 w0, ft, fh, fw, wh, ww, video_trips, trips, text_len, NH, NW,
                                 video_blocks, blocks, scale_log2, HEAD_DIM, K_SUBS, STAGES,
                                 1)),
                (_fp8_producer, (q_desc, k_desc, vt_desc, q_smem, k_bufs, v_bufs, q_bar,
                                 k_ready, k_empty, v_ready, v_empty, b, h * HEAD_DIM, t0, h0,
                                 w0, bh * blocks * N, bh * HEAD_DIM, ft, fh, fw, wh, ww,
                                 video_trips, trips, NH, NW, video_blocks, K_SUBS, STAGES,
                                 CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def supports(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]) -> bool:
    """Whether ``sta_gluon_fp8_video_forward`` covers this call's video queries: the bf16
    Gluon forward's scope (``gluon_fwd.supports``) with D = 128."""
    return in_scope(q, canvas, tile, (128,))


def _fp8_descriptor(x: torch.Tensor, block: list[int]):
    """TMA descriptor of the packed e4m3 tensor ``x`` viewed as 2D rows, box ``block``."""
    rows = x.numel() // x.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor(x.view(rows, x.shape[-1]), [rows, x.shape[-1]], [x.shape[-1], 1],
                            block, layout)


def sta_gluon_fp8_video_forward(
    q: torch.Tensor,
    ops: Fp8Operands,
    o: torch.Tensor,
    windows: torch.Tensor,
    text_len: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    scale: float,
    stages: int = 2,
    consumers: int | None = None,
) -> CompiledKernel:
    """Write the video query rows of ``o`` from q and the quantised k, v (``quantize_kv``
    of this call). Text query rows are left to the caller.

    Args:
        q, o: (B, S, H, D) contiguous bf16 on a Hopper GPU (see ``supports``).
        windows: (H, 3) int32; text_len: (B,) int32 valid text tokens; both on the device.
        stages: buffers of the k and v rings.
        consumers: consumer warpgroups (64-query frames per program): 2, 3 (tiles whose
            frames divide by 3), or None for ``gluon_common.default_consumers``.
    Returns:
        the launched kernel (its compiled handle).
    """
    consumers = check_consumers(tile, consumers, "sta_gluon_fp8_video_forward")
    if not supports(q, canvas, tile) or not o.is_contiguous():
        raise ValueError("sta_gluon_fp8_video_forward: call outside the kernel's scope (see "
                         "gluon_fp8.supports)")
    return _launch(q, ops, o, windows, text_len, canvas, tile, scale, stages, consumers)


def _launch(q, ops, o, windows, text_len, canvas, tile, scale, stages, consumers):
    """The launch of ``sta_gluon_fp8_video_forward`` without its device checks
    (``consumers`` resolved by ``gluon_common.check_consumers``)."""
    batch, _, heads, head_dim = q.shape
    grid = (video_blocks(canvas, tile, consumers), batch * heads)
    return _sta_fwd_fp8_kernel[grid](
        frames_descriptor(q, canvas, tile, 1), _fp8_descriptor(ops.k8, [BLOCK, head_dim]),
        _fp8_descriptor(ops.vt8, [head_dim, BLOCK]), frames_descriptor(o, canvas, tile, 1),
        ops.k_scale, ops.v_exp, ops.v_max, windows, text_len, heads,
        *num_tiles(canvas, tile), ops.video_blocks, ops.blocks, scale * LOG2E,
        STAGES=stages, CONSUMERS=consumers, **tile_constexprs(q, canvas, tile),
        num_warps=4, maxnreg=MAXNREG_3 if consumers == 3 else MAXNREG,
    )
