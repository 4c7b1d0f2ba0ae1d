"""Score every candidate window of every head against dense attention, layer by layer.

The model runs dense, so the dense attention output is what flows on and errors of one
layer never leak into the next. Each STA layer's (q, k, v) is handed to ``SearchStore.record``
while the forward runs (``VideoDiT.capture(store=...)``); the store scores every candidate
for all heads at once and keeps only the per-head error sums, never the tensors. On a GPU
each candidate is one ``sliding_tile_attention`` call with an (H, 3) window table (or several
candidates stacked along the head axis); where the kernel would be the dense reference
anyway (CPU), all candidates come from one softmax summed per key tile, which is exact and
several times faster.

Errors count the video query rows only. Under the STA contract a text query attends every
video key and every valid text key whatever the window, so the text rows (HunyuanVideo's
joint attention) equal the dense ones and would only dilute the score; the text keys'
contribution to the video rows is part of every candidate's output and is scored with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sta_kernels import (
    num_tiles,
    resolve_backend,
    sliding_tile_attention,
    tile_mask,
    token_tile_ids,
)
from stafinetune.diffusion.sampling import flow_sigmas
from stafinetune.models.attention import ActivationStore, ForwardState, common_dtype, text_key_mask
from stafinetune.models.dit import VideoDiT
from stafinetune.models.experts import dense_plans

from .candidates import resolve_candidates
from .config import SEARCH_METRICS, SearchConfig
from .select import check_budget

# Relative errors divide by the dense output's norm; a head whose output is exactly 0 would
# divide by 0, so the norm is floored here.
NORM_FLOOR = 1e-12


def head_subset(heads: Sequence[int] | None, num_heads: int) -> list[int]:
    """The searched heads as a sorted list (all heads for ``None``), validated."""
    if heads is None:
        return list(range(num_heads))
    chosen = sorted({int(h) for h in heads})
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_heads:
        raise ValueError(
            f"heads must be a non-empty subset of range({num_heads}), got {list(heads)}"
        )
    return chosen


def _take_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """x[:, :, heads] as a view for a contiguous range, a copy otherwise."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return x[:, :, heads[0] : heads[-1] + 1]
    return x.index_select(2, torch.tensor(heads, device=x.device))


EVALUATION_METHODS = ("auto", "kernel", "tile_sums")
# ``auto`` uses tile sums only while their largest intermediate stays below this many
# float64 elements (1 GiB); larger problems belong on a GPU kernel anyway.
TILE_SUM_MAX_ELEMENTS = 2**27


