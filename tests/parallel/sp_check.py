"""Run under torchrun with 2 processes: Ulysses sequence parallelism against one process.

For the tiny Wan, HunyuanVideo and HunyuanVideo 1.5 adapters, dense and STA (and Wan 2.1
image-to-video, Wan 2.2 TI2V's first-frame mode, whose timestep is one per token, and Wan
2.2's two experts as one model, with STA), on a canvas whose token count is odd (so the last
shard is padded): the forward output equals the unsharded one, the mean of the ranks'
parameter gradients equals the unsharded gradient (what DDP/FSDP's averaging yields), and the
sp-reduced attention-output MSE equals the plain MSE (not for the two experts: a batch
spanning both is not captured). Prints one JSON line of the largest relative errors on rank 0.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.parallel import ParallelDims, init_world
from stafinetune.parallel.parallelize import sequence_split


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check(
    flavor: str, mode: str, dims: ParallelDims, image_to_video: bool = False
) -> dict[str, float]:
    torch.manual_seed(0)
    attention = AttentionConfig(
        mode=mode, tile=[1, 2, 2], window=[2, 1, 2]
    )  # a 3x2x3 tile grid: sparse
    model_cfg = ModelConfig(flavor=flavor, image_to_video=image_to_video)
    ref_model = build_model(model_cfg, attention)
    sp_model = build_model(model_cfg, attention)
    sp_model.load_state_dict(ref_model.state_dict())
    sequence = sequence_split(sp_model, dims)
    gen = torch.Generator().manual_seed(1)
    batch, length = 2, 6
    x = torch.randn(batch, ref_model.in_channels, 3, 6, 10, generator=gen)  # canvas 3x3x5 = 45
    t = torch.tensor([700.0, 200.0])
    text = torch.randn(batch, length, ref_model.text_dim, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 4:] = False
    pooled = torch.randn(batch, ref_model.pooled_dim or 1, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    image = {}  # image-to-video: the condition channels join before the sequence split
    if image_to_video:  # the clean first frame; a (B, S) timestep, 0 on its 15 tokens
        image = {"image_latents": torch.randn(batch, x.shape[1], 1, 6, 10, generator=gen)}
    elif ref_model.image_dims is not None:
        image = {"image_latents": torch.randn(x.shape, generator=gen),
                 "image_embeds": torch.randn(batch, 5, ref_model.image_dims.embed_dim, generator=gen)}  # fmt: skip
    out = {}
    results = []
    for model, seq in ((ref_model, None), (sp_model, sequence)):
        with model.capture() as store:
            y = model(x, t, text, mask, pooled, **image)
        attn = store[0]
        ref_attn = results[0][2] if results else None
        loss = torch.mean((y - target) ** 2)
        if seq is not None:
            # the attention-output term against the unsharded model's (split like the rank's)
            local_ref = torch.cat(
                [seq.split(ref_attn[:, :45], 1), ref_attn[:, 45:]], dim=1
            ).detach()
            mse = seq.mean_squared_error(attn, local_ref * 0.9, num_video=45)
            plain = torch.mean((ref_attn - ref_attn * 0.9) ** 2)
            out["attn_mse"] = abs(float(mse.detach()) - float(plain)) / float(plain)
            loss = loss + mse
        else:
            loss = loss + torch.mean((attn - attn.detach() * 0.9) ** 2)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads, attn.detach()))
    (y_ref, g_ref, _), (y_sp, g_sp, _) = results
    out["output"] = rel(y_sp, y_ref)
    out["grad"] = grad_error(g_sp, g_ref, dims)
    return out


def grad_error(g_sp: dict, g_ref: dict, dims: ParallelDims) -> float:
    """The largest relative error of the ranks' mean gradient against the unsharded one."""
    assert set(g_sp) == set(g_ref)
    # relative to the whole gradient's scale: a key bias has an exactly-zero true gradient
    # (softmax ignores a shift shared by all keys), so its own relative error is noise
    scale = torch.stack([g.norm() for g in g_ref.values()]).norm()
    worst = 0.0
    for name, g in g_sp.items():
        dist.all_reduce(g)
        err = (g / dims.world_size - g_ref[name]).norm()
        worst = max(worst, float(err / torch.maximum(g_ref[name].norm(), 1e-3 * scale)))
    return worst


def check_experts(dims: ParallelDims) -> dict[str, float]:
    """Wan 2.2's two experts as one ``ExpertDiT`` (``model.expert=both``), STA, a batch with
    one sample on each side of the boundary (timestep 500): output and gradients of both."""
    torch.manual_seed(0)
    attention = AttentionConfig(mode="sta", tile=[1, 2, 2], window=[2, 1, 2])
    ref_model = build_model(ModelConfig(flavor="wan22_tiny_experts"), attention)
    sp_model = build_model(ModelConfig(flavor="wan22_tiny_experts"), attention)
    sp_model.load_state_dict(ref_model.state_dict())
    sequence_split(sp_model, dims)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, ref_model.in_channels, 3, 6, 10, generator=gen)  # canvas 3x3x5 = 45
    t = torch.tensor([700.0, 200.0])  # high-noise expert, then low-noise expert
    text = torch.randn(2, 6, ref_model.text_dim, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    target = torch.randn(x.shape, generator=gen)
    results = []
    for model in (ref_model, sp_model):
        y = model(x, t, text, mask)
        torch.mean((y - target) ** 2).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads))
    (y_ref, g_ref), (y_sp, g_sp) = results
    assert any(n.startswith("experts.high.") for n in g_ref)
    assert any(n.startswith("experts.low.") for n in g_ref)
    return {"output": rel(y_sp, y_ref), "grad": grad_error(g_sp, g_ref, dims)}


def main() -> None:
    world = init_world("cpu")
    dims = ParallelDims(world, sp=world.world_size)
    report = {}
    for flavor in ("wan_tiny", "hunyuan_tiny", "hunyuanvideo15_tiny"):
        for mode in ("full", "sta"):
            report[f"{flavor}/{mode}"] = check(flavor, mode, dims)
    for flavor in ("wan_i2v_tiny", "hunyuanvideo15_i2v_tiny"):  # image tokens join text
        report[f"{flavor}/sta"] = check(flavor, "sta", dims)
    report["wan22_tiny_ti2v/sta"] = check("wan22_tiny_ti2v", "sta", dims, image_to_video=True)
    report["wan22_tiny_experts/sta"] = check_experts(dims)
    if world.is_main:
        print(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
