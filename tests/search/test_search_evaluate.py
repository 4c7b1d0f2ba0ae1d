"""Candidate scoring: both evaluation methods against the kernels, built local/global heads,
head subsets and the capture hook the search records through."""

from __future__ import annotations

import pytest
import torch
from search_testing import CANVAS, TILE, build_tiny, calibration, local_global_qkv

from sta_kernels import density, sliding_tile_attention
from stafinetune.models.attention import ActivationStore, STAAttention
from stafinetune.search import (
    CandidateErrors,
    SearchConfig,
    candidate_errors,
    evaluate_candidates,
    resolve_candidates,
    select_budget,
    select_threshold,
    select_windows,
)


@pytest.mark.parametrize(
    ("canvas", "tile", "text_len"),
    [
        ((5, 8, 8), (1, 2, 2), 0),  # the embedded default, video only (Wan)
        ((3, 7, 9), (2, 2, 4), torch.tensor([5, 2])),  # partial edge tiles, joint text, padding
    ],
)
def test_methods_match_the_kernel_definition(canvas, tile, text_len) -> None:
    """tile_sums == kernel (sliding_tile_attention per candidate chunk) == errors of the
    reference kernel computed by hand, for every candidate and head."""
    batch, heads, dim = 2, 3, 8
    num_video = canvas[0] * canvas[1] * canvas[2]
    seq = num_video + (0 if isinstance(text_len, int) else 6)
    q, k, v = (2 * torch.randn(batch, seq, heads, dim) for _ in range(3))
    o = STAAttention(tile)(q, k, v, canvas=canvas, text_len=text_len)  # dense SDPA
    candidates, _ = resolve_candidates([[1, 1, 1], [2, 3, 1], [1, 2, 3]], canvas, tile)
    kwargs = dict(canvas=canvas, tile=tile, candidates=candidates, text_len=text_len)
    sums = candidate_errors(q, k, v, o, method="tile_sums", **kwargs)
    kernel = candidate_errors(
        q, k, v, o, method="kernel", backend="reference", candidate_batch=2, **kwargs
    )
    for metric in ("rel_l2", "rel_l1"):
        assert sums[metric].shape == (batch, heads, candidates.shape[0])
        torch.testing.assert_close(sums[metric], kernel[metric], atol=1e-5, rtol=1e-5)
    c = 1
    out = sliding_tile_attention(
        q,
        k,
        v,
        canvas=canvas,
        tile=tile,
        window=candidates[c].tolist(),
        text_len=text_len,
        backend="reference",
    )
    diff = (out - o)[:, :num_video].double()  # video query rows only
    ref = o[:, :num_video].double()
    expected = diff.square().sum(dim=(1, 3)).sqrt() / ref.square().sum(dim=(1, 3)).sqrt()  # (B, H)
    torch.testing.assert_close(sums["rel_l2"][:, :, c], expected, atol=1e-5, rtol=1e-5)
    full = candidates.shape[0] - 1  # the full window, appended: the dense output itself
    assert sums["rel_l2"][:, :, full].max() < 1e-5


def test_local_heads_get_small_windows_global_heads_the_full_one() -> None:
    """Heads built local (sharp distance-decaying logits) or global (uniform attention)."""
    local = [True, False, True, False]
    q, k, v = local_global_qkv(local)
    o = STAAttention(TILE)(q, k, v, canvas=CANVAS)
    candidates, dens = resolve_candidates(None, CANVAS, TILE)
    errors = candidate_errors(q, k, v, o, canvas=CANVAS, tile=TILE, candidates=candidates)
    err = errors["rel_l2"].mean(dim=0)  # (H, C) averaged over samples
    by_threshold = select_threshold(err, dens, threshold=0.05)  # (H,)
    by_budget = select_budget(err, dens, budget=0.67)  # (H,): room for 2 dense + 2 x 33.75%
    full = len(candidates) - 1
    for h, is_local in enumerate(local):
        for choice in (by_threshold, by_budget):
            if is_local:
                assert dens[choice[h]] <= 0.34, (h, candidates[choice[h]].tolist())
            else:
                assert int(choice[h]) == full, (h, candidates[choice[h]].tolist())
    # the local heads' windows really hold their attention: tiny error at a third of the pairs
    assert err[0, by_threshold[0]] < 0.05 and err[2, by_threshold[2]] < 0.05
    assert err[1, :full].min() > 0.5  # a global head loses much to any sparse window


def test_head_subset_scores_the_same(wan_errors: CandidateErrors) -> None:
    """A rank searching heads [1, 3] gets exactly those heads' errors of a full search."""
    dit = build_tiny("wan_tiny")
    part = evaluate_candidates(
        dit,
        calibration("wan_tiny", sizes=(2, 1)),
        SearchConfig(steps=3),
        heads=[3, 1],
        progress=False,
    )
    assert part.heads == [1, 3]
    for metric in ("rel_l2", "rel_l1"):
        assert part.errors[metric].shape == (3, dit.num_layers, 2, len(part.candidates))
        torch.testing.assert_close(part.errors[metric], wan_errors.errors[metric][:, :, [1, 3]])
    with pytest.raises(ValueError, match="needs the errors of all 4 heads"):
        select_windows(part, SearchConfig(steps=3))
    with pytest.raises(ValueError, match=r"heads must be a non-empty subset of range\(4\)"):
        evaluate_candidates(
            dit, calibration("wan_tiny"), SearchConfig(steps=1), heads=[4], progress=False
        )


def test_capture_accepts_a_store_that_reduces_on_the_fly() -> None:
    """VideoDiT.capture(store=...) hands each layer's o and (q, k, v) to the store's record."""

    class Norms(ActivationStore):
        def __init__(self) -> None:
            super().__init__(detach=True)
            self.norms: dict[int, float] = {}

        def record(self, layer, o, qkv, state) -> None:
            self.norms[layer] = float(qkv[0].norm())
            self.canvas = state.canvas

    dit = build_tiny("hunyuan_tiny", mode="full")
    b = calibration("hunyuan_tiny")[0]
    store = Norms()
    with torch.no_grad(), dit.capture(store=store) as yielded:
        out = dit(
            b["latents"], torch.tensor([500.0, 20.0]), b["text"], b["text_mask"], b["pooled_text"]
        )
    assert yielded is store and sorted(store.norms) == [0, 1] and store.canvas == CANVAS
    assert len(store) == 0 and torch.equal(store["final"], out)  # nothing kept but the output
    with pytest.raises(ValueError, match="from the store"), dit.capture(layers=[0], store=Norms()):
        pass


def test_search_runs_dense_and_restores_the_model() -> None:
    """The model's own windows are off during the search and back afterwards."""
    dit = build_tiny("wan_tiny", window=[1, 1, 1])
    plan = dit.plan
    measured = evaluate_candidates(
        dit, calibration("wan_tiny"), SearchConfig(steps=2, dense_first_steps=1), progress=False
    )
    assert dit.plan is plan
    assert torch.isnan(measured.errors["rel_l2"][0]).all()  # forced dense: not scored
    assert measured.errors["rel_l2"][1, :, :, -1].max() < 1e-5  # dense flows on: full window exact
    assert measured.num_samples == 2 and measured.mean_text_len == 0.0
    torch.testing.assert_close(
        measured.densities, density(CANVAS, TILE, measured.candidates).double()
    )
