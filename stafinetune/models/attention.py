"""The attention call of the adapted DiTs and the diffusers processors that route to it.

Three pieces:

- ``STAAttention``: the one small module that computes attention over (B, S, H, D) tensors,
  sparse (Sliding Tile Attention through ``sta_kernels.sliding_tile_attention``) or dense
  (SDPA). Every STA layer of a ``VideoDiT`` calls the same instance, so sequence parallelism
  can wrap it in one place (it then has to slice the per-head ``window`` with the heads).
- ``ForwardState`` / ``AttentionRuntime``: what one forward needs to know (the latent token
  canvas, valid text lengths, the windows of every layer, an optional capture store). The
  hooks that ``stafinetune.models.binding`` puts on the transformer set it around each of
  its forwards; there is no global state.
- ``WanSTAProcessor`` / ``HunyuanSTAProcessor``: diffusers attention processors for the
  video self-attention of Wan (cross-attention keeps diffusers' own processor) and the joint
  video+text attention of HunyuanVideo's dual- and single-stream blocks. They do the
  projections, QK-norm and RoPE exactly as diffusers' processors do and hand q, k, v to the
  runtime's attention module.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sta_kernels import resolve_backend, sliding_tile_attention
from sta_kernels.geometry import normalize_window

from .dispatch import CostTable, Route, choose_route

Canvas = tuple[int, int, int]


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The lowest-precision floating dtype among ``tensors``.

    Under autocast, q and k can leave an RMSNorm in float32 while v stays bf16 (HunyuanVideo);
    the attention then runs in the autocast precision, as SDPA would.
    """
    lowest = tensors[0].dtype
    for t in tensors[1:]:  # a plain loop: torch.compile traces it (min(key=...) breaks the graph)
        if torch.finfo(t.dtype).bits < torch.finfo(lowest).bits:
            lowest = t.dtype
    return lowest


def text_key_mask(
    seq: int, num_video: int, text_len: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(B, S) bool: True for video tokens and the first ``text_len[b]`` text tokens."""
    pos = torch.arange(seq, device=device)
    return pos[None, :] < (num_video + text_len.to(device))[:, None]


class STAAttention(nn.Module):
    """Attention over a video token canvas with optional joint text, sparse or dense.

    A call with windows runs the cheapest exact route (``dispatch.choose_route``): windows that
    cover the whole canvas run the dense path (SDPA), and a layer mixing covering and sparse
    heads may split its heads between both when ``cost_table`` measured that to be faster.

    Args:
        tile: (tt, th, tw) STA tile in latent tokens.
        backend: ``auto`` | ``triton`` | ``flex`` | ``reference``; ``auto`` is resolved per call by
            ``sta_kernels.resolve_backend`` (triton for CUDA bf16/fp16, else flex on CUDA,
            the reference on CPU).
        cost_table: measured per-head costs of SDPA and STA on this device, or None.
        fp8: calls without gradients (sampling) run the FP8 forward
            (``sliding_tile_attention(..., fp8=True)``); calls with gradients stay bf16.
    """

    def __init__(
        self, tile: Sequence[int], backend: str = "auto", cost_table: CostTable | None = None,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        self.tile: Canvas = tuple(int(t) for t in tile)  # type: ignore[assignment]
        self.backend = backend
        self.cost_table = cost_table
        self.fp8 = fp8

    def extra_repr(self) -> str:
        table = "" if self.cost_table is None else f", cost_table={self.cost_table.device!r}"
        fp8 = ", fp8=True" if self.fp8 else ""
        return f"tile={self.tile}, backend={self.backend!r}{table}{fp8}"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        canvas: Canvas,
        text_len: int | torch.Tensor = 0,
        window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend ``q`` over ``k, v``.

        Args:
            q, k, v: (B, S, H, D); S = T*Hc*Wc video tokens (raster t, h, w) then text slots.
            canvas: (T, Hc, Wc) latent token grid of this forward.
            text_len: valid text tokens after the video, an int or a (B,) int tensor.
            window: (H, 3) windows in tiles, or ``None`` for dense attention.
        Returns:
            o: (B, S, H, D) in q's dtype; rows of padding text queries are 0 (both modes).
        """
        if window is None:
            return self._dense(q, k, v, canvas, text_len)
        dtype = common_dtype(q, k, v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        windows = normalize_window(window, q.shape[2])  # (H, 3) int64, validated
        if torch.compiler.is_compiling():
            # the route reads the window values, which a compiled graph does not specialise
            # on: keep the kernel the windows name
            return self._sta(q, k, v, canvas, text_len, windows)
        route = choose_route(
            windows, canvas, self.tile, head_dim=q.shape[-1], table=self.cost_table,
            backward=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)),
        )  # fmt: skip
        if route.kind == "dense":
            return self._dense(q, k, v, canvas, text_len)
        if route.kind == "split":
            return self._split(q, k, v, canvas, text_len, windows, route)
        return self._sta(q, k, v, canvas, text_len, windows)

    def _sta(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        canvas: Canvas,
        text_len: int | torch.Tensor,
        windows: torch.Tensor,
    ) -> torch.Tensor:
        # the route is chosen already: a concrete backend, so the call does not test for a
        # dense window again (``backend="auto"`` would)
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if self.fp8 and not grad:  # the FP8 kernel, or an error naming why it cannot run
            return sliding_tile_attention(
                q, k, v, canvas=canvas, tile=self.tile, window=windows, text_len=text_len,
                backend=self.backend, fp8=True,
            )  # fmt: skip
        return sliding_tile_attention(
            q, k, v, canvas=canvas, tile=self.tile, window=windows, text_len=text_len,
            backend=resolve_backend(q, self.backend),
        )  # fmt: skip

    @staticmethod
    def _dense(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        canvas: Canvas,
        text_len: int | torch.Tensor,
    ) -> torch.Tensor:
        """SDPA over all video keys and the valid text keys; padding query rows are 0."""
        batch, seq, _, _ = q.shape
        num_video = canvas[0] * canvas[1] * canvas[2]
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
        if seq == num_video:
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        lengths = torch.as_tensor(text_len, dtype=torch.int64).expand(batch)  # (B,)
        keep = text_key_mask(seq, num_video, lengths, q.device)  # (B, S)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep[:, None, None, :])
        return o.transpose(1, 2) * keep[:, :, None, None].to(q.dtype)  # (B, S, H, D)

    def _split(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        canvas: Canvas,
        text_len: int | torch.Tensor,
        windows: torch.Tensor,
        route: Route,
    ) -> torch.Tensor:
        """SDPA on the covering heads, STA on the others, outputs back in head order."""
        dense_idx = torch.tensor(route.dense_heads, device=q.device)
        sparse_idx = torch.tensor(route.sparse_heads, device=q.device)
        o_dense = self._dense(
            *(x.index_select(2, dense_idx) for x in (q, k, v)), canvas, text_len
        )  # (B, S, Hd, D)
        sparse_qkv = (x.index_select(2, sparse_idx) for x in (q, k, v))
        sparse_windows = windows[list(route.sparse_heads)]  # (Hs, 3)
        o_sparse = self._sta(*sparse_qkv, canvas, text_len, sparse_windows)  # (B, S, Hs, D)
        order = torch.tensor(route.dense_heads + route.sparse_heads)
        inverse = torch.argsort(order).to(q.device)
        return torch.cat([o_dense, o_sparse], dim=2).index_select(2, inverse)  # (B, S, H, D)


