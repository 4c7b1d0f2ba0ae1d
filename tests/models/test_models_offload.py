"""Activation offload and block swap on the model: what runs through host memory comes back
bit for bit (outputs and gradients equal the resident model's), and the copies really ran."""

from __future__ import annotations

import pytest
import torch
from dit_testing import build, make_batch, run

from stafinetune.models import VideoDiT
from stafinetune.models.block_swap import apply_block_swap
from stafinetune.models.offload import ActivationOffloader, apply_activation_offload

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _step(
    dit: VideoDiT, b: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and gradients of a distillation-shaped loss (output plus a captured layer)."""
    with dit.capture(layers=[0]) as store:
        out = run(dit, b)
    (out.square().mean() + store[0].square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_equal(a, b) -> None:
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("checkpointing", ["videodit", "diffusers"])
def test_activation_offload_is_exact_and_runs_through_the_host(flavor, checkpointing):
    """VideoDiT's checkpointing and diffusers' own (wrapped by the binding) both offload the
    block inputs; the step equals one without offload bit for bit."""
    b = make_batch(batch=1, text_lens=(9,))
    results = []
    for offload in (False, True):
        dit = build(flavor, window=[3, 1, 3])
        if checkpointing == "videodit":
            dit.enable_gradient_checkpointing()
        else:
            dit.transformer.enable_gradient_checkpointing()
        offloader = ActivationOffloader("cpu") if offload else None
        apply_activation_offload(dit, offloader)
        results.append(_step(dit, b))
    _assert_equal(*results)
    blocks = len(dit.adapter.blocks(dit.transformer))
    stats = offloader.stats
    # every block's hidden states went out; conditioning shared by the blocks went out once
    assert stats.offloaded >= blocks and stats.reused >= blocks - 1
    assert stats.fetched == stats.offloaded + stats.reused  # each save came back
    assert stats.prefetched > 0  # a block's inputs were on their way before it was recomputed


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_attention_targets_wait_on_the_host_for_the_loss_and_its_backward(device):
    """Targets recorded to the host come back for the loss, and its backward reads their host
    copies again (no device copy kept between): the same loss and gradient as without."""
    from stafinetune.diffusion.losses import squared_error_sum

    gen = torch.Generator().manual_seed(0)
    outputs = {i: torch.randn(2, 40, 4, 8, generator=gen).to(device) for i in (0, 2, 5)}
    a = torch.randn(2, 40, 4, 8, generator=gen).to(device)
    offloader = ActivationOffloader(device)
    targets = offloader.targets({i: offloader.to_host(o) for i, o in outputs.items()})
    assert list(targets) == [0, 2, 5]
    if device == "cuda":
        assert all(copy.host.is_pinned() for copy in targets.copies.values())
    losses, grads = [], []
    for read in (outputs.__getitem__, targets.__getitem__):
        x = a.clone().requires_grad_(True)
        with offloader.keeping_targets():
            loss = torch.stack([squared_error_sum(x, read(i)) for i in (0, 2, 5)]).sum()
        assert not offloader._known  # nothing of the forward stays referenced
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    stats = offloader.stats
    assert stats.offloaded == 3 and stats.fetched == 6  # the loss, then its backward
    assert stats.prefetched >= 4  # forward: layers 2 and 5; backward: layers 2 and 0


def test_activation_offload_needs_checkpointing():
    dit = build("wan_tiny")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        apply_activation_offload(dit, ActivationOffloader("cpu"))


def _hooked_block_weights(dit: VideoDiT, block: int) -> list[int]:
    """Records the data pointer of ``block``'s first weight each time the block runs."""
    seen: list[int] = []
    target = dit.adapter.blocks(dit.transformer)[block]
    first = next(n for n, _ in target.named_parameters())
    target.register_forward_pre_hook(lambda m, a: seen.append(m.get_parameter(first).data_ptr()))
    return seen


@pytest.mark.parametrize("resident", [0, 1])
def test_block_swap_forward_equals_the_resident_forward(flavor, resident):
    b = make_batch()
    dit = build(flavor, mode="full").requires_grad_(False)
    with torch.no_grad():
        expected = run(dit, b)
    blocks = dit.adapter.blocks(dit.transformer)
    last = len(blocks) - 1
    at_rest = dict(blocks[last].named_parameters())
    swap = apply_block_swap(dit, resident)
    host_ptrs = {n: p.data_ptr() for n, p in at_rest.items()}
    seen = _hooked_block_weights(dit, last)  # registered after the swap's own pre-hook
    with torch.no_grad():
        out = run(dit, b)
    assert torch.equal(out, expected)
    assert swap.stats.loads == len(blocks) - resident == swap.stats.releases
    assert swap.stats.prefetched == len(blocks) - resident - (resident == 0)
    # the block ran on a device copy and is back on its host copy
    assert seen and seen[0] not in host_ptrs.values()
    assert {n: p.data_ptr() for n, p in blocks[last].named_parameters()} == host_ptrs
    swap.remove()
    with torch.no_grad():
        assert torch.equal(run(dit, b), expected)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_block_swap_under_a_trained_adapter_is_exact(policy):
    """Frozen block weights swapped while trainable ones (a stand-in adapter: the blocks'
    biases of the attention output) learn: the checkpointed recomputation in backward swaps
    the blocks in again, prefetching the previous block, with the same gradients. Selective
    checkpointing replays the forward's recorded ops in the recomputation: the swap's copies
    (which differ there) stay out of that record."""
    b = make_batch(batch=1, text_lens=(9,))
    results = []
    for swapped in (False, True):
        dit = build("wan_tiny", window=[3, 1, 3])
        for name, param in dit.named_parameters():
            param.requires_grad_(
                not name.startswith("transformer.blocks.") or "to_out.0.bias" in name
            )
        dit.enable_gradient_checkpointing(policy)
        if swapped:
            swap = apply_block_swap(dit, 0)
        results.append(_step(dit, b))
    _assert_equal(*results)
    blocks = len(dit.adapter.blocks(dit.transformer))
    assert swap.stats.loads == 2 * blocks  # the forward, and the recomputation of each block
    assert swap.stats.prefetched >= 2 * (blocks - 1)  # forward: the next, backward: the previous


def test_block_swap_refuses_bad_counts():
    dit = build("wan_tiny", mode="full").requires_grad_(False)
    with pytest.raises(ValueError, match="offload.block_swap=2 must lie in"):
        apply_block_swap(dit, 2)  # wan_tiny: 2 blocks
    trained = build("wan_tiny", mode="full")
    with pytest.raises(ValueError, match="no frozen weights"):
        apply_block_swap(trained, 0)


@cuda
def test_block_swap_on_a_gpu_keeps_weights_pinned_and_lowers_the_peak():
    device = torch.device("cuda")
    b = {k: v.to(device) for k, v in make_batch().items()}
    dit = build("wan_tiny", mode="full").requires_grad_(False).to(device)
    with torch.no_grad():
        expected = run(dit, b)
    resident = torch.cuda.memory_allocated(device)
    swap = apply_block_swap(dit, 0)
    assert torch.cuda.memory_allocated(device) < resident
    block = dit.adapter.blocks(dit.transformer)[1]
    assert all(p.is_pinned() and p.device.type == "cpu" for p in block.parameters())
    assert swap.stream is not None and swap.stream != torch.cuda.current_stream(device)
    with torch.no_grad():
        assert torch.equal(run(dit, b), expected)
    assert swap.stats.prefetched == 1  # block 0 prefetched block 1


@cuda
def test_activation_offload_on_a_gpu_lowers_the_peak_and_stays_exact():
    """Eight blocks over a (9, 16, 16) canvas: after the forward the GPU no longer holds the
    blocks' inputs, the forward's peak is lower, and the gradients are the same."""
    from stafinetune.models import AttentionConfig, ModelConfig, build_model

    device = torch.device("cuda")
    b = make_batch(batch=1, text_lens=(9,))
    b["latents"] = torch.randn(1, 16, 9, 32, 32, generator=torch.Generator().manual_seed(2))
    b = {k: v.to(device) for k, v in b.items()}
    results, held, peaks = [], [], []
    for offload in (False, True):
        torch.manual_seed(0)
        dit = build_model(
            ModelConfig(flavor="wan_tiny", config_overrides={"num_layers": 8}),
            AttentionConfig(mode="full"), device=device,
        )  # fmt: skip
        dit.enable_gradient_checkpointing()
        offloader = ActivationOffloader(device) if offload else None
        apply_activation_offload(dit, offloader)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = run(dit, b)
        torch.cuda.synchronize(device)
        held.append(torch.cuda.memory_allocated(device) - before)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
        del dit, out
    _assert_equal(*results)
    assert offloader.stats.offloaded >= 8 and offloader.stats.prefetched > 0
    hidden_states = 9 * 16 * 16 * 64 * 4  # one block's input, fp32 (wan_tiny: hidden 64)
    assert held[0] - held[1] >= 6 * hidden_states  # all but what is in flight left the GPU
    assert peaks[1] < peaks[0]
