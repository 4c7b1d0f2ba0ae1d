"""Attention dispatch: covering windows run SDPA, mixed layers follow a measured cost table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dit_testing import build, make_batch, run

import stafinetune.models.attention as attention_module
from sta_kernels import sliding_tile_attention
from stafinetune.models.attention import STAAttention
from stafinetune.models.dispatch import (
    CostEntry,
    CostPoint,
    CostTable,
    choose_route,
    covering_heads,
)

CANVAS, TILE = (5, 9, 7), (2, 2, 3)  # partial tiles on every axis: 3 x 5 x 3 tiles


class Spy:
    """Counts the calls of the STA kernel entry and of SDPA, keeping their head counts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sta: list[torch.Tensor] = []
        self.sdpa: list[int] = []
        sta, sdpa = attention_module.sliding_tile_attention, F.scaled_dot_product_attention

        def spy_sta(q, k, v, **kwargs):
            self.sta.append(torch.as_tensor(kwargs["window"]).clone())
            return sta(q, k, v, **kwargs)

        def spy_sdpa(*args, **kwargs):
            query = args[0] if args else kwargs["query"]
            self.sdpa.append(query.shape[1])
            return sdpa(*args, **kwargs)

        monkeypatch.setattr(attention_module, "sliding_tile_attention", spy_sta)
        monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy_sdpa)


