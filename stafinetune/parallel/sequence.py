"""Ulysses sequence parallelism around the one STA call of a ``VideoDiT``.

With ``parallel.sp = P`` the P ranks of an sp group hold one sample each and split its video
tokens: after the patch embedding every rank keeps a contiguous shard of ``ceil(S / P)``
tokens of the raster (t, h, w) sequence (the last shard padded with zeros), with the matching
shard of the RoPE tables and of a per-token timestep (Wan 2.2 TI2V: every block's modulation
and the output norm then take this rank's tokens'); the output projection's result is
gathered back into the whole sequence. Around each attention call an all-to-all turns
(sequence shard, all heads) into (whole sequence, H / P heads), so the STA kernel sees whole
raster-ordered canvases for its heads, with the per-head window table sliced to them; a
second all-to-all turns the output back. HunyuanVideo's joint text tokens are never split:
every rank keeps them, takes its heads locally and gathers the text output over heads.

Where the sequence is split and gathered (module hooks, diffusers untouched)::

    Wan:          rope -> outputs split     blocks[0] -> input split
                  proj_out -> output gathered
                  transformer -> a (B, S) per-token timestep input split (TI2V)
    HunyuanVideo: rope -> outputs split     transformer_blocks[0] -> video input split
                  proj_out -> output gathered

Gradients. Every backward collective sums (the all-to-alls are each other's inverse; the
gathers reduce-scatter), and every loss is the same full value on each rank of the group:
the final output is gathered, attention-output losses add their local parts with
:meth:`SequenceParallel.mean_squared_error`. Each rank's gradient is then P times its share,
so the mean over the ranks that the data-parallel wrapper or sharding takes (all of them)
is the gradient of one unsharded process.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stafinetune.models import VideoDiT

# --------------------------------------------------------------------- collectives with autograd
# torch 2.13 deprecates all_gather_into_tensor / reduce_scatter_tensor (a FutureWarning on
# every call) for these same-signature names; older torch has only the former
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 of equal chunks; its backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # the collective reads and writes flat storage
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _AllGather(torch.autograd.Function):
    """all-gather along dim 0; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        _reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; backward sums the gradients (every rank's copy of the sum is used)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def gather_along(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order); differentiable."""
    moved = x.movedim(dim, 0)
    return _AllGather.apply(moved, group).movedim(0, dim)


# --------------------------------------------------------------------- the layout of one forward
class SequenceParallel:
    """The sequence split of one sp group, shared by the hooks and the attention wrapper.

    Args:
        group: the sp process group (ranks in order of their shard).
        size: its size P.
        rank: this rank's position in it.
    """

    def __init__(self, group: dist.ProcessGroup, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def shard_len(self, seq: int) -> int:
        """Tokens per rank for a sequence of ``seq`` video tokens (the last shard is padded)."""
        return math.ceil(seq / self.size)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's shard of ``x`` along ``dim``, zero-padded to ``shard_len`` tokens."""
        seq = x.shape[dim]
        local = self.shard_len(seq)
        pad = local * self.size - seq
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.rank * local, local)

    def gather(self, x: torch.Tensor, dim: int, seq: int) -> torch.Tensor:
        """The whole sequence of ``seq`` tokens from every rank's shard along ``dim``."""
        return gather_along(x, dim, self.group).narrow(dim, 0, seq)

    def heads(self, num_heads: int) -> slice:
        """This rank's heads."""
        per = num_heads // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def seq_to_heads(self, x: torch.Tensor, seq: int) -> torch.Tensor:
        """(B, S_loc, H, D) sequence shard, all heads -> (B, seq, H/P, D) whole sequence."""
        b, s_loc, h, d = x.shape
        p = self.size
        x = x.reshape(b, s_loc, p, h // p, d).permute(2, 0, 1, 3, 4)  # (P, B, S_loc, H/P, D)
        x = _AllToAll.apply(x, self.group)  # [p] = rank p's sequence shard
        x = x.permute(1, 0, 2, 3, 4).reshape(b, p * s_loc, h // p, d)
        return x[:, :seq]

    def to_heads(self, x: torch.Tensor, seq: int) -> torch.Tensor:
        """(B, S_loc + L, H, D) local video shard then text -> (B, seq + L, H/P, D): the whole
        video sequence and the text, this rank's heads (what its STA call sees)."""
        s_loc = self.shard_len(seq)
        video = self.seq_to_heads(x[:, :s_loc], seq)  # (B, S, H/P, D)
        return torch.cat([video, x[:, s_loc:, self.heads(x.shape[2])]], dim=1)

    def heads_to_seq(self, x: torch.Tensor, s_loc: int) -> torch.Tensor:
        """(B, S, H/P, D) whole sequence, this rank's heads -> (B, S_loc, H, D) shard."""
        b, seq, hp, d = x.shape
        p = self.size
        pad = p * s_loc - seq
        if pad:
            x = torch.cat([x, x.new_zeros(b, pad, hp, d)], dim=1)
        x = x.reshape(b, p, s_loc, hp, d).permute(1, 0, 2, 3, 4)  # (P, B, S_loc, H/P, D)
        x = _AllToAll.apply(x, self.group)  # [p] = head group p
        return x.permute(1, 2, 0, 3, 4).reshape(b, s_loc, p * hp, d)

    def mean_squared_error(
        self, a: torch.Tensor, b: torch.Tensor, *, num_video: int
    ) -> torch.Tensor:
        """MSE over the whole sequence from this rank's shards, the same value on every rank.

        ``a``, ``b``: (B, S_loc + L, ...) local video shard (padding rows zero in both) then
        ``L`` replicated text rows; ``num_video``: S of the whole canvas.
        Replicated text rows count 1/P on each rank, so the sum over ranks counts them once.
        """
        from stafinetune.diffusion.losses import squared_error_sum

        s_loc = self.shard_len(num_video)
        local = squared_error_sum(a, b, head=s_loc, tail_weight=1.0 / self.size)
        rows = num_video + a.shape[1] - s_loc
        numel = a.numel() // a.shape[1] * rows
        return _AllReduceSum.apply(local, self.group) / numel


class UlyssesAttention(nn.Module):
    """Wraps a ``VideoDiT``'s ``STAAttention`` with the two all-to-alls (see the module doc).

    Called exactly like the wrapped module with this rank's (B, S_loc + L, H, D) q, k, v;
    returns (B, S_loc + L, H, D).
    """

    def __init__(self, inner: nn.Module, sp: SequenceParallel) -> None:
        super().__init__()
        self.inner = inner
        self.sp = sp

    @property
    def tile(self) -> tuple[int, int, int]:
        return self.inner.tile

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        canvas: tuple[int, int, int],
        text_len: int | torch.Tensor = 0,
        window: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sp = self.sp
        seq = canvas[0] * canvas[1] * canvas[2]
        s_loc = sp.shard_len(seq)
        heads = sp.heads(q.shape[2])
        o = self.inner(
            *(sp.to_heads(x, seq) for x in (q, k, v)),  # (B, S + L, H/P, D)
            canvas=canvas,
            text_len=text_len,
            window=None if window is None else window[heads],
        )  # (B, S + L, H/P, D)
        video = sp.heads_to_seq(o[:, :seq], s_loc)  # (B, S_loc, H, D)
        if o.shape[1] == seq:
            return video
        text = gather_along(o[:, seq:].movedim(2, 0), 0, sp.group).movedim(0, 2)  # (B, L, H, D)
        return torch.cat([video, text], dim=1)


# --------------------------------------------------------------------- hooks on the transformer
def _split_module_input(sp: SequenceParallel, state: dict[str, int]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            x, rest = args[0], args[1:]
            state["seq"] = x.shape[1]
            return (sp.split(x, 1), *rest), kwargs
        x = kwargs["hidden_states"]
        state["seq"] = x.shape[1]
        return args, {**kwargs, "hidden_states": sp.split(x, 1)}

    return hook


def _split_rope(sp: SequenceParallel, dim: int):
    def hook(module: nn.Module, args: tuple, out: Any) -> Any:
        return tuple(sp.split(t, dim) for t in out)

    return hook


def _split_token_timestep(sp: SequenceParallel, name: str):
    """Split the transformer's (B, S) timestep argument ``name`` like the video tokens
    (padding rows get timestep 0; the gather drops them); a (B,) timestep passes untouched.
    ``VideoDiT`` passes every transformer argument by name."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        t = kwargs.get(name)
        if t is None or t.ndim != 2:
            return None
        return args, {**kwargs, name: sp.split(t, 1)}  # (B, S_loc)

    return hook


def _gather_output(sp: SequenceParallel, state: dict[str, int]):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return sp.gather(out, 1, state["seq"])

    return hook


def apply_sequence_parallel(dit: VideoDiT, sp: SequenceParallel) -> None:
    """Split ``dit``'s video sequence over the sp group (in place; see the module docstring).

    Call after ``dit.set_attention``; the model then has to run on every rank of the group
    with the same inputs.
    Raises:
        ValueError: when the heads do not divide over the group.
    """
    if dit.num_heads % sp.size:
        raise ValueError(
            f"parallel.sp={sp.size} must divide the model's {dit.num_heads} attention heads "
            f"(model.flavor's num_attention_heads)"
        )
    seams = dit.adapter.sequence_seams(dit.transformer)
    state: dict[str, int] = {}
    seams.rope.register_forward_hook(_split_rope(sp, seams.rope_dim))
    seams.first_block.register_forward_pre_hook(_split_module_input(sp, state), with_kwargs=True)
    seams.output.register_forward_hook(_gather_output(sp, state))
    if seams.token_timestep is not None:
        dit.transformer.register_forward_pre_hook(
            _split_token_timestep(sp, seams.token_timestep), with_kwargs=True
        )
    dit.attention = UlyssesAttention(dit.attention, sp)