class ActivationStore:
    """What ``VideoDiT.capture()`` collects during the forwards run inside it.

    ``store[i]`` is STA layer ``i``'s attention output, (B, S, H, D) with S = video tokens
    then text slots (HunyuanVideo; text padding rows are 0), before the output projection.
    ``store["final"]`` is the model output (B, C, T, H, W). With ``inputs=True`` the store
    also keeps each layer's ``(q, k, v)`` (B, S, H, D) in ``store.inputs[i]``, and
    ``store.canvas`` / ``store.text_len`` describe the sequence, so a mask search can replay
    candidate windows offline. A later forward inside the same ``capture()`` overwrites the
    entries of an earlier one.
    """

    def __init__(
        self, layers: Iterable[int] | None = None, detach: bool = False, inputs: bool = False
    ) -> None:
        self.wanted = None if layers is None else frozenset(int(i) for i in layers)
        self.detach = detach
        self.keep_inputs = inputs
        self.layers: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.final: torch.Tensor | None = None
        self.canvas: Canvas | None = None
        self.text_len: int | torch.Tensor = 0

    def record(
        self,
        layer: int,
        o: torch.Tensor,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        state: ForwardState,
    ) -> None:
        """Keep layer ``layer``'s attention output ``o`` (B, S, H, D) if it was asked for."""
        if self.wanted is not None and layer not in self.wanted:
            return
        self.layers[layer] = o.detach() if self.detach else o
        if self.keep_inputs:
            self.inputs[layer] = tuple(x.detach() if self.detach else x for x in qkv)  # type: ignore[assignment]
        self.canvas, self.text_len = state.canvas, state.text_len

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if key == "final":
            if self.final is None:
                raise KeyError("final: no forward ran inside this capture()")
            return self.final
        return self.layers[key]  # type: ignore[index]

    def __contains__(self, key: object) -> bool:
        return (key == "final" and self.final is not None) or key in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def keys(self) -> list[int]:
        """The captured layer indices, ascending."""
        return sorted(self.layers)


@dataclasses.dataclass
class ForwardState:
    """Per-forward facts the processors need; built by the transformer's forward pre-hook."""

    attention: nn.Module
    canvas: Canvas
    text_len: int | torch.Tensor  # int 0 (Wan) or (B,) int64 CPU tensor (HunyuanVideo)
    windows: torch.Tensor | None  # (L, H, 3) int64, or None: every layer dense
    store: ActivationStore | None = None

    def window_for(self, index: torch.Tensor) -> torch.Tensor | None:
        """(H, 3) windows of the STA layer ``index`` (a (1,) int64 tensor), or ``None`` for dense.

        The layer comes as a tensor so that ``torch.compile`` takes it as a graph input: an int
        would be a constant of the traced code, and every block would compile its own graph.
        """
        if self.windows is None:
            return None
        return self.windows.index_select(0, index).squeeze(0)  # (H, 3)

    def without_store(self) -> ForwardState:
        """The same forward with capturing off (checkpoint recomputation must not re-record)."""
        return dataclasses.replace(self, store=None)


