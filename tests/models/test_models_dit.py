"""VideoDiT against the original diffusers models, windows, capture, backward."""

from __future__ import annotations

import copy

import pytest
import torch
from dit_testing import build, make_batch, original, run, run_original

from sta_kernels import density
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.models.attention import STAAttention, common_dtype


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_matches_original_diffusers(flavor: str, full_window: list[int], mode: str) -> None:
    """Dense mode and STA with a full window reproduce the unmodified diffusers model."""
    dit = build(flavor, mode=mode, window=full_window)
    b = make_batch()
    with torch.no_grad():
        expected = run_original(original(dit), dit.family, b)
        got = run(dit, b)
    assert got.shape == b["latents"].shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_bf16_matches_original_diffusers(flavor: str, full_window: list[int], mode: str) -> None:
    """In bf16 too: dense is bit-exact, a full STA window within one bf16 rounding step."""
    torch.manual_seed(0)
    dit = build_model(
        ModelConfig(flavor=flavor),
        AttentionConfig(mode=mode, window=full_window, backend="reference"),
        dtype=torch.bfloat16,
    )
    b = make_batch()
    with torch.no_grad():
        expected = run_original(original(dit), dit.family, b, torch.bfloat16)
        got = run(dit, b)
    assert got.dtype == torch.bfloat16
    if mode == "full":
        assert torch.equal(got, expected)
    else:
        assert (got.float() - expected.float()).abs().max() <= 2**-6


def test_windows_change_output(flavor: str, full_window: list[int]) -> None:
    """A sparse window changes the output; a different sparse window changes it differently."""
    b = make_batch(batch=1, text_lens=(9,))
    with torch.no_grad():
        dense = run(build(flavor, mode="sta", window=full_window), b)
        small = run(build(flavor, mode="sta", window=[3, 3, 3]), b)
        tiny = run(build(flavor, mode="sta", window=[1, 1, 1]), b)
    assert (small - dense).abs().max() > 1e-3
    assert (tiny - small).abs().max() > 1e-3


def test_default_attention_is_sparse() -> None:
    """The embedded default (tile 1x2x2, window 3x3x3 on canvas 5x8x8) keeps ~34% of pairs."""
    cfg = AttentionConfig()
    dit = build("wan_tiny", tile=cfg.tile, window=cfg.window)
    canvas = dit.canvas_for((16, 5, 16, 16))
    assert canvas == (5, 8, 8)
    d = density(canvas, cfg.tile, torch.tensor([cfg.window]))
    assert d.item() == pytest.approx(0.3375, abs=1e-6)


def test_capture_records_layers_and_final(flavor: str) -> None:
    dit = build(flavor, mode="sta", window=[3, 3, 3])
    b = make_batch()
    with torch.no_grad():
        with dit.capture() as store:
            out = run(dit, b)
        text_slots = 16 if dit.family == "hunyuan" else 0
        assert store.keys() == list(range(dit.num_layers))
        for i in store.keys():
            assert store[i].shape == (2, 320 + text_slots, dit.num_heads, dit.head_dim)
        assert torch.equal(store["final"], out)
        # outside capture nothing is stored and the processors keep no reference
        run(dit, b)
    assert dit.binding.store is None and dit.binding.runtime.state is None
    with dit.capture(layers=[1]) as only_one, torch.no_grad():
        run(dit, b)
    assert only_one.keys() == [1]


def test_backward_reaches_parameters(flavor: str) -> None:
    dit = build(flavor, mode="sta", window=[3, 3, 3])
    b = make_batch(batch=1, text_lens=(9,))
    with dit.capture() as store:
        out = run(dit, b)
    loss = out.square().mean() + store[0].square().mean()
    loss.backward()
    attn = dit.sta_layers()[0]
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dit.sta_layers()[-1].parameters())


