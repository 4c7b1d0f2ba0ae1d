"""Helpers for the model-adapter tests: tiny random DiTs and default-shaped batches."""

from __future__ import annotations

import torch

from stafinetune.models import AttentionConfig, ModelConfig, VideoDiT, build_model
from stafinetune.models.dit import cast_like_diffusers


def make_batch(
    batch: int = 2, text_lens: tuple[int, ...] = (16, 9), seed: int = 1
) -> dict[str, torch.Tensor]:
    """Latents (B, 16, 5, 16, 16), timestep, text (B, 16, 32) with a padding mask, pooled."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(16)[None, :] < torch.tensor(text_lens[:batch])[:, None]
    return {
        "latents": torch.randn(batch, 16, 5, 16, 16, generator=g),
        "timestep": torch.tensor([37.0, 812.0][:batch]),
        "text": torch.randn(batch, 16, 32, generator=g),
        "text_mask": mask,
        "pooled_text": torch.randn(batch, 32, generator=g),
    }


def run(dit: VideoDiT, b: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    return dit(b["latents"], b["timestep"], b["text"], b["text_mask"], b["pooled_text"], **kwargs)


def build(flavor: str, seed: int = 0, **attention) -> VideoDiT:
    """A tiny DiT with deterministic random weights; attention fields as keyword arguments."""
    attention.setdefault("backend", "reference")
    torch.manual_seed(seed)
    return build_model(ModelConfig(flavor=flavor), AttentionConfig(**attention), device="cpu", dtype=torch.float32)


def build_lora(flavor: str = "wan_tiny") -> tuple[VideoDiT, list[str]]:
    """A tiny STA DiT (window 3x3x3) with a rank-2 LoRA adapter whose B matrices are random
    (not zero, so the adapter changes the output); returns it and its trainable names."""
    from stafinetune.training.lora import apply_lora

    dit = build(flavor, window=[3, 3, 3])
    trainable = apply_lora(dit, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in dit.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return dit, trainable


def original(dit: VideoDiT) -> torch.nn.Module:
    """The untouched diffusers model (its own processors) holding ``dit``'s weights and dtypes."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = WanTransformer3DModel if dit.family == "wan" else HunyuanVideoTransformer3DModel
    ref = cls(**dict(dit.transformer.config))
    cast_like_diffusers(ref, dit.dtype)
    ref.load_state_dict(dit.transformer.state_dict())
    return ref.eval()


def run_original(ref: torch.nn.Module, family: str, b: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Call diffusers directly the way its pipelines do (inputs and guidance in ``dtype``)."""
    b = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in b.items()}
    if family == "wan":
        text = b["text"] * b["text_mask"][..., None]
        return ref(b["latents"], b["timestep"], text, return_dict=False)[0]
    guidance = torch.full((b["latents"].shape[0],), 6.0, dtype=dtype) * 1000.0
    return ref(
        b["latents"], b["timestep"], b["text"], b["text_mask"], b["pooled_text"],
        guidance=guidance, return_dict=False,
    )[0]