class AttentionRuntime:
    """Holds the ``ForwardState`` of the forward in flight for one transformer's processors.

    The transformer's forward hooks (``stafinetune.models.binding``) push a state before the
    forward and pop it after; gradient checkpointing re-installs it with :meth:`use` while a
    block is recomputed in backward.
    """

    def __init__(self) -> None:
        self._stack: list[ForwardState | None] = []

    @property
    def state(self) -> ForwardState | None:
        """The current forward's state, or ``None`` outside a forward."""
        return self._stack[-1] if self._stack else None

    def push(self, state: ForwardState | None) -> None:
        """Make ``state`` current until the matching :meth:`pop`."""
        self._stack.append(state)

    def pop(self) -> ForwardState | None:
        """Make the previous state current again; returns the one that was current."""
        return self._stack.pop() if self._stack else None

    @contextlib.contextmanager
    def use(self, state: ForwardState) -> Iterator[ForwardState]:
        """Make ``state`` current for the duration of the block (re-entrant)."""
        self.push(state)
        try:
            yield state
        finally:
            self.pop()

    def attend(
        self, processor: RuntimeProcessor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Run ``processor``'s STA layer on (B, S, H, D) q, k, v and record it if capturing."""
        state = self.state
        if state is None:
            raise RuntimeError(
                "an STA attention processor ran outside its transformer's forward, so the "
                "token canvas of the forward is unknown: a block called on its own, or "
                "recomputed in backward by a checkpoint wrapper put around the block itself; "
                "checkpoint with the transformer's enable_gradient_checkpointing() instead"
            )
        o = state.attention(
            q, k, v, canvas=state.canvas, text_len=state.text_len,
            window=state.window_for(processor.index),
        )  # fmt: skip
        if state.store is not None:  # keyed by the int layer: compiled, each block traces alone
            state.store.record(processor.layer, o, (q, k, v), state)
        return o


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved (even, odd) channel pairs (Wan and HunyuanVideo).

    Args:
        x: (B, S, H, D).
        cos, sin: (1, S, 1, D) with each frequency repeated on its channel pair.
    """
    pairs = x.unflatten(-1, (-1, 2))  # (B, S, H, D/2, 2)
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]  # (1, S, 1, D/2)
    rotated = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1)
    return rotated.flatten(-2).type_as(x)


class RuntimeProcessor:
    """Base of the STA processors: STA layer ``layer`` attending through ``runtime``.

    ``index`` is the layer as a (1,) int64 tensor, which selects the layer's windows: a
    compiled block (``compile_repeated_blocks``) takes it as an input, so one graph serves
    every block, as for diffusers' own processors. The int ``layer`` keys captured outputs.
    """

    def __init__(self, runtime: AttentionRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer
        self.index = torch.tensor([layer], dtype=torch.int64)


class WanSTAProcessor(RuntimeProcessor):
    """Processor for Wan's video self-attention (``blocks[i].attn1``) routed to the runtime."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSTAProcessor handles unmasked video self-attention only")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))  # (B, S, H, D)
        if rotary_emb is not None:
            q = apply_interleaved_rope(q, *rotary_emb)
            k = apply_interleaved_rope(k, *rotary_emb)
        o = self.runtime.attend(self, q, k, v)  # (B, S, H, D)
        o = o.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](o))


class HunyuanSTAProcessor(RuntimeProcessor):
    """Processor for HunyuanVideo's joint attention (dual- and single-stream blocks).

    Video tokens come first, then the text slots; RoPE applies to video only. The diffusers
    key-padding ``attention_mask`` is superseded by the runtime's valid text lengths.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is None:
            raise ValueError("HunyuanSTAProcessor needs the text stream (encoder_hidden_states)")
        num_text = encoder_hidden_states.shape[1]
        dual = attn.add_q_proj is not None
        x = hidden_states if dual else torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = (
            proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            cos, sin = (f[None, :, None, :] for f in image_rotary_emb)  # (1, Sv, 1, D)
            if dual:
                q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
            else:  # RoPE on the video part only
                q = torch.cat(
                    [apply_interleaved_rope(q[:, :-num_text], cos, sin), q[:, -num_text:]], dim=1
                )
                k = torch.cat(
                    [apply_interleaved_rope(k[:, :-num_text], cos, sin), k[:, -num_text:]], dim=1
                )
        if dual:
            eq, ek, ev = (
                proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = (
                torch.cat([q, eq], dim=1),
                torch.cat([k, ek], dim=1),
                torch.cat([v, ev], dim=1),
            )
        o = self.runtime.attend(self, q, k, v)  # (B, Sv + L, H, D)
        o = o.flatten(2, 3).to(q.dtype)
        video, text = o[:, :-num_text], o[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text