@pytest.mark.parametrize("mode", ["full", "sta"])
def test_padded_text_is_masked(flavor: str, mode: str) -> None:
    """Whatever the padding holds, the output is the same; Hunyuan equals the unpadded run."""
    dit = build(flavor, mode=mode, window=[3, 3, 3])
    b = make_batch()
    noisy = dict(b)
    noisy["text"] = torch.where(
        b["text_mask"][..., None], b["text"], 1e3 * torch.randn_like(b["text"])
    )
    with torch.no_grad():
        out = run(dit, b)
        torch.testing.assert_close(run(dit, noisy), out, atol=1e-5, rtol=1e-5)
        if dit.family == "hunyuan":
            # the second sample holds 9 valid tokens: dropping its padding slots changes nothing
            short = {k: v[1:] for k, v in b.items()}
            short["text"], short["text_mask"] = short["text"][:, :9], short["text_mask"][:, :9]
            torch.testing.assert_close(run(dit, short), out[1:], atol=2e-5, rtol=1e-4)
            with dit.capture() as store:
                run(dit, b)
            assert store[0][1, 320 + 9 :].abs().max() == 0  # padding query rows are zero
            assert store[0][1, : 320 + 9].abs().amax(dim=(-1, -2)).min() > 0


def test_hunyuan_text_mask_must_be_prefix() -> None:
    dit = build("hunyuan_tiny")
    b = make_batch()
    b["text_mask"] = b["text_mask"].flip(-1)
    with pytest.raises(ValueError, match="valid tokens first"):
        run(dit, b)


@pytest.mark.parametrize("flavor", ["wan_tiny", "hunyuan_tiny", "hunyuanvideo15_tiny"])
def test_gradient_checkpointing_matches_plain_backward(flavor: str) -> None:
    """Recomputation runs after forward returned; it must reuse the forward's canvas/windows."""
    b = make_batch(batch=1, text_lens=(9,))
    grads = []
    for checkpointing in (False, True):
        dit = build(flavor, mode="sta", window=[3, 1, 3])
        if checkpointing:
            dit.enable_gradient_checkpointing()
        with dit.capture() as store:
            out = run(dit, b)
        captured = dict(store.layers)
        assert dit.binding.runtime.state is None
        (out.square().mean() + store[dit.num_layers - 1].square().mean()).backward()
        assert store.layers == captured  # recomputation does not record again
        grads.append({n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None})
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_set_attention_dense_teacher_sta_student(flavor: str) -> None:
    """Teacher and student from the same weights; switching one leaves the other alone."""
    b = make_batch(batch=1, text_lens=(9,))
    teacher = build(flavor, mode="full")
    student = copy.deepcopy(teacher)
    student.set_attention(AttentionConfig(mode="sta", window=[3, 3, 3], backend="reference"))
    with torch.no_grad():
        dense = run(teacher, b)
        sparse = run(student, b)
        torch.testing.assert_close(dense, run(build(flavor, mode="full"), b))
        torch.testing.assert_close(sparse, run(build(flavor, mode="sta", window=[3, 3, 3]), b))
    assert (dense - sparse).abs().max() > 1e-3


