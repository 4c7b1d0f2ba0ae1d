"""Selective activation checkpointing and torch.compile of the blocks: same gradients as the
plain backward, fewer STA forwards, no graph breaks around the STA op."""

from __future__ import annotations

import pytest
import torch
from dit_testing import make_batch, run

import sta_kernels.reference as reference
from stafinetune.models import AttentionConfig, ModelConfig, VideoDiT, build_model
from stafinetune.parallel.parallelize import apply_compile

ONE_BLOCK = {"wan_tiny": {"num_layers": 1}, "hunyuan_tiny": {}}  # hunyuan_tiny: 1 dual + 1 single


def _build(flavor: str, **overrides) -> VideoDiT:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(flavor=flavor, config_overrides=overrides),
        AttentionConfig(mode="sta", window=[3, 1, 3], backend="reference"),
    )


@pytest.fixture
def sta_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the reference STA forwards (the op's implementation; its backward is separate)."""
    calls = [0]
    forward = reference.sta_reference

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(reference, "sta_reference", counted)
    return calls


def _step(
    dit: VideoDiT, b: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A distillation-shaped step: output loss plus the captured last layer's attention."""
    with dit.capture() as store:
        out = run(dit, b)
    (out.square().mean() + store[dit.num_layers - 1].square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_same(a, b, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=atol, rtol=1e-5, msg=name)


def test_selective_checkpointing_skips_the_sta_recompute(flavor, sta_calls):
    """Same gradients as no checkpointing and as full checkpointing; full runs each layer's
    STA forward twice (forward, recomputation), selective once."""
    b = make_batch(batch=1, text_lens=(9,))
    results, counts = {}, {}
    for policy in (None, "full", "selective"):
        dit = _build(flavor)
        if policy is not None:
            dit.enable_gradient_checkpointing(policy)
        sta_calls[0] = 0
        results[policy] = _step(dit, b)
        counts[policy] = sta_calls[0]
    layers = dit.num_layers
    assert counts == {None: layers, "full": 2 * layers, "selective": layers}
    _assert_same(results[None], results["full"])
    _assert_same(results[None], results["selective"])


def test_selective_checkpointing_of_the_dense_path():
    """Dense attention (SDPA) under the selective policy: the same gradients."""
    b = make_batch(batch=1, text_lens=(9,))
    results = []
    for policy in ("full", "selective"):
        torch.manual_seed(0)
        dit = build_model(ModelConfig(flavor="hunyuan_tiny"), AttentionConfig(mode="full"))
        dit.enable_gradient_checkpointing(policy)
        results.append(_step(dit, b))
    _assert_same(*results)


def test_policy_is_validated():
    with pytest.raises(ValueError, match="checkpoint policy must be one of"):
        _build("wan_tiny").enable_gradient_checkpointing("some")
    with pytest.raises(ValueError, match="model.checkpoint_policy=selective needs"):
        ModelConfig(checkpoint_policy="selective")
    with pytest.raises(ValueError, match="model.checkpoint_policy must be one of"):
        ModelConfig(gradient_checkpointing=True, checkpoint_policy="attention")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_compiled_checkpointed_blocks_match_eager(flavor, policy, sta_calls):
    """Checkpoint and block compiled as one region (aot_eager: dynamo, AOT autograd and the
    partitioner that applies the policy; inductor's code generation is left to the GPU run):
    fullgraph (a graph break would raise), the eager values and gradients, and under the
    selective policy no STA recomputation in the compiled backward either."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    b = make_batch(batch=1, text_lens=(9,))
    overrides = ONE_BLOCK[flavor]
    eager = _build(flavor, **overrides)
    eager.enable_gradient_checkpointing(policy)
    expected = _step(eager, b)
    compiled = _build(flavor, **overrides)
    compiled.enable_gradient_checkpointing(policy, compile=True, backend="aot_eager")
    _step(compiled, b)  # compiles
    compiled.zero_grad(set_to_none=True)
    sta_calls[0] = 0
    got = _step(compiled, b)
    layers = compiled.num_layers
    assert sta_calls[0] == (layers if policy == "selective" else 2 * layers)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == layers  # one graph per block
    _assert_same(expected, got, atol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_without_checkpointing_match_eager(flavor):
    """``model.compile`` without checkpointing compiles each block's forward in place: the
    same values and gradients, the same parameter names."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    b = make_batch(batch=1, text_lens=(9,))
    overrides = ONE_BLOCK[flavor]
    expected = _step(_build(flavor, **overrides), b)
    dit = _build(flavor, **overrides)
    names = [n for n, _ in dit.named_parameters()]
    apply_compile(dit, checkpointed=False, backend="aot_eager")
    got = _step(dit, b)
    assert [n for n, _ in dit.named_parameters()] == names
    assert not counters["graph_break"]
    _assert_same(expected, got, atol=1e-5)


@pytest.mark.gpu
def test_inductor_compiled_student_matches_eager_on_gpu():
    """On CUDA with the triton kernel and inductor: the compiled selective-checkpointed step
    agrees with the eager one (bf16, errors relative to the gradient norms)."""
    if not torch.cuda.is_available():
        pytest.skip("inductor with the triton STA kernel needs a CUDA device")
    b = {k: v.cuda() for k, v in make_batch(batch=1, text_lens=(9,)).items()}
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        dit = build_model(
            ModelConfig(flavor="wan_tiny"),
            AttentionConfig(mode="sta", window=[3, 1, 3], backend="triton"),
            device="cuda",
            dtype=torch.bfloat16,
        )
        dit.enable_gradient_checkpointing("selective", compile=compile)
        results.append(_step(dit, b))
    (out_a, grads_a), (out_b, grads_b) = results
    assert ((out_b.float() - out_a.float()).norm() / out_a.float().norm()).item() < 2e-2
    for name in grads_a:
        a, g = grads_a[name].float(), grads_b[name].float()
        assert ((g - a).norm() / a.norm().clamp_min(1e-12)).item() < 5e-2, name
