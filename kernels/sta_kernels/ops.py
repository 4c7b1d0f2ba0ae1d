"""The triton backend's host side: launch configuration, the routing of a call between the
Triton kernels and the Gluon (Hopper) kernels, and the ``torch.library`` ops.

A forward runs the warp-specialised Gluon kernel (``kernels.gluon_fwd``, or
``kernels.gluon_fp8`` with ``fp8``) for the video queries of calls in its scope and the
Triton forward (``kernels.triton_sta``) for the text queries and every other call. A
backward runs one of two schedules:

- fused (the default at full tiles): a delta = rowsum(o * do) pass, then one dk/dv kernel
  that also adds dq into an fp32 buffer with atomics (the Gluon backward for the video key
  blocks where it applies, the Triton kernel for the rest), then a scale-and-cast of dq;
- two kernels (at partial tiles, and under ``torch.use_deterministic_algorithms(True)``,
  since the atomics make dq's rounding depend on their order): a dq kernel that also writes
  delta, then the dk/dv kernel.

The ops ``sta_kernels::sta_fwd`` (o and the log2-domain log-sum-exp), ``sta_kernels::sta_bwd``
and ``sta_kernels::sta_fwd_fp8`` have fake implementations, so ``torch.compile`` traces
through them, and the backward is registered on the forward op itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .kernels import gluon_bwd, gluon_fp8, gluon_fwd, triton_sta
from .kernels.gluon_common import scope_error
from .kernels.triton_sta import LaunchGeometry, is_interpreter
from .support import TRITON_DTYPES, TRITON_HEAD_DIMS


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch parameters of the kernels."""

    # Tuned at HunyuanVideo 720p, tile 6x8x8, D=128; 128-token blocks divide 384-token
    # tiles exactly.
    fwd_block_m: int = 128
    fwd_block_n: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    bwd_block_m: int = 64  # query block of the dk/dv kernel
    bwd_block_n: int = 128  # key block of the dk/dv kernel
    bwd_warps: int = 8
    bwd_stages: int = 3
    dq_block_m: int = 128
    dq_block_n: int = 128
    dq_warps: int = 8
    dq_stages: int = 2
    # dk/dv kernel: issue the second score matmul (dO V^T) before the exp2 of the first
    bwd_early_dp: bool = True
    # TMA (tensor-descriptor) loads of k/v in the inner loops of the forward and dq kernels
    # where a block is whole tile frames
    fwd_tma: bool = True
    dq_tma: bool = True
    # dq inside the dk/dv kernel (fp32 atomics into a (B, S, H, D) buffer) instead of a
    # second kernel that recomputes both score matmuls. The atomics make dq's rounding
    # depend on their order: under torch.use_deterministic_algorithms(True) the two-kernel
    # schedule runs instead (see default_config).
    fused_dq: bool = True
    fused_dq_tma: bool = True  # fused_dq: TMA reduce-add of dq for blocks of whole frames
    # blocks of whole frames keep their hoisted addressing and TMA at partial tiles, with
    # validity from the block's coordinates (else: per-token index math, pointer gathers)
    frames_partial: bool = True
    # the warp-specialised Gluon forward (gluon_fwd) for the video queries, where it
    # applies (gluon_fwd.supports: Hopper, bf16, full tiles); the text queries and every
    # other call run the Triton forward
    fwd_gluon: bool = True
    # buffers of its k ring (2 or 3; None: 3 with three consumers, 2 with two;
    # gluon_fwd.ring_stages)
    fwd_gluon_stages: int | None = None
    # consumer warpgroups (64-query frames per program) of the Gluon forward: 2, 3 (tiles
    # whose frames divide by 3), or None: 3 where they fit (the same bits)
    fwd_gluon_consumers: int | None = None
    # the warp-specialised Gluon backward (gluon_bwd) for the video key blocks of the fused
    # schedule, where it applies (gluon_bwd.supports: the forward's scope with D = 128);
    # the text key blocks run the Triton dk/dv kernel
    bwd_gluon: bool = True
    bwd_gluon_stages: int = 2
    fwd_fp8_stages: int = 3  # the FP8 forward (gluon_fp8), where a call asks for it
    # its consumer warpgroups: 2, 3 (tiles whose frames divide by 3), or None: 3 where
    # they fit (outputs within fp32 rounding of each other)
    fwd_fp8_consumers: int | None = None


# Small blocks keep the interpreter (CPU) fast; tl.dot needs every dimension >= 16.
INTERPRETER_CONFIG = KernelConfig(16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1)