def test_per_head_windows_reach_the_kernel(flavor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer hands its own (H, 3) windows to sta_kernels in one call for all heads."""
    import stafinetune.models.attention as attention_module

    layers = 2
    head_windows = [
        [[5, 4, 4], [1, 1, 1], [3, 3, 3], [2, 4, 1]],
        [[1, 2, 3], [3, 2, 1], [5, 1, 4], [4, 4, 4]],
    ]
    seen = []
    kernel = attention_module.sliding_tile_attention

    def spy(q, k, v, **kwargs):
        seen.append(kwargs["window"].clone())
        return kernel(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "sliding_tile_attention", spy)
    dit = build(flavor, mode="sta", head_windows=head_windows)
    assert dit.num_layers == layers
    b = make_batch(batch=1, text_lens=(9,))
    with torch.no_grad(), dit.capture() as sparse:
        run(dit, b)
    assert [w.tolist() for w in seen] == head_windows

    # head 0 of layer 0 has the full window: it matches the dense model there, head 1 does not
    dense_dit = build(flavor, mode="sta", window=[5, 4, 4])
    with torch.no_grad(), dense_dit.capture() as dense:
        run(dense_dit, b)
    torch.testing.assert_close(sparse[0][:, :, 0], dense[0][:, :, 0], atol=1e-6, rtol=1e-5)
    assert (sparse[0][:, :, 1] - dense[0][:, :, 1]).abs().max() > 1e-3


def test_mixed_input_dtypes_attend_in_the_lowest_precision() -> None:
    # autocast leaves HunyuanVideo's normed q, k in float32 while v is bf16
    q, k = torch.randn(2, 1, 20, 2, 16).unbind(0)
    v = torch.randn(1, 20, 2, 16).to(torch.bfloat16)
    assert common_dtype(q, k, v) == torch.bfloat16
    o = STAAttention([1, 2, 2], "reference")(
        q, k, v, canvas=(5, 2, 2), window=torch.ones(2, 3, dtype=torch.int64)
    )
    ref = STAAttention([1, 2, 2], "reference")(
        q.bfloat16(), k.bfloat16(), v, canvas=(5, 2, 2), window=torch.ones(2, 3, dtype=torch.int64)
    )
    assert o.dtype == torch.bfloat16 and torch.equal(o, ref)


def test_flex_backend_matches_reference() -> None:
    pytest.importorskip("sta_kernels.flex")
    b = make_batch(batch=1)
    with torch.no_grad():
        ref = run(build("hunyuan_tiny", mode="sta", window=[3, 1, 3]), b)
        flex = run(build("hunyuan_tiny", mode="sta", window=[3, 1, 3], backend="flex"), b)
    torch.testing.assert_close(flex, ref, atol=1e-4, rtol=1e-4)


def test_triton_backend_matches_reference_on_gpu(flavor: str) -> None:
    """bf16 on CUDA: the triton kernel inside the DiT agrees with the reference, forward and
    backward (errors relative to the output / gradient norms)."""
    if not torch.cuda.is_available():
        pytest.skip("the triton backend needs a CUDA device")
    b = {k: v.cuda() for k, v in make_batch().items()}
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        dit = build_model(
            ModelConfig(flavor=flavor),
            AttentionConfig(mode="sta", window=[3, 1, 3], backend=backend),
            device="cuda",
            dtype=torch.bfloat16,
        )
        out = run(dit, b)
        out.float().square().mean().backward()
        outs[backend] = out.float()
        grads[backend] = dit.sta_layers()[0].to_q.weight.grad.float()

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return ((a - ref).norm() / ref.norm()).item()

    assert rel(outs["triton"], outs["reference"]) < 2e-2
    assert rel(grads["triton"], grads["reference"]) < 5e-2


def test_partial_edge_tiles(flavor: str) -> None:
    """A canvas that is not a multiple of the tile (5, 9, 7 tokens, tile 1x2x2) still works:
    a window covering every tile equals dense attention, a smaller one differs."""
    b = make_batch()
    b["latents"] = torch.randn(2, 16, 5, 18, 14, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = run(build(flavor, mode="full"), b)
        covering = run(build(flavor, mode="sta", window=[5, 5, 4]), b)
        sparse = run(build(flavor, mode="sta", window=[3, 3, 3]), b)
    assert dense.shape == b["latents"].shape
    torch.testing.assert_close(covering, dense, atol=2e-5, rtol=1e-4)
    assert (sparse - dense).abs().max() > 1e-3


def test_capture_inputs_replay_candidate_windows(flavor: str) -> None:
    """capture(inputs=True) keeps q, k, v so a mask search can replay other windows offline."""
    from sta_kernels import sliding_tile_attention

    dit = build(flavor, mode="sta", window=[3, 3, 3])
    b = make_batch()
    with torch.no_grad(), dit.capture(inputs=True, detach=True) as store:
        run(dit, b)
    assert store.canvas == (5, 8, 8) and sorted(store.inputs) == list(range(dit.num_layers))
    q, k, v = store.inputs[0]
    replay = lambda window: sliding_tile_attention(  # noqa: E731
        q,
        k,
        v,
        canvas=store.canvas,
        tile=[1, 2, 2],
        window=window,
        text_len=store.text_len,
        backend="reference",
    )
    torch.testing.assert_close(replay([3, 3, 3]), store[0])
    other = build(flavor, mode="sta", window=[1, 2, 3])
    with torch.no_grad(), other.capture(layers=[0]) as other_store:
        run(other, b)
    torch.testing.assert_close(replay([1, 2, 3]), other_store[0])
