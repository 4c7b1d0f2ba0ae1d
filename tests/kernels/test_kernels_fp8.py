"""The FP8 forward (``sta_kernels.kernels.gluon_fp8``): its quantisation and the kernel.

The k/v quantisation kernel (triton) runs everywhere, in the interpreter on CPU: its packed
e4m3 operands must equal, bit for bit, the same quantisation written in torch, and the
operands they decode to must give the attention of the unquantised inputs within e4m3's
precision.
The Gluon kernel itself needs a Hopper GPU: there it runs against the float64 reference of
the decoded operands and of the original ones. Its sm_90 build is checked in
tests/benchmarks/test_benchmarks_compile_report.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import make_qkv, rel_err

from sta_kernels.kernels import gluon_fp8 as gf
from sta_kernels.reference import sta_reference

TILE = (2, 8, 8)  # two 64-token frames: one packed block per tile
CANVAS = (4, 16, 8)  # 2 x 2 x 1 full tiles, 512 video tokens
TEXT_SLOTS = 150  # two text blocks, the second part padding


def _inputs(device, seed=0):
    q, k, v, _ = make_qkv(2, CANVAS, TEXT_SLOTS, 2, 128, torch.bfloat16, device, seed=seed)
    # a per-channel offset of k, which the shift removes before the per-block scales
    k = (k.float() + 3.0 * torch.linspace(-1, 1, 128, device=device)).to(torch.bfloat16)
    return q, k, v


def _torch_quantize(k, v):
    """``quantize_kv`` written in torch: (k8, k_scale, vt8, v_exp, v_max)."""
    batch, seq, heads, head_dim = k.shape
    video, blocks = gf.packed_blocks(CANVAS, TILE, seq)
    tok = gf.packed_tokens(CANVAS, TILE, seq)  # (blocks * 128,)
    valid = tok >= 0

    def rows(x):  # (B, H, blocks, 128, D) float32 in packed order, padding rows 0
        out = torch.zeros(batch, heads, tok.numel(), head_dim)
        out[:, :, valid] = x[:, tok[valid]].float().permute(0, 2, 1, 3)
        return out.view(batch, heads, blocks, gf.BLOCK, head_dim)

    f8 = torch.float8_e4m3fn
    shift = k[:, : CANVAS[0] * CANVAS[1] * CANVAS[2] : 8].mean(dim=1, dtype=torch.float32)
    kb = torch.where(valid.view(blocks, gf.BLOCK)[..., None],
                     rows(k) - shift[:, :, None, None, :], 0.0)
    k_scale = kb.abs().amax((-1, -2)).clamp_min(1e-30) / 448.0  # (B, H, blocks)
    k8 = (kb / k_scale[..., None, None]).to(f8).view(batch, heads, -1, head_dim)
    vb = rows(v)
    mantissa, exp = torch.frexp(vb.abs().amax((-1, -2)) / 448.0)  # m in [0.5, 1)
    exp = (exp - (mantissa == 0.5).to(exp.dtype)).float().clamp_min(-20)  # ceil(log2)
    v8 = (vb / torch.exp2(exp)[..., None, None]).to(f8).view(batch, heads, -1, head_dim)
    r = torch.arange(tok.numel())
    column = (r // 16) * 16 + ((r // 2) % 4) * 4 + ((r // 8) % 2) * 2 + r % 2
    vt8 = torch.empty_like(v8.transpose(2, 3))
    vt8[..., column] = v8.transpose(2, 3)
    top = exp.amax(-1, keepdim=True)
    return k8, k_scale, vt8, exp - top, torch.exp2(top[..., 0])


def test_quantize_kv_matches_torch_bitwise(triton_device):
    q, k, v = _inputs(triton_device)
    v[0, gf.packed_tokens(CANVAS, TILE, q.shape[1])[: gf.BLOCK]] *= 1e-3  # block 0: small v
    ops = gf.quantize_kv(k, v, CANVAS, TILE)
    want = _torch_quantize(k.cpu(), v.cpu())
    got = (ops.k8, ops.k_scale, ops.vt8, ops.v_exp, ops.v_max)
    for name, g, w in zip(("k8", "k_scale", "vt8", "v_exp", "v_max"), got, want, strict=True):
        g = g.cpu()
        assert g.shape == w.shape, name
        if g.dtype == torch.float8_e4m3fn:
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0, msg=name)
    assert (ops.video_blocks, ops.blocks) == gf.packed_blocks(CANVAS, TILE, q.shape[1])
    assert ops.v_exp[0, :, 0].max() < -5  # block 0 got its own, smaller scale


def test_decoded_operands_keep_the_attention(triton_device):
    """The decoded operands (k without its shift) give the exact attention within e4m3's
    precision: the shift is invisible to the softmax, padding text keys stay masked."""
    q, k, v = _inputs(triton_device, seed=1)
    scale = 128**-0.5
    ops = gf.quantize_kv(k, v, CANVAS, TILE)
    qh, kh, vh = (x.cpu() for x in gf.dequantized(ops, q, CANVAS, TILE))
    for x, ref in ((qh, q), (vh, v)):
        assert rel_err(x, ref.cpu()) < 0.035  # e4m3: 3 mantissa bits
    nv = CANVAS[0] * CANVAS[1] * CANVAS[2]
    window, text = torch.tensor([[1, 2, 1], [2, 1, 1]]), torch.tensor([130, 7])
    args = (CANVAS, TILE, window, text, scale)
    k64 = k.cpu().double()
    exact = sta_reference(q.cpu().double(), k64, v.cpu().double(), *args)[:, :nv]
    decoded = sta_reference(qh, kh, vh, *args)[:, :nv]
    shifted = sta_reference(q.cpu().double(), k64 - k64[:, :nv].mean(1, keepdim=True),
                            v.cpu().double(), *args)[:, :nv]
    assert rel_err(shifted, exact) < 1e-12  # the softmax ignores the shift
    assert rel_err(decoded, exact) < 0.05


def test_quantize_kv_rejects_partial_tiles():
    q = torch.zeros(1, 5 * 16 * 8, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="full tiles"):
        gf.quantize_kv(q, q, (5, 16, 8), TILE)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


# (batch, canvas, per-head windows, text_len, text slots); tile 6x8x8, D = 128
GPU_CASES = {
    "video_only": (1, (12, 16, 32), [[3, 3, 3], [1, 2, 4], [2, 1, 3]], [0], 0),
    "joint_text": (2, (6, 16, 24), [[1, 2, 3], [2, 1, 1]], [130, 0], 200),
}


@pytest.mark.parametrize("consumers", [2, 3])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_fp8_kernel_matches_reference(name, consumers):
    """The kernel (two consumer warpgroups, or three: the default at 6-frame tiles) against
    the float64 reference of its decoded operands (what remains is the e4m3 rounding of p)
    and of the original bf16 inputs."""
    if not (_hopper() and gf.AVAILABLE):
        pytest.skip("the FP8 Gluon kernel needs a Hopper GPU and triton >= 3.6")
    batch, canvas, window, text, slots = GPU_CASES[name]
    tile, dev, scale = (6, 8, 8), torch.device("cuda"), 128**-0.5
    window, text = torch.tensor(window), torch.tensor(text)
    q, k, v, _ = make_qkv(batch, canvas, slots, window.shape[0], 128, torch.bfloat16, dev)
    ops = gf.quantize_kv(k, v, canvas, tile)
    o = torch.zeros_like(q)
    gf.sta_gluon_fp8_video_forward(q, ops, o, window.to(dev, torch.int32),
                                   text.to(dev, torch.int32), canvas, tile, scale,
                                   consumers=consumers)
    nv = canvas[0] * canvas[1] * canvas[2]
    args = (canvas, tile, window, text, scale)
    decoded = sta_reference(*gf.dequantized(ops, q, canvas, tile), *args)
    exact = sta_reference(q.double(), k.double(), v.double(), *args)
    assert o[:, :nv].isfinite().all()
    assert rel_err(o[:, :nv], decoded[:, :nv]) < 0.035  # measured 2.3e-2 to 2.5e-2
    assert rel_err(o[:, :nv], exact[:, :nv]) < 0.07  # measured 5.1e-2 to 5.3e-2
    assert not o[:, nv:].any()  # text query rows are the caller's


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_fp8_consumer_counts_agree(name):
    """Three consumers (q8 from shared memory, each key block in sequence) and two (q8 in
    registers, the PV matmul one block behind) do the same arithmetic up to fp32 rounding:
    measured 5.4e-6 (video only) and 6.7e-5 (with text) apart on the H200, against
    2.3e-2 to the decoded reference."""
    if not (_hopper() and gf.AVAILABLE):
        pytest.skip("the FP8 Gluon kernel needs a Hopper GPU and triton >= 3.6")
    batch, canvas, window, text, slots = GPU_CASES[name]
    tile, dev = (6, 8, 8), torch.device("cuda")
    q, k, v, _ = make_qkv(batch, canvas, slots, len(window), 128, torch.bfloat16, dev)
    ops = gf.quantize_kv(k, v, canvas, tile)
    window = torch.tensor(window, device=dev, dtype=torch.int32)
    text = torch.tensor(text, device=dev, dtype=torch.int32)
    outs = []
    for consumers in (2, 3):
        o = torch.zeros_like(q)
        gf.sta_gluon_fp8_video_forward(q, ops, o, window, text, canvas, tile, 128**-0.5,
                                       consumers=consumers)
        outs.append(o)
    assert rel_err(outs[1], outs[0]) < 3e-4


@pytest.mark.parametrize("tile,consumers,message", [
    ((4, 8, 8), 3, "3 consumers take query blocks of 3 frames, which tile .4, 8, 8."),
    ((6, 8, 8), 4, "consumers must be 2 or 3"),
])
def test_fp8_forward_refuses_consumers_that_do_not_fit(tile, consumers, message):
    """A consumer count the tile cannot take is refused by name, before any device check."""
    q = torch.zeros(1, 384, 1, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"sta_gluon_fp8_video_forward: {message}"):
        gf.sta_gluon_fp8_video_forward(q, None, q, torch.ones(1, 3, dtype=torch.int32),
                                       torch.zeros(1, dtype=torch.int32), (6, 8, 8), tile,
                                       1.0, consumers=consumers)
