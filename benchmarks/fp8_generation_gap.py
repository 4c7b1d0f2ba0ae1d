"""The FP8 forward's rounding on the embedded default's generation gap, emulated on the CPU.

The FP8 kernel (``sta_kernels.gluon_fp8``) needs a Hopper GPU, head dim 128 and tiles of
64-token frames; the embedded default (head dim 32, a 5x8x8-token canvas, tile 1x2x2) is
outside that scope, so its sampling cannot run the kernel. This script applies the kernel's
roundings in float64 instead (q per token; k shifted by the mean of every 8th video key and
scaled per block of 128 keys; v scaled by a power of two per block; p rounded to e4m3 as
exp2(x - m + 8 + e - E), against the row's final maximum where the kernel uses its running
one) inside every STA call of the sampler, and reports how far that moves the generated
latents, next to the gap STA itself opens against the dense teacher:

    PYTHONPATH=kernels python benchmarks/fp8_generation_gap.py
    PYTHONPATH=kernels python benchmarks/fp8_generation_gap.py --checkpoint outputs/<run>/export

Latent gaps are ``mean((latents - reference)^2)`` (the ``latent_gap`` of ``stafinetune-eval``)
over the data's validation captions, 20 steps, the same seeds for every model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sta_kernels.geometry import normalize_window
from sta_kernels.reference import sta_dense_mask, text_lengths

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stafinetune.commands.sample import SampleJobConfig  # noqa: E402
from stafinetune.inference.generate import resolve_prompts, sample_model  # noqa: E402
from stafinetune.metrics import latent_gap  # noqa: E402
from stafinetune.models import attention as attention_module  # noqa: E402

E4M3_MAX = 448.0
BLOCK = 128  # keys per k / v scale, as in the kernel


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3 (nearest, ties to even), back in ``x``'s dtype."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, nb, BLOCK, H, D), zero padded to whole blocks."""
    batch, seq, heads, dim = x.shape
    pad = -seq % BLOCK
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(batch, -1, BLOCK, heads, dim)


def fp8_emulated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, canvas: Sequence[int],
    tile: Sequence[int], window, text_len=0, backend: str = "auto", fp8: bool = False,
) -> torch.Tensor:
    """STA with the FP8 kernel's roundings, in float64 (same call as
    ``sliding_tile_attention``; ``backend`` and ``fp8`` are ignored). (B, S, H, D) in/out."""
    dtype = q.dtype
    q, k, v = (x.double() for x in (q, k, v))
    batch, seq, heads, dim = q.shape
    num_video = math.prod(canvas)
    q_scale = q.abs().amax(-1, keepdim=True).clamp_min(1e-30) / E4M3_MAX
    qd = e4m3(q / q_scale) * q_scale
    kb = _blocks(k - k[:, :num_video:8].mean(1, keepdim=True))
    k_scale = kb.abs().amax((2, 4), keepdim=True).clamp_min(1e-30) / E4M3_MAX
    kd = (e4m3(kb / k_scale) * k_scale).flatten(1, 2)[:, :seq]
    vb = _blocks(v)
    v_exp = torch.ceil(torch.log2(vb.abs().amax((2, 4), keepdim=True) / E4M3_MAX)).clamp_min(-20)
    v8 = e4m3(vb / torch.exp2(v_exp)).flatten(1, 2)[:, :seq]  # (B, S, H, D)
    top = v_exp.amax(1, keepdim=True)  # (B, 1, 1, H, 1): E
    boost = torch.exp2(8.0 + v_exp - top).expand_as(vb[..., :1]).flatten(1, 2)[:, :seq]
    windows = normalize_window(window, heads)
    lengths = text_lengths(text_len, batch, seq - num_video)
    mask = sta_dense_mask(canvas, tile, windows, lengths, seq)  # (B, H, S, S)
    scale = dim**-0.5
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    s = s.masked_fill(~mask, -math.inf)
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)  # rows without keys: p = 0
    p = torch.exp(s - m)  # (B, H, S, S)
    p8 = e4m3(p * boost[..., 0].permute(0, 2, 1)[:, :, None, :])  # p 256 2^(e - E), e4m3
    o = torch.einsum("bhqk,bkhd->bqhd", p8, v8) * torch.exp2(top).view(batch, 1, heads, 1)
    denom = (256.0 * p.sum(-1)).permute(0, 2, 1)[..., None]  # (B, S, H, 1)
    return (o / denom.clamp_min(1e-300)).to(dtype)


def _job(checkpoint: str | None, overrides: list[str]) -> SampleJobConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="sample", overrides=overrides)
    job = OmegaConf.to_object(cfg)
    job.sample.checkpoint = checkpoint
    job.sample.warmup = False
    job.sample.device = "cpu"
    return job


def _latents(job: SampleJobConfig, prompts: list[str], out: Path, name: str, emulate: bool):
    patch = (mock.patch.object(attention_module, "sliding_tile_attention", fp8_emulated_attention)
             if emulate else contextlib.nullcontext())
    with patch:
        videos, _ = sample_model(job.model, job.attention, job.data, job.sample, prompts,
                                 out / name, checkpoint=job.sample.checkpoint, progress=False,
                                 name=name)
    return [v.latents for v in videos]


def _gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(latent_gap(x, y) for x, y in zip(a, b, strict=True)) / len(a)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None,
                        help="a run directory or export to sample as the STA model "
                             "(default: the shipped teacher with the default window)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/sample.yaml")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dense_job = _job(None, [*args.overrides, "attention.mode=full"])
    sta_job = _job(args.checkpoint, args.overrides)
    prompts = resolve_prompts(sta_job.sample, sta_job.data, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        dense = _latents(dense_job, prompts, out, "dense", emulate=False)
        sta = _latents(sta_job, prompts, out, "sta", emulate=False)
        sta_fp8 = _latents(sta_job, prompts, out, "sta_fp8", emulate=True)
    report = {
        "model": args.checkpoint or "shipped teacher (conf/sample.yaml)",
        "prompts": prompts, "steps": sta_job.sample.steps,
        "dense_first_steps": sta_job.attention.dense_first_steps,
        "gap_sta_to_dense": _gap(sta, dense),
        "gap_sta_fp8_to_dense": _gap(sta_fp8, dense),
        "gap_sta_fp8_to_sta": _gap(sta_fp8, sta),
        "latent_mean_square": sum(float(x.pow(2).mean()) for x in sta) / len(sta),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
