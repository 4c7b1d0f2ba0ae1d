"""Run under torchrun: sampling on sp x cfg ranks against one process.

Usage: torchrun --nproc-per-node N sample_check.py OUT_DIR SPxCFG [SPxCFG ...] -- COMMAND
[OVERRIDE ...], each layout's sp * cfg = N. For each layout and the tiny Wan, HunyuanVideo,
two-expert Wan 2.2 and Wan 2.2 TI2V image-to-video adapters (random weights, per-head STA
windows, a canvas of 45 tokens so the last sp shard is padded, guidance on; TI2V from one
image's first-frame latent, with a per-token timestep), ``sample_model`` with the launch's
dims gives the latents one process gives, the same on every rank, and only rank 0 writes.
Prints one JSON line on rank 0: ``{"<sp>x<cfg>/<flavor>": {"latents": relative error to one
process, "ranks": the largest difference between ranks, "written": which ranks wrote
samples.json}}``. Then runs
``stafinetune-COMMAND OVERRIDE ...`` (``sample`` or ``eval``) on these ranks, as torchrun
would start it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from stafinetune.data import DataConfig
from stafinetune.inference.generate import SampleConfig, sample_model
from stafinetune.models import AttentionConfig, ModelConfig
from stafinetune.parallel import ParallelDims, all_gather_object
from stafinetune.parallel.sampling import SampleParallelConfig, init_sampling, sampling_dims

# Wan, HunyuanVideo (text joins the sequence), Wan 2.2's two experts (the switch at step 2)
# and Wan 2.2 TI2V's first-frame image-to-video mode (one timestep per token)
FLAVORS = ("wan_tiny", "hunyuan_tiny", "wan22_tiny_experts", "wan22_tiny_ti2v")
PROMPTS = ["a red circle moving right", "a blue square moving up at 2 pixels per frame"]
# 9 frames of 48 x 80 pixels: latents (3, 6, 10), a 3 x 3 x 5 token canvas, 3 x 2 x 3 tiles
DATA = DataConfig(num_frames=9, height=48, width=80, text_len=8)
HEADS = [[2, 1, 2], [3, 2, 3], [1, 2, 1], [2, 2, 3]]  # one window per head, both STA layers
ATTENTION = AttentionConfig(
    mode="sta", backend="reference", tile=[1, 2, 2], head_windows=[HEADS, HEADS[::-1]],
    dense_first_steps=1,
)  # fmt: skip
SAMPLE = SampleConfig(
    steps=3, guidance_scale=3.0, negative_prompt="blurry", seed=4, device="cpu", warmup=False
)


def configs(flavor: str, out: Path) -> tuple:
    """(model, attention, data, sample configs, prompts) of ``flavor``; random weights drawn
    from sample.seed on every rank. TI2V conditions both prompts on one image written to
    ``out`` (the latent of that first frame alone, 48 channels: ``data.image_encoder=vae``)."""
    if flavor != "wan22_tiny_ti2v":
        return ModelConfig(flavor=flavor), ATTENTION, DATA, SAMPLE, PROMPTS
    out.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, DATA.width)  # a horizontal ramp in three shades, (H, W, 3)
    pixels = np.stack([np.tile(ramp, (DATA.height, 1)) / k for k in (1, 2, 3)], axis=-1)
    image = out / "first_frame.png"
    Image.fromarray(pixels.astype(np.uint8)).save(image)
    data = dataclasses.replace(DATA, image_encoder="vae", latent_channels=48)
    sample = dataclasses.replace(SAMPLE, images=[str(image)])
    return ModelConfig(flavor=flavor, image_to_video=True), ATTENTION, data, sample, PROMPTS


def one_process(flavor: str, out: Path) -> torch.Tensor:
    """(N, C, T, H, W) latents of the prompts sampled by this process alone."""
    videos, _ = sample_model(*configs(flavor, out), out, checkpoint=None, progress=False)
    return torch.stack([v.latents for v in videos])


def check(
    flavor: str, dims: ParallelDims, out: Path, one: torch.Tensor | None
) -> dict[str, object]:
    """Sample with ``dims``: the report of the module docstring on rank 0 (``one``: the
    one-process latents there), {} on the others."""
    rank_out = out / f"rank{dims.rank}"
    videos, settings = sample_model(
        *configs(flavor, rank_out), rank_out, checkpoint=None, progress=False, dims=dims
    )
    assert settings["parallel"] == {"sp": dims.sp, "cfg": dims.dp_size}, settings["parallel"]
    latents = torch.stack([v.latents for v in videos])
    every = all_gather_object(latents)
    dist.barrier()  # rank 0 has written
    written = [r for r in range(dims.world_size) if (out / f"rank{r}" / "samples.json").exists()]
    if not dims.is_main:
        return {}
    assert one is not None
    return {
        "latents": float((latents - one).norm() / one.norm()),
        "ranks": max(float((x - latents).abs().max()) for x in every),  # type: ignore[operator]
        "written": written,
    }


def main() -> None:
    split = sys.argv.index("--")
    out, layouts, command = Path(sys.argv[1]), sys.argv[2:split], sys.argv[split + 1 :]
    first = SampleParallelConfig(*(int(n) for n in layouts[0].split("x")))
    dims = init_sampling(first, "cpu")
    report = {}
    for flavor in FLAVORS:
        # the others wait for rank 0's reference at their first collective
        one = one_process(flavor, out / "one" / flavor) if dims.is_main else None
        for layout in layouts:
            sp, cfg = (int(n) for n in layout.split("x"))
            layout_dims = sampling_dims(SampleParallelConfig(sp=sp, cfg=cfg), dims.world)
            report[f"{layout}/{flavor}"] = check(flavor, layout_dims, out / layout / flavor, one)
    if dims.is_main:
        print(json.dumps(report), flush=True)
    sys.argv = [f"stafinetune-{command[0]}", *command[1:]]
    importlib.import_module(f"stafinetune.commands.{command[0]}").main()  # ends the group


if __name__ == "__main__":
    main()
