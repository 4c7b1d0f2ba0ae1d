"""FP8 storage of frozen linears (``stafinetune.models.fp8``): the quantisation's error bound,
the layer against a float64 reference of its dequantised weight, which layers a model stores
in FP8, and a LoRA base in FP8 (gradients reach the adapter only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dit_testing import build, build_lora, make_batch, run

from stafinetune.models.fp8 import (
    E4M3_MAX,
    Fp8Linear,
    apply_fp8_weights,
    dequantize_fp8,
    frozen_linear_names,
    quantize_fp8,
)
from stafinetune.training.lora import merged_state_dict


def _weight(out: int = 96, inp: int = 80, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, one all zero, one with an exact power-of-two max."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-6, 2, out)[:, None]
    w[5] = 0.0
    w[7, 3] = 2.0**-3 * E4M3_MAX  # absmax / 448 is exactly 2**-3
    w[7] = w[7].clamp(-(2.0**-3) * E4M3_MAX, 2.0**-3 * E4M3_MAX)
    return w


def test_quantisation_error_is_bounded_and_scales_are_powers_of_two():
    w = _weight()
    bits, scale = quantize_fp8(w)
    assert bits.dtype == torch.uint8 and bits.shape == w.shape and scale.shape == (w.shape[0],)
    mantissa, _ = torch.frexp(scale)
    assert bool((mantissa == 0.5).all())  # powers of two
    q = bits.view(torch.float8_e4m3fn).float()
    amax = q.abs().amax(dim=1)
    nonzero = w.abs().amax(dim=1) > 0
    # the scale is the smallest power of two that fits the row: its max lands in [224, 448]
    assert bool((amax[nonzero] >= E4M3_MAX / 2).all() and (amax <= E4M3_MAX).all())
    assert scale[5] == 1.0 and scale[7] == 2.0**-3 and float(amax[7]) == E4M3_MAX
    err = (dequantize_fp8(bits, scale, torch.float64) - w.double()).abs()
    bound = torch.maximum(2.0**-4 * w.double().abs(), 2.0**-10 * scale.double()[:, None])
    assert bool((err <= bound).all())
    assert float((err / w.double().abs().clamp_min(1e-30)).max()) > 2.0**-6  # 8 bits, not 16


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fp8_linear_equals_the_float64_layer_of_its_dequantised_weight(dtype, tol):
    linear = torch.nn.Linear(80, 96).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(_weight() * 1e-2)
    layer = Fp8Linear.from_linear(linear)
    ref_weight = dequantize_fp8(layer.weight_fp8, layer.weight_scale, torch.float64)
    assert torch.equal(layer.dequantized_weight(dtype).double(), ref_weight)  # exact in dtype
    x = torch.randn(3, 7, 80, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 7, 96)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.linear(x64, ref_weight, layer.bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    out.double().pow(2).sum().backward()
    ref.pow(2).sum().backward()
    torch.testing.assert_close(
        x.grad.double(), x64.grad, rtol=tol, atol=tol * x64.grad.abs().max().item()
    )
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("flavor", ["wan_tiny", "hunyuan_tiny"])
def test_a_model_stores_its_block_linears_in_fp8_and_computes_with_them(flavor):
    dit = build(flavor, mode="full").requires_grad_(False)
    names = frozen_linear_names(dit)
    assert names and all(".norm" not in n for n in names)
    blocks = [
        n
        for n, m in dit.transformer.named_modules()
        if m in dit.adapter.sta_blocks(dit.transformer)
    ]
    assert all(any(n.startswith(b + ".") for b in blocks) for n in names)
    expected = {
        "wan_tiny": "blocks.0.ffn.net.2",
        "hunyuan_tiny": "single_transformer_blocks.0.proj_mlp",
    }
    assert expected[flavor] in names and "proj_out" not in names  # the model's own output stays
    reference = build(flavor, mode="full")  # the same weights, as plain layers
    apply_fp8_weights(dit)
    modules = dict(dit.transformer.named_modules())
    with torch.no_grad():
        for name in names:
            assert isinstance(modules[name], Fp8Linear)
            reference.transformer.get_submodule(name).weight.copy_(
                modules[name].dequantized_weight()
            )
    unquantised = [m for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    assert unquantised  # embeddings, modulation, output projection
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(run(dit, batch), run(reference, batch), rtol=1e-5, atol=1e-5)


def test_a_lora_base_in_fp8_passes_gradients_to_the_adapter_only():
    dit, trainable = build_lora()
    base_names = apply_fp8_weights(dit)
    assert base_names and all(n.endswith(".base_layer") or "attn1" not in n for n in base_names)
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == set(trainable)
    # the adapter off is the FP8 base: the same model without LoRA, stored in FP8
    base = build("wan_tiny", window=[3, 3, 3]).requires_grad_(False)
    apply_fp8_weights(base)
    batch = make_batch()
    dit.transformer.disable_adapters()
    with torch.no_grad():
        torch.testing.assert_close(run(dit, batch), run(base, batch), rtol=0, atol=0)
    dit.transformer.enable_adapters()
    out = run(dit, batch)
    assert not torch.allclose(out, run(base, batch), atol=1e-4)
    out.pow(2).mean().backward()
    grads = {n for n, p in dit.named_parameters() if p.grad is not None}
    assert grads == set(trainable)
    first = dit.transformer.blocks[0].attn1.to_q.lora_A["default"].weight.grad
    assert float(first.abs().sum()) > 0  # through every later FP8 layer to the first adapter
    # the merged export holds the dequantised base plus the update, under plain names
    merged = merged_state_dict(dit)
    layer = dit.transformer.blocks[1].ffn.net[2]
    assert isinstance(layer, Fp8Linear)
    assert torch.equal(merged["blocks.1.ffn.net.2.weight"], layer.dequantized_weight())
    assert not any("weight_fp8" in k or "weight_scale" in k for k in merged)


def _check_scaled_mm(device: str) -> None:
    """The FP8 matmul of a bf16 layer against the float64 layer of its dequantised weight."""
    linear = torch.nn.Linear(256, 384, device=device, dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(100, 4, 256, device=device, dtype=torch.bfloat16).transpose(0, 1)
    x.requires_grad_(True)  # (4, 100, 256), not contiguous
    assert layer.uses_scaled_mm(x, torch.bfloat16) and not layer.uses_scaled_mm(x, torch.float32)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 100, 384)
    ref = F.linear(
        x.detach().double(), layer.dequantized_weight(torch.float64), layer.bias.double()
    )
    # the activations are quantised per token to e4m3 too: about 2**-5 relative error
    err = float((out.detach().double() - ref).norm() / ref.norm())
    assert 2.0**-8 < err < 2.0**-4
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ layer.dequantized_weight(torch.bfloat16))


def test_the_fp8_matmul_path_on_the_cpu(monkeypatch):
    """The layer takes ``torch._scaled_mm`` only on CUDA; torch's CPU kernel checks the rest."""
    assert not Fp8Linear.from_linear(torch.nn.Linear(16, 16)).uses_scaled_mm(
        torch.zeros(1, 16, dtype=torch.bfloat16), torch.bfloat16
    )
    monkeypatch.setattr(Fp8Linear, "uses_scaled_mm", lambda self, x, dtype: dtype == torch.bfloat16)
    _check_scaled_mm("cpu")


def test_the_fp8_matmul_path_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("torch._scaled_mm needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("rowwise-scaled FP8 matmul needs compute capability >= 8.9")
    _check_scaled_mm("cuda")
