"""bf16 storage of frozen linears (``stafinetune.models.bf16``): under bf16 autocast a LoRA
model whose base is stored in bf16 computes bit for bit what the fp32 base computes, and
outside autocast the layer is the linear of its bf16-rounded weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dit_testing import build_lora, make_batch, run

from stafinetune.models.bf16 import Bf16Linear, apply_bf16_weights
from stafinetune.models.fp8 import frozen_linear_names
from stafinetune.training.lora import merged_state_dict


def test_outside_autocast_the_layer_is_the_linear_of_its_rounded_weight():
    linear = torch.nn.Linear(40, 24)
    layer = Bf16Linear.from_linear(linear)
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    ref = F.linear(x, linear.weight.bfloat16().double(), linear.bias.bfloat16().double())
    out = layer(x)
    assert out.dtype == torch.float64 and torch.equal(out, ref)


def _lora_model(bf16_base: bool) -> tuple[torch.nn.Module, list[str]]:
    dit, trainable = build_lora()
    if bf16_base:
        names = apply_bf16_weights(dit)
        assert names == [n for n, m in dit.transformer.named_modules()
                         if isinstance(m, Bf16Linear)]  # fmt: skip
    return dit, trainable


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_under_bf16_autocast_a_bf16_base_equals_the_fp32_base_bit_for_bit(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    (full, trainable), (stored, _) = _lora_model(False), _lora_model(True)
    assert set(frozen_linear_names(full)) == {
        n for n, m in stored.transformer.named_modules() if isinstance(m, Bf16Linear)
    }
    assert {n for n, p in stored.named_parameters() if p.requires_grad} == set(trainable)
    batch = {k: v.to(device) for k, v in make_batch().items()}
    outputs, grads = [], []
    for dit in (full.to(device), stored.to(device)):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = run(dit, batch)
        out.float().pow(2).mean().backward()
        outputs.append(out.detach())
        grads.append({n: p.grad for n, p in dit.named_parameters() if p.grad is not None})
    assert torch.equal(outputs[0], outputs[1])
    assert grads[0].keys() == grads[1].keys() == set(trainable)
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in trainable)
    # the merged export is fp32 throughout: the rounded base plus the adapter's update
    merged = merged_state_dict(stored.cpu())
    assert all(v.dtype == torch.float32 for v in merged.values() if v.is_floating_point())
    base = stored.transformer.blocks[1].ffn.net[2]
    assert torch.equal(merged["blocks.1.ffn.net.2.weight"], base.weight.float())