# At partial tiles (a canvas the tile does not divide) the two-kernel backward with a
# 2-stage dk/dv pipeline is faster than the fused dq; with full tiles the fused dq wins.
PARTIAL_TILES = dict(fused_dq=False, bwd_stages=2)


def default_config(device: torch.device, partial: bool = False) -> KernelConfig:
    """The launch configuration for ``device`` (small blocks under the interpreter) and a
    canvas with (``partial``) or without partial tiles.

    With ``torch.use_deterministic_algorithms(True)`` the backward uses its deterministic
    two-kernel schedule (no atomics), bitwise reproducible from run to run.
    """
    config = INTERPRETER_CONFIG if device.type != "cuda" else KernelConfig()
    if partial and device.type == "cuda":
        config = replace(config, **PARTIAL_TILES)
    if torch.are_deterministic_algorithms_enabled():
        config = replace(config, fused_dq=False)
    return config


def check_inputs(q: torch.Tensor) -> None:
    """Raise ``ValueError`` for inputs the triton kernels do not support."""
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"triton backend supports q/k/v dtypes {TRITON_DTYPES}, got {q.dtype}; "
            "use backend='reference' for float32/float64"
        )
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"triton backend supports head dims {TRITON_HEAD_DIMS}, got D={q.shape[-1]}"
        )
    if not q.is_cuda and not is_interpreter():
        raise ValueError(
            "triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before the "
            f"backend is first used), got device {q.device}"
        )


def fp8_unsupported(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]
                    ) -> str | None:
    """Why the FP8 forward cannot run this call (None when it can): it needs a Hopper GPU,
    triton >= 3.6, bf16 inputs with D = 128, and full tiles (the tile divides the canvas)
    of an even number of 64-token (TH, TW) frames."""
    if is_interpreter():
        return f"needs a CUDA (Hopper) device, got {q.device}"
    return scope_error(q, canvas, tile, (128,))


_RESOURCES: dict[str, dict[str, int]] = {}


def _record(name: str, compiled) -> None:
    """Keep the compiler's resource report of the last launch of kernel ``name`` (None:
    the kernel had no block to run)."""
    if compiled is None:
        return
    report = {}
    for key in ("n_regs", "n_spills"):
        if hasattr(compiled, key):
            report[key] = int(getattr(compiled, key))
    shared = getattr(getattr(compiled, "metadata", None), "shared", None)
    if shared is not None:
        report["shared"] = int(shared)
    _RESOURCES[name] = report


def kernel_resources() -> dict[str, dict[str, int]]:
    """Registers, spills and shared memory of the last launch of each kernel (GPU only)."""
    return {name: dict(report) for name, report in _RESOURCES.items()}


def _gluon_applies(supports, q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
                   *others: torch.Tensor) -> bool:
    """Whether a Gluon kernel (``supports``: its module's scope check) can run this call's
    video blocks: a GPU run, the call in its scope, ``others`` contiguous."""
    return (not is_interpreter() and supports(q, canvas, tile)
            and all(x.is_contiguous() for x in others))


