"""LoRA finetuning of the STA student through ``peft``, exported for diffusers pipelines.

``train.trainable=lora`` puts a LoRA adapter on the student's transformer (by default on the
attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of the STA layers: Wan's
video self-attention, HunyuanVideo's joint attention) and trains only the adapter. The
teacher is then the student's own base model, its adapter off and its attention dense
(:class:`BaseModelTeacher`), not a second copy of the weights.

- :func:`apply_lora`: inject the adapter (``transformer.add_adapter``, diffusers' peft
  integration) and freeze everything else.
- :func:`adapter_state_dict` / :func:`load_adapter_state_dict`: the adapter's tensors under
  the student's parameter names, for checkpoints (exact resume).
- :class:`BaseModelTeacher`: the LoRA student's base model as its frozen dense teacher.
- :func:`export_lora`: ``pytorch_lora_weights.safetensors`` in diffusers' key naming with
  the adapter config as metadata (what ``pipe.load_lora_weights(dir)`` reads), and on request
  a merged plain diffusers transformer folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from stafinetune.models import VideoDiT
from stafinetune.models.bf16 import Bf16Linear
from stafinetune.models.dit import save_attention_config
from stafinetune.models.fp8 import dequantize_state_dict

ADAPTER = "default"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def lora_target_modules(dit: VideoDiT, targets: Sequence[str] | None = None) -> list[str]:
    """Names (relative to ``dit.transformer``) of the linear layers the adapter goes on.

    Args:
        dit: the student.
        targets: ``None``: ``DEFAULT_TARGETS`` inside the STA layers' attention modules only
            (not Wan's text cross-attention). Otherwise module-name suffixes, as peft matches
            them: a linear layer is adapted when its name equals a target or ends with
            ``"." + target`` (e.g. ``["to_q", "to_v", "ffn.net.2"]``).
    Raises:
        ValueError naming ``train.lora_targets`` when nothing matches.
    """
    linear = {
        name: module
        for name, module in dit.transformer.named_modules()
        if isinstance(module, nn.Linear)
    }
    if targets is None:
        path = {id(m): n for n, m in dit.transformer.named_modules()}
        prefixes = [path[id(attn)] for attn in dit.sta_layers()]
        names = [f"{p}.{t}" for p in prefixes for t in DEFAULT_TARGETS if f"{p}.{t}" in linear]
    else:
        names = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(
            f"train.lora_targets={None if targets is None else list(targets)} matches no linear "
            "layer of the model"
        )
    return names


def apply_lora(
    dit: VideoDiT,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Put a LoRA adapter on ``dit.transformer`` and freeze every other parameter.

    The adapter starts as the identity (B = 0), so the model's outputs are unchanged.
    Args:
        rank: LoRA rank r (``train.lora_rank``).
        alpha: scaling numerator; the update is ``alpha / r * B @ A`` (``None``: ``rank``).
        targets: see :func:`lora_target_modules`.
        dropout: dropout on the adapter's input (``train.lora_dropout``).
        seed: A's random initialisation depends on this alone, not on what drew from the
            global random state before (``train.seed``).
    Returns:
        the names of the trainable (adapter) parameters of ``dit``.
    """
    from peft import LoraConfig

    if has_lora(dit):
        raise ValueError("the model already holds a LoRA adapter")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(rank if alpha is None else alpha),
        lora_dropout=float(dropout),
        target_modules=lora_target_modules(dit, targets),
        init_lora_weights=True,
    )
    device = next(dit.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        dit.transformer.add_adapter(config, adapter_name=ADAPTER)
    names = []
    for name, param in dit.named_parameters():
        keep = _LORA_KEY.search(name) is not None
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def has_lora(dit: VideoDiT) -> bool:
    """Whether ``dit``'s transformer holds the LoRA adapter of :func:`apply_lora`."""
    return ADAPTER in (getattr(dit.transformer, "peft_config", None) or {})


def adapter_state_dict(dit: VideoDiT) -> dict[str, torch.Tensor]:
    """The adapter's tensors under ``dit``'s parameter names (for checkpoints)."""
    return {n: p.detach() for n, p in dit.named_parameters() if _LORA_KEY.search(n)}


def load_adapter_state_dict(dit: VideoDiT, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`adapter_state_dict` tensors back into ``dit``'s adapter (names must match)."""
    params = {n: p for n, p in dit.named_parameters() if _LORA_KEY.search(n)}
    if params.keys() != state.keys():
        missing, unexpected = (
            sorted(params.keys() - state.keys()),
            sorted(state.keys() - params.keys()),
        )
        raise KeyError(
            f"the LoRA checkpoint does not fit the model's adapter (train.lora_rank, "
            f"train.lora_targets): missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _transformer_tensors(
    dit: VideoDiT, state: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The transformer's tensors under its own names: from ``state`` (keys as in
    ``dit.state_dict()``, e.g. gathered to rank 0 from a sharded engine) or from the module."""
    if state is None:
        return {k: v.detach() for k, v in dit.transformer.state_dict().items()}
    prefix = "transformer."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def save_lora_adapter(
    dit: VideoDiT,
    out_dir: str | os.PathLike[str],
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter as ``<out_dir>/pytorch_lora_weights.safetensors`` (diffusers' format).

    Keys are ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``; the adapter config
    (rank, alpha, targets) is stored as safetensors metadata, so ``pipe.load_lora_weights(
    out_dir)`` of a ``WanPipeline`` / ``HunyuanVideoPipeline`` rebuilds the same adapter.
    ``state``: the full weights when the module itself is sharded (FSDP2, ZeRO-3).
    """
    from peft.utils import get_peft_model_state_dict

    if not has_lora(dit):
        raise ValueError("the model holds no LoRA adapter to export")
    transformer = dit.transformer
    layers = get_peft_model_state_dict(
        transformer, state_dict=_transformer_tensors(dit, state), adapter_name=ADAPTER
    )
    layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
    os.makedirs(out_dir, exist_ok=True)
    dit.adapter.lora_saver().save_lora_weights(
        save_directory=out_dir,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER].to_dict(),
        weight_name=LORA_FILE,
    )
    return Path(out_dir) / LORA_FILE


@torch.no_grad()
def merged_state_dict(
    dit: VideoDiT, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The transformer's state dict with the adapter merged (``W + alpha / r * B @ A``), under
    the plain diffusers names (``...to_q.weight``); the model itself is not changed. A base
    stored in FP8 or bf16 (``train.frozen_weights``) is merged from the weights the adapter
    was trained on, in fp32 like the rest of the model.
    ``state``: the full weights when the module itself is sharded."""
    from peft.tuners.lora import LoraLayer

    layers = {
        name: module
        for name, module in dit.transformer.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }
    tensors = dequantize_state_dict(_transformer_tensors(dit, state))  # an FP8 base: as trained
    stored_bf16 = {  # a bf16 base: back to the model's fp32, exactly
        f"{name}.{p}" for name, m in dit.transformer.named_modules() if isinstance(m, Bf16Linear)
        for p in ("weight", "bias")
    }  # fmt: skip
    tensors = {k: v.float() if k in stored_bf16 else v for k, v in tensors.items()}
    merged = {}
    for key, value in tensors.items():
        if _LORA_KEY.search(key):
            continue
        if ".base_layer." in key:
            module, rest = key.split(".base_layer.")
            key = f"{module}.{rest}"
            if rest == "weight":
                a = tensors[f"{module}.lora_A.{ADAPTER}.weight"].float()  # (r, in)
                b = tensors[f"{module}.lora_B.{ADAPTER}.weight"].float()  # (out, r)
                delta = (b @ a) * layers[module].scaling[ADAPTER]  # (out, in)
                if layers[module].fan_in_fan_out:
                    delta = delta.T
                value = value + delta.to(value)  # a swapped block's base waits on the host
        merged[key] = value
    return merged


def save_merged_transformer(
    dit: VideoDiT,
    path: str | os.PathLike[str],
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the merged student as a plain diffusers transformer folder (plus the attention
    settings in ``stafinetune_attention.json``, as ``VideoDiT.save_pretrained`` does)."""
    transformer = dit.transformer
    with torch.device("meta"):  # no second copy of the weights: the merged tensors are assigned
        plain = type(transformer).from_config(transformer.config)
    plain.load_state_dict(merged_state_dict(dit, state), assign=True)
    os.makedirs(path, exist_ok=True)
    plain.save_pretrained(path, safe_serialization=True)
    save_attention_config(path, dit.attention_cfg)


def export_lora(
    dit: VideoDiT,
    out_dir: str | os.PathLike[str],
    *,
    merge: bool,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """The LoRA student's export: the adapter in ``out_dir`` and, with ``merge``, the merged
    transformer in ``out_dir/transformer`` (``train.lora_merge_export``). ``state``: the full
    weights (keys as in ``dit.state_dict()``) when ``dit`` is sharded."""
    save_lora_adapter(dit, out_dir, state)
    if merge:
        save_merged_transformer(dit, Path(out_dir) / "transformer", state)


class BaseModelTeacher(nn.Module):
    """A LoRA student's base model as its dense teacher: every call runs the student's own
    transformer with the adapter switched off and dense attention, without gradients.

    The base weights are frozen under LoRA, so this is the teacher a separate copy of them
    would be, at no extra memory; it takes the student's sharding and sequence split with it.
    It answers what the distillation methods ask of a teacher (``capture``, ``parameters``,
    ``attention``, ``family``...) by the student's; the student is not a registered submodule,
    so its parameters are counted once.

    Args:
        student: the LoRA student (an adapter already applied).
        module: what to call for its forward (the student or its sharded form; not a DDP
            wrapper, whose bookkeeping belongs to the student's own calls).
    """

    def __init__(self, student: VideoDiT, module: nn.Module | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "student", student)
        object.__setattr__(self, "_call", module if module is not None else student)

    @torch.no_grad()
    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        """The student's forward with the adapter off and every layer dense."""
        transformer = self.student.transformer
        transformer.disable_adapters()
        try:
            with self.student.binding.dense():
                return self._call(*args, **kwargs)
        finally:
            transformer.enable_adapters()

    def capture(self, *args: object, **kwargs: object) -> object:
        """The student's ``capture`` (its attention outputs, recorded in this forward)."""
        return self.student.capture(*args, **kwargs)

    def parameters(self, recurse: bool = True):  # type: ignore[override]
        """The student's parameters (where and in which dtype the teacher computes)."""
        return self.student.parameters(recurse)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.student, name)