def _kernel_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    candidates: torch.Tensor,
    text_len: int | torch.Tensor,
    backend: str,
    chunk: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first candidate, (B, Sv, c, H, D) video outputs) per chunk of c candidates: one
    ``sliding_tile_attention`` call per chunk, the candidates stacked along the head axis."""
    heads = q.shape[2]
    num_video = math.prod(canvas)
    for start in range(0, candidates.shape[0], chunk):
        windows = candidates[start : start + chunk]  # (c, 3)
        c = windows.shape[0]
        stack = (x.repeat(1, 1, c, 1) if c > 1 else x for x in (q, k, v))  # (B, S, c * H, D)
        out = sliding_tile_attention(
            *stack,
            canvas=canvas,
            tile=tile,
            window=windows.repeat_interleave(heads, dim=0),  # (c * H, 3), candidate-major
            text_len=text_len,
            backend=backend,
        )  # (B, S, c * H, D)
        yield start, out[:, :num_video].unflatten(2, (c, heads))


def _tile_sum_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    canvas: Sequence[int],
    tile: Sequence[int],
    candidates: torch.Tensor,
    text_len: int | torch.Tensor,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The same outputs as ``_kernel_outputs`` for all candidates at once, from one softmax.

    A window's softmax is the dense softmax restricted to the window's keys and renormalised.
    So ``p = exp(s - rowmax)`` is computed once (float64: no in-window weight underflows), then
    summed per key tile: ``P[i, K] = sum_{j in K} p_ij`` and ``PV[i, K] = sum_{j in K} p_ij v_j``.
    A candidate's output is ``sum_K m(i, K) PV[i, K] / sum_K m(i, K) P[i, K]`` (plus the text
    keys, always attended), with the tile mask ``m`` of ``sta_kernels.tile_mask`` (the kernels'
    own geometry): the per-candidate work is over key tiles, not key tokens.
    """
    batch, seq, _, dim = q.shape
    num_video = math.prod(canvas)
    lengths = torch.as_tensor(text_len, dtype=torch.int64).expand(batch)  # (B,)
    qv = q[:, :num_video].transpose(1, 2).double()  # (B, H, Sv, D)
    kt, vt = (x.transpose(1, 2).double() for x in (k, v))  # (B, H, S, D)
    scores = torch.matmul(qv, kt.transpose(-1, -2)) * dim**-0.5  # (B, H, Sv, S)
    valid = text_key_mask(seq, num_video, lengths, q.device)  # (B, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # (B, H, Sv, S)
    p_text = p[..., num_video:]  # (B, H, Sv, St)
    num_text = torch.matmul(p_text, vt[:, :, num_video:])  # (B, H, Sv, D)
    den_text = p_text.sum(dim=-1)  # (B, H, Sv)
    # keys grouped by tile: table[K, slot] = key token, padded with a zero key at index Sv
    ids = token_tile_ids(canvas, tile)  # (Sv,)
    order = torch.argsort(ids, stable=True)  # (Sv,)
    counts = torch.bincount(ids)  # (N,)
    starts = torch.cumsum(counts, 0) - counts  # (N,)
    slot = torch.arange(num_video) - starts[ids[order]]  # (Sv,)
    table = torch.full((counts.numel(), int(counts.max())), num_video, dtype=torch.int64)
    table[ids[order], slot] = order
    table = table.to(q.device)  # (N, tmax)
    p_video = torch.nn.functional.pad(p[..., :num_video], (0, 1))  # (B, H, Sv, Sv + 1)
    v_video = torch.nn.functional.pad(vt[:, :, :num_video], (0, 0, 0, 1))  # (B, H, Sv + 1, D)
    p_tiles = p_video[..., table]  # (B, H, Sv, N, tmax)
    pv = torch.einsum("bhint,bhntd->bhind", p_tiles, v_video[:, :, table])  # (B, H, Sv, N, D)
    p_sum = p_tiles.sum(dim=-1)  # (B, H, Sv, N)
    masks = tile_mask(canvas, tile, candidates)  # (C, N, N): [c, query tile, key tile]
    rows = masks[:, ids].permute(1, 2, 0).to(q.device, torch.float64)  # (Sv, N, C)
    num = torch.matmul(pv.transpose(-1, -2), rows) + num_text[..., None]  # (B, H, Sv, D, C)
    den = torch.einsum("bhin,inc->bhic", p_sum, rows) + den_text[..., None]  # (B, H, Sv, C)
    out = num / den.clamp_min(torch.finfo(torch.float64).tiny)[:, :, :, None]  # (B, H, Sv, D, C)
    yield 0, out.permute(0, 2, 4, 1, 3)  # (B, Sv, C, H, D)


def _tile_sum_elements(q: torch.Tensor, canvas: Sequence[int], tile: Sequence[int]) -> int:
    """Elements of the largest tile-sum intermediate (PV: B x H x Sv x N x D)."""
    batch, _, heads, dim = q.shape
    return batch * heads * math.prod(canvas) * math.prod(num_tiles(canvas, tile)) * dim


