"""What the three Gluon (Hopper) kernels share: triton's Gluon imports, register budgets,
the window arithmetic and barriers on the device, TMA descriptors and the scope check on
the host.

The kernels (``gluon_fwd``, ``gluon_bwd``, ``gluon_fp8``) work on whole (TH, TW) frames of
64 tokens: a program's block is frames of one tile, and a block of frames is one box of a
TMA descriptor of the (B, CT, CH, CW, H * D) view of a (B, S, H, D) tensor. Everything
device-side is defined only where Gluon imports (``AVAILABLE``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # Gluon ships with triton >= 3.5 (3.6 has the warp_specialize API used here)
    import triton

    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"triton {triton.__version__}: the Gluon kernels need >= 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    AVAILABLE = True
except (ImportError, ValueError):  # pragma: no cover - older triton, or a local version tag
    AVAILABLE = False

from ..geometry import num_tiles

LOG2E = 1.4426950408889634
FRAME = 64  # tokens of one (TH, TW) frame: the rows of one consumer warpgroup
MAXNREG = 168  # 12 warps (3 warpgroups) x 168 x 32 fits the 64K registers of an SM
MAXNREG_3 = 128  # the three-consumer forward: 16 warps (4 warpgroups) x 128 x 32


if AVAILABLE:
    # later triton releases renamed the TMA copies (async_load / async_store)
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # ... and made shared_memory_descriptor._reinterpret public (reinterpret)
    _PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    NEG_BIG = gl.constexpr(-1.0e30)  # a finite minus infinity (as in triton_sta)
    CONSUMER_REGS = gl.constexpr(240)  # registers per thread of the second consumer
    PRODUCER_REGS = gl.constexpr(24)  # the producer warp issues TMA copies only
    # per consumer thread with three consumers: 3 x 160 + 24 <= 512 (64K / 128 threads)
    CONSUMER_REGS_3 = gl.constexpr(160)
    # a barrier of the calling partition's threads (later triton releases: gl.barrier)
    sync_threads = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def axis_start(qi, n, w):
        """First key tile of the window of ``w`` tiles around query tile ``qi`` (of ``n``)."""
        return gl.minimum(gl.maximum(qi - w // 2, 0), n - w)

    @gluon.jit
    def head_window(WIN, h, NT, NH, NW):
        """Head ``h``'s window (t, h, w) in tiles from the (H, 3) table, clamped to [1, n]."""
        wt = gl.minimum(gl.maximum(gl.load(WIN + h * 3 + 0), 1), NT)
        wh = gl.minimum(gl.maximum(gl.load(WIN + h * 3 + 1), 1), NH)
        ww = gl.minimum(gl.maximum(gl.load(WIN + h * 3 + 2), 1), NW)
        return wt, wh, ww

    @gluon.jit
    def frame_block(pid, NH, NW, TT: gl.constexpr, TH: gl.constexpr, TW: gl.constexpr,
                    FRAMES: gl.constexpr):
        """Program ``pid``'s block of ``FRAMES`` frames (TT // FRAMES per tile, tiles in
        raster order): its tile's (t, h, w) tile indices and its first token's (t, h, w)."""
        SUBS: gl.constexpr = TT // FRAMES
        tile = pid // SUBS
        tile_t = tile // (NH * NW)
        tile_h = (tile // NW) % NH
        tile_w = tile % NW
        return (tile_t, tile_h, tile_w,
                tile_t * TT + (pid % SUBS) * FRAMES, tile_h * TH, tile_w * TW)

    @gluon.jit
    def window_loop(pid, b, h, WIN, TEXT_LEN, NT, NH, NW, TT: gl.constexpr,
                    TH: gl.constexpr, TW: gl.constexpr, K_SUBS: gl.constexpr,
                    N: gl.constexpr, TEXT: gl.constexpr, FRAMES: gl.constexpr):
        """Program ``pid``'s query block (``FRAMES`` frames) and key loop for head ``h`` of
        batch element ``b``: the block's first token (t0, h0, w0), the window's first key
        tile (ft, fh, fw) and extent in h and w (wh, ww), the video key blocks
        (video_trips), the valid text tokens, and all key blocks of ``N`` keys (trips: the
        video ones, then the text)."""
        tile_t, tile_h, tile_w, t0, h0, w0 = frame_block(pid, NH, NW, TT, TH, TW, FRAMES)
        wt, wh, ww = head_window(WIN, h, NT, NH, NW)
        ft = axis_start(tile_t, NT, wt)
        fh = axis_start(tile_h, NH, wh)
        fw = axis_start(tile_w, NW, ww)
        video_trips = wt * wh * ww * K_SUBS
        text_len = 0
        if TEXT:
            text_len = gl.load(TEXT_LEN + b)
        trips = video_trips + (text_len + N - 1) // N
        return t0, h0, w0, ft, fh, fw, wh, ww, video_trips, text_len, trips

    @gluon.jit
    def as_box(buf, desc):
        """The shared buffer ``buf`` viewed as one box of ``desc`` (same bytes and swizzle)."""
        if _PUBLIC_REINTERPRET:
            view = buf.reinterpret(buf.dtype, desc.block_type.shape, desc.layout)
        else:
            view = buf._reinterpret(buf.dtype, desc.block_type.shape, desc.layout)
        return view

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
                      V_STAGES: gl.constexpr):
        """A forward's mbarriers, initialised: q's, and per stage of the k/v ring a ready
        barrier (the producer's TMA) and an empty one (released by all ``CONSUMERS``) for k
        and for v. Returns (q_bar, k_ready, k_empty, v_ready, v_empty)."""
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=CONSUMERS)
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        return q_bar, k_ready, k_empty, v_ready, v_empty