def _qkv(heads: int, text_slots: int = 0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = math.prod(CANVAS) + text_slots
    return [torch.randn(2, seq, heads, 16, generator=g).requires_grad_() for _ in range(3)]


def _attend(module, qkv, window, text_len, do):
    leaves = [x.detach().clone().requires_grad_() for x in qkv]
    o = module(*leaves, canvas=CANVAS, text_len=text_len, window=window)
    return (o, *torch.autograd.grad(o, leaves, do))


def _all_sta(q, k, v, *, canvas, text_len, window):
    """STA through the kernel entry for every head, whatever the windows (the reference)."""
    return sliding_tile_attention(
        q, k, v, canvas=canvas, tile=TILE, window=window, text_len=text_len, backend="reference"
    )


def _table(dense_ms: float, sta_ms_at_full: float, split_ms: float = 0.0) -> CostTable:
    entry = CostEntry(
        canvas=CANVAS, tile=TILE, head_dim=16, dense_fwd_ms=dense_ms, dense_bwd_ms=2 * dense_ms,
        split_ms=split_ms,
        sta=(CostPoint(0.1, 0.1 * sta_ms_at_full, 0.2 * sta_ms_at_full),
             CostPoint(1.0, sta_ms_at_full, 2 * sta_ms_at_full)),
    )  # fmt: skip
    return CostTable(device="test", entries=[entry])


@pytest.mark.parametrize("text", [None, torch.tensor([4, 1])], ids=["video", "joint_text"])
def test_covering_windows_run_sdpa_with_the_same_result(monkeypatch, text):
    """Windows that cover the tile grid (some wider than it) give STA's full-window output and
    gradients, through SDPA: the STA kernel is not called. Text padding stays exact (zeros)."""
    heads, slots = 3, 0 if text is None else 5
    text_len = 0 if text is None else text
    qkv = _qkv(heads, slots)
    do = torch.randn_like(qkv[0])
    window = torch.tensor([[3, 5, 3], [4, 9, 3], [99, 5, 7]])
    expected = _attend(_all_sta, qkv, window, text_len, do)
    spy = Spy(monkeypatch)
    got = _attend(STAAttention(TILE, "reference"), qkv, window, text_len, do)
    assert spy.sta == [] and spy.sdpa == [heads]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    if text is not None:
        num_video = math.prod(CANVAS)
        for b, n in enumerate(text.tolist()):
            assert torch.all(got[0][b, num_video + n :] == 0)


def test_one_axis_short_of_the_grid_stays_sparse(monkeypatch):
    spy = Spy(monkeypatch)
    qkv = _qkv(2)
    STAAttention(TILE, "reference")(
        *qkv, canvas=CANVAS, window=torch.tensor([[3, 5, 3], [3, 4, 3]])
    )
    assert len(spy.sta) == 1 and spy.sdpa == []


def test_mixed_layer_without_a_table_stays_on_sta(monkeypatch):
    spy = Spy(monkeypatch)
    window = torch.tensor([[3, 5, 3], [1, 1, 1], [2, 3, 1]])
    STAAttention(TILE, "reference")(*_qkv(3), canvas=CANVAS, window=window)
    assert [w.tolist() for w in spy.sta] == [window.tolist()] and spy.sdpa == []


@pytest.mark.parametrize("text", [None, torch.tensor([5, 2])], ids=["video", "joint_text"])
def test_mixed_layer_splits_heads_when_the_table_says_so(monkeypatch, text):
    """A table where SDPA is far cheaper than a full-window STA head: the covering heads go to
    SDPA, the others to STA, and the result (and its gradients) equal all-STA's."""
    slots = 0 if text is None else 6
    text_len = 0 if text is None else text
    qkv = _qkv(4, slots, seed=3)
    do = torch.randn_like(qkv[0])
    window = torch.tensor([[1, 1, 1], [3, 5, 3], [2, 3, 1], [7, 7, 7]])
    expected = _attend(_all_sta, qkv, window, text_len, do)
    spy = Spy(monkeypatch)
    module = STAAttention(TILE, "reference", cost_table=_table(dense_ms=1.0, sta_ms_at_full=4.0))
    got = _attend(module, qkv, window, text_len, do)
    assert [w.tolist() for w in spy.sta] == [[[1, 1, 1], [2, 3, 1]]] and spy.sdpa == [2]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_route_follows_the_measured_costs():
    window = torch.tensor([[3, 5, 3], [1, 1, 1]])  # head 0 covers, head 1 is sparse
    kw = dict(head_dim=16, backward=True)
    assert choose_route(window, CANVAS, TILE, table=_table(1.0, 4.0), **kw).kind == "split"
    assert choose_route(window, CANVAS, TILE, table=_table(5.0, 4.0), **kw).kind == "sta"
    # the gather/scatter of the split counts too: here it eats the gain
    assert (
        choose_route(window, CANVAS, TILE, table=_table(1.0, 4.0, split_ms=3.0), **kw).kind == "sta"
    )
    # another canvas or head dim was not measured: stay on STA
    assert (
        choose_route(window, CANVAS, TILE, table=_table(1.0, 4.0), head_dim=32, backward=True).kind
        == "sta"
    )
    assert choose_route(window, (5, 9, 8), TILE, table=_table(1.0, 4.0), **kw).kind == "sta"


def test_cost_interpolates_between_measured_densities():
    entry = _table(1.0, 4.0).entries[0]
    assert entry.sta_ms(0.55, backward=False) == pytest.approx(0.4 + 0.5 * 3.6)
    assert entry.sta_ms(0.55, backward=True) == pytest.approx(3 * (0.4 + 0.5 * 3.6))
    assert entry.sta_ms(0.05, backward=False) == pytest.approx(0.4 - 0.05 * 4.0)


def test_covering_heads():
    window = torch.tensor([[3, 5, 3], [3, 5, 2], [100, 100, 100]])
    assert covering_heads(window, CANVAS, TILE).tolist() == [True, False, True]


def test_table_round_trip_and_validation(tmp_path):
    table = _table(1.0, 4.0)
    table.save(tmp_path / "t.json")
    assert CostTable.load(tmp_path / "t.json") == table
    bad = table.to_dict()
    bad["entries"][0]["sta"][0]["density"] = 0.0
    with pytest.raises(ValueError, match="densities in"):
        CostTable.from_dict(bad)
    with pytest.raises(ValueError, match="version"):
        CostTable.from_dict({**table.to_dict(), "version": 0})


def test_dit_with_a_covering_window_never_calls_the_kernel(flavor, full_window, monkeypatch):
    """A whole model: the full window (and a wider one) run SDPA in every layer, with the
    output of the dense model."""
    b = make_batch()
    with torch.no_grad():
        dense = run(build(flavor, mode="full"), b)
    spy = Spy(monkeypatch)
    for window in (full_window, [9, 9, 9]):
        with torch.no_grad():
            got = run(build(flavor, mode="sta", window=window), b)
        torch.testing.assert_close(got, dense, atol=2e-5, rtol=1e-4)
    assert spy.sta == []


def test_attention_cost_table_config(tmp_path):
    """``attention.cost_table`` loads into the model's STAAttention; a bad file names the field."""
    path = tmp_path / "costs.json"
    _table(1.0, 4.0).save(path)
    dit = build("wan_tiny", mode="sta", cost_table=str(path))
    assert dit.attention.cost_table == _table(1.0, 4.0)
    path.write_text("{}")
    with pytest.raises(ValueError, match="attention.cost_table="):
        build("wan_tiny", mode="sta", cost_table=str(path))