def candidate_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    *,
    canvas: Sequence[int],
    tile: Sequence[int],
    candidates: torch.Tensor,
    text_len: int | torch.Tensor = 0,
    backend: str = "auto",
    candidate_batch: int = 1,
    method: str = "auto",
) -> dict[str, torch.Tensor]:
    """Per-sample, per-head error of every candidate window against the dense output ``o``.

    Args:
        q, k, v: (B, S, H, D) one layer's attention inputs (S = video tokens, then text slots).
        o: (B, S, H, D) the dense attention output of the same inputs.
        canvas, tile: (T, Hc, Wc) token canvas and (tt, th, tw) tile in tokens.
        candidates: (C, 3) int windows in tiles.
        text_len: valid text tokens after the video, an int or a (B,) tensor.
        backend: ``sta_kernels`` backend of the ``kernel`` method.
        candidate_batch: candidates per kernel call, stacked along the head axis
            (``kernel`` method).
        method: ``kernel`` (``sliding_tile_attention`` per chunk of candidates), ``tile_sums``
            (one dense softmax summed per key tile, then every candidate from those sums; see
            ``_tile_sum_outputs``) or ``auto``: ``tile_sums`` where the kernel would run the
            dense reference anyway (CPU) and the sums fit in 1 GiB, ``kernel`` elsewhere.
    Returns:
        ``{"rel_l2": (B, H, C), "rel_l1": (B, H, C)}`` float64 errors on q's device over the
        video query rows: ``||o_c - o||_2 / ||o||_2`` and ``||o_c - o||_1 / ||o||_1`` per
        sample and head.
    """
    if method not in EVALUATION_METHODS:
        raise ValueError(f"method must be one of {EVALUATION_METHODS}, got {method!r}")
    if method == "auto":
        small = _tile_sum_elements(q, canvas, tile) <= TILE_SUM_MAX_ELEMENTS
        method = "tile_sums" if small and resolve_backend(q, backend) == "reference" else "kernel"
    batch, _, heads, _ = q.shape
    num_video = math.prod(canvas)
    ref = o[:, :num_video].double()  # (B, Sv, H, D)
    l2_ref = ref.square().sum(dim=(1, 3)).sqrt().clamp_min(NORM_FLOOR)  # (B, H)
    l1_ref = ref.abs().sum(dim=(1, 3)).clamp_min(NORM_FLOOR)  # (B, H)
    rel_l2 = torch.empty(batch, heads, candidates.shape[0], dtype=torch.float64, device=q.device)
    rel_l1 = torch.empty_like(rel_l2)
    if method == "kernel":
        outputs = _kernel_outputs(
            q, k, v, canvas, tile, candidates, text_len, backend, candidate_batch
        )
    else:
        outputs = _tile_sum_outputs(q, k, v, canvas, tile, candidates, text_len)
    for start, out in outputs:
        c = out.shape[2]
        diff = out.double() - ref[:, :, None]  # (B, Sv, c, H, D)
        l2 = diff.square().sum(dim=(1, 4)).sqrt()  # (B, c, H)
        l1 = diff.abs().sum(dim=(1, 4))  # (B, c, H)
        rel_l2[:, :, start : start + c] = (l2 / l2_ref[:, None]).transpose(1, 2)
        rel_l1[:, :, start : start + c] = (l1 / l1_ref[:, None]).transpose(1, 2)
    return {"rel_l2": rel_l2, "rel_l1": rel_l1}