def scope_error(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
                head_dims: Sequence[int]) -> str | None:
    """Why a Gluon kernel cannot run the video blocks of this call (None when it can): it
    needs Gluon, a Hopper GPU, bf16 inputs with a head dim in ``head_dims``, and full tiles
    (the tile divides the canvas) of an even number of 64-token (TH, TW) frames."""
    if not q.is_cuda:
        return f"needs a CUDA (Hopper) device, got {q.device}"
    if not AVAILABLE:
        return f"needs triton >= 3.6 (Gluon), this is {triton.__version__}"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return f"needs a Hopper GPU (sm_90), got {torch.cuda.get_device_name(q.device)}"
    if q.dtype != torch.bfloat16 or q.shape[-1] not in head_dims:
        dims = " or ".join(str(d) for d in head_dims)
        return f"needs bf16 inputs with head dim {dims}, got {q.dtype} D={q.shape[-1]}"
    tt, th, tw = (int(t) for t in tile)
    if th * tw != FRAME or tt % 2 or any(
            int(c) % int(t) for c, t in zip(canvas, tile, strict=True)):
        return (f"needs full tiles (the tile divides the canvas) of an even number of "
                f"{FRAME}-token frames, got canvas {tuple(canvas)} tile {tuple(tile)}")
    return None


def in_scope(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
             head_dims: Sequence[int]) -> bool:
    """Whether a Gluon kernel for ``head_dims`` covers this call's video blocks: in scope
    (``scope_error``) with q contiguous."""
    return q.is_contiguous() and scope_error(q, canvas, tile, head_dims) is None


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _descriptor(x: torch.Tensor, shape: list[int], strides: list[int], block: list[int]):
    """TMA descriptor of ``x`` viewed as ``shape`` / ``strides``, box ``block``, in the
    default NVMMA shared layout of ``x``'s dtype (bf16 tensors, the fp32 dq buffer)."""
    layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, _GL_DTYPES[x.dtype]))
    return TensorDescriptor(x, shape, strides, block, layout)


def frames_descriptor(x: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
                      frames: int, cols: int | None = None):
    """TMA descriptor of ``x``'s video tokens (B, S, H, D) as (B, CT, CH, CW, H * D), box
    ``frames`` whole (TH, TW) frames of ``cols`` columns (default: one head's D)."""
    batch, _, heads, head_dim = x.shape
    ct, ch, cw = (int(c) for c in canvas)
    row = x.stride(1)
    return _descriptor(x, [batch, ct, ch, cw, heads * head_dim],
                       [x.stride(0), ch * cw * row, cw * row, row, 1],
                       [1, frames, int(tile[1]), int(tile[2]), cols or head_dim])


def rows_descriptor(x: torch.Tensor, rows: int, cols: int | None = None):
    """TMA descriptor of ``x`` (B, S, H, D) as (B, S, H * D), box ``rows`` tokens of
    ``cols`` columns (default: one head's D; the text tokens after the video)."""
    batch, seq, heads, head_dim = x.shape
    return _descriptor(x, [batch, seq, heads * head_dim], [x.stride(0), x.stride(1), 1],
                       [1, rows, cols or head_dim])


def video_blocks(canvas: Sequence[int], tile: Sequence[int], frames: int = 2) -> int:
    """Programs per (batch, head) of a kernel with one program per ``frames`` frames of
    every tile (the forward's query blocks, the backward's key blocks of two frames)."""
    n = num_tiles(canvas, tile)
    return n[0] * n[1] * n[2] * (int(tile[0]) // frames)


def tile_constexprs(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]) -> dict:
    """The constexprs every Gluon kernel takes, by name: the tile (TT, TH, TW), q's head dim
    and whether the sequence has text slots after the canvas's video tokens."""
    num_video = int(canvas[0]) * int(canvas[1]) * int(canvas[2])
    return dict(TT=int(tile[0]), TH=int(tile[1]), TW=int(tile[2]), HEAD_DIM=q.shape[-1],
                TEXT=q.shape[1] > num_video)


def default_consumers(tile: Sequence[int]) -> int:
    """A forward's consumer warpgroups (frames per query block) for ``tile``: three where
    the tile's frames divide by three, else two.

    Three consumers load each k/v block for 192 queries instead of 128: a third less L2
    traffic for the same matmuls."""
    return 3 if int(tile[0]) % 3 == 0 else 2


def check_consumers(tile: Sequence[int], consumers: int | None, caller: str) -> int:
    """``consumers`` resolved (None: ``default_consumers``) and checked against the tile;
    a ValueError, prefixed with ``caller``, names what does not fit."""
    if consumers is None:
        return default_consumers(tile)
    if consumers not in (2, 3):
        raise ValueError(f"{caller}: consumers must be 2 or 3 (or None), got {consumers}")
    if consumers == 3 and int(tile[0]) % 3:
        raise ValueError(f"{caller}: 3 consumers take query blocks of 3 frames, which tile "
                         f"{tuple(int(t) for t in tile)} (frames first) does not divide into")
    return consumers