def sta_triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor,
    text_len: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    scale: float,
    config: KernelConfig | None = None,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward: the Gluon kernel for the video queries where it applies, the Triton
    kernel for the rest.

    Args:
        q, k, v: (B, S, H, D) contiguous, bf16/fp16, on the kernel device.
        windows: (H, 3) int32 on the kernel device; text_len: (B,) int32 on the kernel device.
        config: the launch configuration (None: ``default_config``).
        fp8: the video queries through the FP8 kernel (``gluon_fp8``; the call must be in
            its scope, see ``fp8_unsupported``); their lse rows are then not written (NaN).
    Returns:
        o: (B, S, H, D); lse: (B, H, S) float32 log2-domain log-sum-exp (0 at padding).
    """
    batch, seq, heads, _ = q.shape
    geo = LaunchGeometry(seq, canvas, tile)
    cfg = config or default_config(q.device, geo.partial)
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, device=q.device, dtype=torch.float32)
    first = 0  # first program: past the video query blocks when a Gluon kernel ran them
    if fp8:
        reason = fp8_unsupported(q, canvas, tile)
        if reason or not _gluon_applies(gluon_fp8.supports, q, canvas, tile, k, v):
            raise ValueError(f"fp8 forward: {reason or 'needs contiguous q, k, v'}")
        ops = gluon_fp8.quantize_kv(k, v, canvas, tile)
        _record("fwd_fp8", gluon_fp8.sta_gluon_fp8_video_forward(
            q, ops, o, windows, text_len, canvas, tile, scale, stages=cfg.fwd_fp8_stages,
            consumers=cfg.fwd_fp8_consumers))
        lse[:, :, : geo.num_video] = float("nan")
        first = geo.num_tiles * geo.subs(cfg.fwd_block_m)
    elif cfg.fwd_gluon and _gluon_applies(gluon_fwd.supports, q, canvas, tile, k, v):
        _record("fwd_gluon", gluon_fwd.sta_gluon_video_forward(
            q, k, v, o, lse, windows, text_len, canvas, tile, scale,
            stages=cfg.fwd_gluon_stages, consumers=cfg.fwd_gluon_consumers))
        first = geo.num_tiles * geo.subs(cfg.fwd_block_m)
    _record("fwd", triton_sta.launch_forward(
        q, k, v, o, lse, windows, text_len, geo, scale, block_m=cfg.fwd_block_m,
        block_n=cfg.fwd_block_n, warps=cfg.fwd_warps, stages=cfg.fwd_stages,
        tma=cfg.fwd_tma, frames_partial=cfg.frames_partial, first=first))
    return o, lse


def sta_triton_backward(
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
    config: KernelConfig | None = None,
    kernels: Sequence[str] = ("dq", "dkdv"),
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward; all tensors (B, S, H, D) as in the forward, lse (B, H, S).

    Two schedules (see the module docstring): with ``config.fused_dq`` a delta pass, one
    dk/dv kernel that also adds dq, and the cast of dq; else a dq kernel (which also writes
    delta = rowsum(o * do)) then a dk/dv kernel. ``kernels`` and ``delta`` exist for
    benchmarking one part alone: "dq" is the dq kernel (or the delta pass when fused),
    "dkdv" the dk/dv kernel, which reads ``delta`` (B, H, S).

    Returns:
        dq, dk, dv: (B, S, H, D) in q's dtype.
    """
    batch, seq, heads, _ = q.shape
    geo = LaunchGeometry(seq, canvas, tile)
    cfg = config or default_config(q.device, geo.partial)
    do = do.contiguous()
    if delta is None:
        delta = torch.empty(batch, heads, seq, device=q.device, dtype=torch.float32)  # (B, H, S)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq = torch.empty_like(q)
    dkdv = dict(block_m=cfg.bwd_block_m, block_n=cfg.bwd_block_n, warps=cfg.bwd_warps,
                stages=cfg.bwd_stages, early_dp=cfg.bwd_early_dp,
                frames_partial=cfg.frames_partial)
    if cfg.fused_dq:
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # (B, S, H, D)
        use_gluon = (cfg.bwd_gluon and "dkdv" in kernels
                     and _gluon_applies(gluon_bwd.supports, q, canvas, tile, k, v, o, do, lse))
        if "dq" in kernels and not use_gluon:  # (the Gluon backward writes delta itself)
            triton_sta.launch_delta(o, do, delta, geo)
        if "dkdv" in kernels:
            if use_gluon:
                _record("bwd_gluon", gluon_bwd.sta_gluon_backward(
                    do, q, k, v, o, lse, windows, text_len, canvas, tile, scale, delta,
                    dq_acc, dk, dv, stages=cfg.bwd_gluon_stages))
            _record("dkdv", triton_sta.launch_dkdv(
                q, k, v, do, lse, delta, dk, dv, windows, text_len, geo, scale, **dkdv,
                dq_acc=dq_acc, dq_tma=cfg.fused_dq_tma, text_only=use_gluon))
        triton_sta.launch_scale_cast(dq_acc, dq, scale)
        return dq, dk, dv
    # dq first: it also writes delta = rowsum(o * do), which the dk/dv kernel reads
    if "dq" in kernels:
        _record("dq", triton_sta.launch_dq(
            q, k, v, o, do, lse, delta, dq, windows, text_len, geo, scale,
            block_m=cfg.dq_block_m, block_n=cfg.dq_block_n, warps=cfg.dq_warps,
            stages=cfg.dq_stages, tma=cfg.dq_tma, frames_partial=cfg.frames_partial))
    if "dkdv" in kernels:
        _record("dkdv", triton_sta.launch_dkdv(
            q, k, v, do, lse, delta, dk, dv, windows, text_len, geo, scale, **dkdv))
    return dq, dk, dv


# torch.library registration: opaque ops with fake (meta) implementations, so that
# torch.compile traces through the kernels instead of into them.


@torch.library.custom_op("sta_kernels::sta_fwd", mutates_args=())
def _sta_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor,
    text_len: torch.Tensor,
    canvas: list[int],
    tile: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sta_triton_forward(q, k, v, windows, text_len, canvas, tile, scale)


