"""The triton op inside a compiled, selectively checkpointed diffusers block (what
``model.compile=true`` with ``model.checkpoint_policy=selective`` builds), under the
interpreter on the CPU: dynamo traced the op's former ``autograd.Function`` wrapper into a
graph with a dangling output ("Argument 'getitem_..' of Node 'output' does not belong to this
Graph"), on CUDA with inductor and here with aot_eager alike."""

from __future__ import annotations

import torch
from kernel_testing import rel_err

from stafinetune.models import AttentionConfig, ModelConfig, build_model


def _step(compile: bool, device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    dit = build_model(
        ModelConfig(flavor="wan_tiny", config_overrides={"num_layers": 1}),
        AttentionConfig(mode="sta", tile=[1, 2, 2], window=[1, 1, 1], backend="triton"),
        device=device,
        dtype=torch.bfloat16,
    )
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    dit.enable_gradient_checkpointing("selective", compile=compile, backend=backend)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g).to(device, torch.bfloat16)
    text = torch.randn(1, 16, 32, generator=g).to(device, torch.bfloat16)
    mask = (torch.arange(16) < 9)[None].to(device)
    pooled = torch.randn(1, 32, generator=g).to(device, torch.bfloat16)
    with dit.capture() as store:  # distillation's attention-output capture, inside the region
        out = dit(latents, torch.tensor([400.0], device=device), text, mask, pooled)
    (out.float().square().mean() + store[0].float().square().mean()).backward()
    return [out.detach()] + [p.grad for p in dit.parameters() if p.grad is not None]


def test_compiled_selective_block_matches_eager(triton_device):
    eager, compiled = _step(False, triton_device), _step(True, triton_device)
    assert len(eager) == len(compiled) > 10
    for a, b in zip(eager, compiled, strict=True):
        assert rel_err(b.float(), a.float()) < 3e-2