class SearchStore(ActivationStore):
    """A capture store that scores the candidates of each layer as the forward computes it.

    Install with ``dit.capture(store=store)``; set ``store.step`` (and ``store.active``, False
    to score nothing) before each forward. Only the error sums over samples are kept:
    ``sums[metric]`` (steps, L, h, C) float64 on ``device`` over the searched heads.
    """

    def __init__(
        self,
        *,
        num_steps: int,
        num_layers: int,
        heads: list[int],
        tile: Sequence[int],
        candidates: torch.Tensor,
        backend: str = "auto",
        candidate_batch: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(layers=None, detach=True, inputs=False)
        self.heads = heads
        self.tile = tuple(int(t) for t in tile)
        self.candidates = candidates
        self.backend = backend
        self.candidate_batch = candidate_batch
        self.step = 0
        self.active = True
        shape = (num_steps, num_layers, len(heads), candidates.shape[0])
        self.sums = {
            m: torch.zeros(shape, dtype=torch.float64, device=device) for m in SEARCH_METRICS
        }

    def record(
        self,
        layer: int,
        o: torch.Tensor,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        state: ForwardState,
    ) -> None:
        """Add layer ``layer``'s per-head candidate errors (dense ``o``: (B, S, H, D))."""
        if not self.active:
            return
        heads = self.heads
        sp = getattr(state.attention, "sp", None)  # sequence parallel: own heads, whole sequence
        if sp is not None:
            seq = math.prod(state.canvas)
            offset = sp.heads(o.shape[2]).start
            qkv = tuple(sp.to_heads(x.detach(), seq) for x in qkv)  # type: ignore[assignment]
            o = sp.to_heads(o.detach(), seq)
            heads = [h - offset for h in heads]
            if min(heads) < 0 or max(heads) >= o.shape[2]:
                raise ValueError(
                    f"under sequence parallelism a rank scores only its own heads "
                    f"{list(range(offset, offset + o.shape[2]))}, got {self.heads}"
                )
        dtype = common_dtype(*qkv)  # as STAAttention: q, k may leave an RMSNorm in fp32
        q, k, v = (_take_heads(x.detach(), heads).to(dtype) for x in qkv)  # (B, S, h, D)
        errors = candidate_errors(
            q,
            k,
            v,
            _take_heads(o.detach(), heads),
            canvas=state.canvas,
            tile=self.tile,
            candidates=self.candidates,
            text_len=state.text_len,
            backend=self.backend,
            candidate_batch=self.candidate_batch,
        )
        for metric, err in errors.items():
            self.sums[metric][self.step, layer] += err.sum(dim=0)  # (h, C)
        self.canvas, self.text_len = state.canvas, state.text_len


@dataclasses.dataclass
class CandidateErrors:
    """What the evaluation measured; the input of the selection.

    Attributes:
        errors: ``{"rel_l2", "rel_l1"}`` -> (steps, L, h, C) float64 mean over calibration
            samples; NaN at the forced-dense steps (``step < dense_first_steps``, not run).
        candidates: (C, 3) int64 windows in tiles; densities: (C,) float64.
        heads: the searched head indices (h of them).
        canvas, tile: token canvas and tile in tokens.
        sigmas: (steps + 1,) the calibration schedule.
        num_samples: calibration samples; mean_text_len: their mean valid text length
            (0 for Wan, whose text is not in the attention sequence).
        num_heads: the model's heads.
    """

    errors: dict[str, torch.Tensor]
    candidates: torch.Tensor
    densities: torch.Tensor
    heads: list[int]
    canvas: list[int]
    tile: list[int]
    sigmas: torch.Tensor
    num_samples: int
    mean_text_len: float
    num_heads: int


def _check_batch(batch: Mapping[str, Any], index: int) -> None:
    for key in ("latents", "text", "text_mask"):
        if key not in batch:
            raise ValueError(f"calibration[{index}] has no {key!r} (keys: {sorted(batch)})")


def _latent_canvas(dit: VideoDiT, calibration: Sequence[Mapping[str, Any]]) -> list[int]:
    canvases = {tuple(dit.canvas_for(b["latents"].shape)) for b in calibration}
    if len(canvases) != 1:
        raise ValueError(
            f"calibration batches must share one latent shape (one canvas), got canvases "
            f"{sorted(canvases)}; a mask strategy is searched for one canvas"
        )
    return list(canvases.pop())


def evaluate_candidates(
    dit: VideoDiT,
    calibration: Sequence[Mapping[str, Any]],
    cfg: SearchConfig,
    *,
    heads: Sequence[int] | None = None,
    progress: bool = True,
) -> CandidateErrors:
    """Run the dense calibration sampler and score every candidate for every searched head.

    Each batch's latents only give the shape: the sampler starts from seeded noise (seed
    ``cfg.seed + batch index``) and integrates the dense model's velocity with Euler steps at
    sigmas ``flow_sigmas(cfg.steps, cfg.shift)`` (timestep ``1000 * sigma``). The model's
    windows are switched off for the duration (its attention module, and any wrapper, stay).

    Args:
        dit: the model; its ``attention_cfg`` gives the tile and the kernel backend.
        calibration: batches with ``latents`` (B, C, T, H, W), ``text`` (B, L, Dt),
            ``text_mask`` (B, L) bool and ``pooled_text`` (B, Dp) (HunyuanVideo), all of
            one latent shape.
        cfg: the search settings.
        heads: the heads to score (default all); e.g. one sequence-parallel rank's heads.
        progress: show a progress bar over the denoising steps.
    Returns:
        the mean errors per (step, layer, searched head, candidate), see ``CandidateErrors``.
    """
    if len(calibration) == 0:
        raise ValueError("calibration must hold at least one batch")
    for i, batch in enumerate(calibration):
        _check_batch(batch, i)
    chosen_heads = head_subset(heads, dit.num_heads)
    canvas = _latent_canvas(dit, calibration)
    tile = [int(t) for t in dit.attention_cfg.tile]
    candidates, densities = resolve_candidates(cfg.candidates, canvas, tile, cfg.density_levels)
    if cfg.budget is not None:
        check_budget(cfg.budget, densities)  # before the calibration run, not after it
    device = next(dit.parameters()).device
    store = SearchStore(
        num_steps=cfg.steps,
        num_layers=dit.num_layers,
        heads=chosen_heads,
        tile=tile,
        candidates=candidates,
        backend=dit.attention_cfg.backend,
        candidate_batch=cfg.candidate_batch,
        device=device,
    )
    sigmas = flow_sigmas(cfg.steps, cfg.shift)  # (steps + 1,)
    states = []
    for i, batch in enumerate(calibration):
        gen = torch.Generator().manual_seed(cfg.seed + i)
        noise = torch.randn(batch["latents"].shape, generator=gen, dtype=torch.float32)
        states.append(noise.to(device))  # (B, C, T, H, W)
    conds = [
        {
            "text": b["text"].to(device),
            "text_mask": b["text_mask"].to(device),
            "pooled_text": None if b.get("pooled_text") is None else b["pooled_text"].to(device),
            # image-to-video: the clips' first-frame condition
            **{k: b[k].to(device) for k in ("image_latents", "image_embeds") if k in b},
        }
        for b in calibration
    ]
    num_samples = sum(int(x.shape[0]) for x in states)
    text_tokens = sum(int(c["text_mask"].sum()) for c in conds)
    # every transformer dense (a two-expert model: both; each step runs one expert, whose
    # layers record into the store at that step)
    with dense_plans(dit, "search (dense calibration)"):
        with torch.no_grad(), dit.capture(store=store):
            for step in tqdm(range(cfg.steps), desc="window search", disable=not progress):
                store.step = step
                sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
                store.active = step >= cfg.dense_first_steps  # forced-dense steps: no scoring
                for j, (x, cond) in enumerate(zip(states, conds, strict=True)):
                    timestep = torch.full((x.shape[0],), 1000.0 * sigma, device=device)  # (B,)
                    v = dit(x, timestep, **cond, step_index=step)  # (B, C, T, H, W)
                    states[j] = x + (sigma_next - sigma) * v.float()
    errors = {}
    for metric, total in store.sums.items():
        mean = total.cpu() / num_samples  # (steps, L, h, C); each scored step saw every sample
        mean[: cfg.dense_first_steps] = float("nan")
        errors[metric] = mean
    return CandidateErrors(
        errors=errors,
        candidates=candidates,
        densities=densities,
        heads=chosen_heads,
        canvas=canvas,
        tile=tile,
        sigmas=sigmas,
        num_samples=num_samples,
        mean_text_len=text_tokens / num_samples if dit.adapter.joint_text else 0.0,
        num_heads=dit.num_heads,
    )