@_sta_fwd_op.register_fake
def _sta_fwd_fake(q, k, v, windows, text_len, canvas, tile, scale):
    batch, seq, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seq), dtype=torch.float32)


@torch.library.custom_op("sta_kernels::sta_fwd_fp8", mutates_args=())
def _sta_fwd_fp8_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor,
    text_len: torch.Tensor,
    canvas: list[int],
    tile: list[int],
    scale: float,
) -> torch.Tensor:
    return sta_triton_forward(q, k, v, windows, text_len, canvas, tile, scale, fp8=True)[0]


@_sta_fwd_fp8_op.register_fake
def _sta_fwd_fp8_fake(q, k, v, windows, text_len, canvas, tile, scale):
    return torch.empty_like(q)


@torch.library.custom_op("sta_kernels::sta_bwd", mutates_args=())
def _sta_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    windows: torch.Tensor,
    text_len: torch.Tensor,
    canvas: list[int],
    tile: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sta_triton_backward(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale)


@_sta_bwd_op.register_fake
def _sta_bwd_fake(do, q, k, v, o, lse, windows, text_len, canvas, tile, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sta_setup(ctx, inputs, output) -> None:
    q, k, v, windows, text_len, canvas, tile, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, windows, text_len)
    ctx.geometry = (canvas, tile, scale)


def _sta_backward(ctx, do, dlse):
    """Gradients in q, k, v; the log-sum-exp is an auxiliary output (``dlse`` is ignored)."""
    q, k, v, o, lse, windows, text_len = ctx.saved_tensors
    canvas, tile, scale = ctx.geometry
    dq, dk, dv = torch.ops.sta_kernels.sta_bwd(
        do.contiguous(), q, k, v, o, lse, windows, text_len, canvas, tile, scale
    )
    return dq, dk, dv, None, None, None, None, None


# Autograd registered on the op itself, not a Python autograd.Function around it: inside a
# compiled, selectively checkpointed block dynamo then sees one op whose outputs (o, lse) the
# policy keeps. With the wrapper, dynamo built a graph with a dangling output ("Argument
# 'getitem_..' of Node 'output' does not belong to this Graph"; tests/kernels/
# test_kernels_compiled_block.py).
_sta_fwd_op.register_autograd(_sta_backward, setup_context=_sta_setup)


_DEVICE_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_DEVICE_TABLES = 256


def device_table(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (a small CPU int tensor: windows, text lengths) as int32 on ``device``, cached.

    Every attention call of every layer needs these tables on the GPU; a fresh copy from
    pageable host memory each time makes the host wait on the device. Cached by value, the
    (synchronous, so safe on any stream) copy happens once per distinct table. Under
    torch.compile the plain ``.to`` is traced instead.
    """
    if torch.compiler.is_compiling():
        return x.to(device=device, dtype=torch.int32)
    key = (str(device), tuple(x.shape), tuple(x.flatten().tolist()))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        if len(_DEVICE_TABLES) >= _MAX_DEVICE_TABLES:
            _DEVICE_TABLES.clear()
        table = x.detach().to(device=device, dtype=torch.int32).contiguous()
        _DEVICE_TABLES[key] = table
    return table


def sta_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: torch.Tensor,
    text_len: torch.Tensor,
    scale: float,
    fp8: bool = False,
) -> torch.Tensor:
    """STA through the triton backend's ops; differentiable in q, k, v (unless ``fp8``).

    Args:
        q, k, v: (B, S, H, D) bf16/fp16 (CUDA, or CPU under TRITON_INTERPRET=1).
        canvas, tile: latent grid and tile shape in tokens.
        window: (H, 3) int64 CPU windows in tiles; text_len: (B,) int64 CPU valid text tokens.
        scale: softmax scale.
        fp8: the video queries through the FP8 forward (no backward; see
            ``fp8_unsupported`` for its scope).
    Returns:
        o: (B, S, H, D), zero at text padding queries.
    """
    check_inputs(q)
    q, k, v = (x.contiguous() for x in (q, k, v))
    windows = device_table(window, q.device)  # (H, 3) int32
    lengths = device_table(text_len, q.device)  # (B,) int32
    args = (q, k, v, windows, lengths, [int(c) for c in canvas], [int(t) for t in tile],
            float(scale))
    if fp8:
        return torch.ops.sta_kernels.sta_fwd_fp8(*args)
    o, _ = torch.ops.sta_kernels.sta_fwd(*args)
    return o
