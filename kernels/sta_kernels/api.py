"""The public entry point: argument validation and backend dispatch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .geometry import as_triple, covering_heads, normalize_window
from .reference import sta_reference_op, text_lengths
from .support import TRITON_DTYPES, TRITON_HEAD_DIMS

BACKENDS = ("auto", "triton", "flex", "reference")


def resolve_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend ``sliding_tile_attention`` runs for ``q`` (``auto`` resolved).

    ``auto``: triton for CUDA bf16/fp16 inputs with a supported head dim, flex for other
    CUDA float16/32 inputs, the dense reference for everything else (CPU, float64).
    """
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "reference"
    if q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS:
        return "triton"
    return "flex" if q.dtype in (*TRITON_DTYPES, torch.float32) else "reference"


def runs_dense(
    windows: torch.Tensor, canvas: Sequence[int], tile: Sequence[int],
    lengths: torch.Tensor, num_text: int,
) -> bool:
    """Whether a call is plain dense attention: every head's (H, 3) window covers the tile
    grid and no text slot is padding (``lengths`` (B,) all ``num_text``).

    ``backend="auto"`` runs such a call on CUDA as SDPA (cuDNN / flash), which is faster
    there than any sparse kernel (benchmarks/results/attention.md, full windows).
    """
    return bool(covering_heads(windows, canvas, tile).all()) and bool((lengths == num_text).all())


def forward_ops() -> tuple[torch._ops.OpOverload, ...]:
    """The registered forward ops of the backends: ``sta_kernels::sta_reference`` and, where
    triton imports, ``sta_kernels::sta_fwd`` (it returns the output and the log-sum-exp).

    A selective activation-checkpointing policy that saves these ops' outputs keeps the
    attention result of a checkpointed block, so its recomputation skips the kernel. The
    flex backend is a higher-order op and is recomputed.
    """
    reference = torch.ops.sta_kernels.sta_reference.default
    try:
        from . import ops  # noqa: F401  (registers sta_kernels::sta_fwd)
    except ImportError:
        return (reference,)
    return (reference, torch.ops.sta_kernels.sta_fwd.default)


def sliding_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    canvas: Sequence[int],
    tile: Sequence[int],
    window: Sequence[int] | torch.Tensor,
    text_len: int | torch.Tensor = 0,
    scale: float | None = None,
    backend: str = "auto",
    fp8: bool = False,
) -> torch.Tensor:
    """Sliding Tile Attention over a 3D video token grid with optional joint text.

    Args:
        q, k, v: (B, S, H, D). S = T*Hc*Wc video tokens in raster (t, h, w) order, then
            text slots (valid text tokens first, padding after).
        canvas: (T, Hc, Wc) latent token grid; any size (edge tiles may be partial).
        tile: (tt, th, tw) tile shape in tokens, e.g. (6, 8, 8).
        window: (wt, wh, ww) in tiles for all heads, or an (H, 3) int tensor per head.
            A window wider than an axis covers the whole axis.
        text_len: valid text tokens, an int or a (B,) tensor; 0 for video-only models.
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (see ``resolve_backend``: triton on CUDA for bf16/fp16, reference
            off CUDA; on CUDA a call that is dense attention, see ``runs_dense``, runs
            SDPA), "triton", "flex" or "reference".
        fp8: run the video queries' attention in float8 e4m3 (``kernels.gluon_fp8``: q
            scaled per token, k shifted by its mean and scaled per 128-key block, v per
            block by a power of two, both matmuls in FP8 with fp32 accumulation). For
            sampling: no backward, and it needs the triton backend on a Hopper GPU with
            bf16 inputs, D = 128 and tiles of 64-token frames that divide the canvas (text
            queries run in bf16). Its output differs from the bf16 kernel's by about 5e-2
            (relative norm).
    Returns:
        o: (B, S, H, D) in q's dtype; rows of padding text queries are 0.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (B, S, H, D) shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    canvas = as_triple(canvas, "canvas")
    tile = as_triple(tile, "tile")
    batch, seq, heads, head_dim = q.shape
    num_video = canvas[0] * canvas[1] * canvas[2]
    if seq < num_video:
        raise ValueError(
            f"S={seq} is smaller than the canvas {canvas} holds ({num_video} video tokens)"
        )
    windows = normalize_window(window, heads)  # (H, 3) int64, CPU
    lengths = text_lengths(text_len, batch, seq - num_video)  # (B,) int64, CPU
    if seq > num_video and isinstance(text_len, int) and text_len == 0:
        raise ValueError(
            f"S={seq} holds {seq - num_video} tokens past the canvas {canvas} but text_len=0; "
            "pass text_len for joint attention"
        )
    scale = head_dim**-0.5 if scale is None else float(scale)
    if fp8:
        return _fp8_attention(q, k, v, canvas, tile, windows, lengths, scale, backend)
    dense = (
        backend == "auto" and q.is_cuda and not torch.compiler.is_compiling()
        and runs_dense(windows, canvas, tile, lengths, seq - num_video)
    )  # fmt: skip
    if dense:  # (the window values are not specialised on under torch.compile: kernel there)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    backend = resolve_backend(q, backend)
    if backend == "reference":
        return sta_reference_op(q, k, v, canvas, tile, windows, lengths, scale)
    if backend == "flex":
        from .flex import sta_flex

        return sta_flex(q, k, v, canvas, tile, windows, lengths, scale)
    from .ops import sta_triton

    return sta_triton(q, k, v, canvas, tile, windows, lengths, scale)


def _fp8_attention(q, k, v, canvas, tile, windows, lengths, scale, backend) -> torch.Tensor:
    """``sliding_tile_attention(..., fp8=True)`` after its common checks."""
    if backend not in ("auto", "triton"):
        raise ValueError(f"fp8=True runs the triton backend; backend={backend!r} cannot")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("fp8=True has no backward: call it under torch.no_grad() or "
                         "torch.inference_mode() (sampling), or train with fp8=False")
    from .ops import fp8_unsupported, sta_triton

    reason = fp8_unsupported(q, canvas, tile)
    if reason:
        raise ValueError(f"fp8=True: the FP8 kernel {reason}")
    return sta_triton(q, k, v, canvas, tile, windows, lengths, scale, fp8=True)
