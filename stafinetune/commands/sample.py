"""``stafinetune-sample`` / ``python -m stafinetune sample``: prompts in, mp4s out.

Composes ``conf/sample.yaml`` (the shared ``model``, ``attention``, ``data`` and ``logging``
groups plus the ``sample`` section, :class:`~stafinetune.inference.generate.SampleConfig`) and writes
``<run dir>/videos/<k>_<slug>.mp4`` and ``<run dir>/samples.json``::

    stafinetune-sample                                     # the tiny teacher, STA, 2 data captions
    stafinetune-sample attention.mode=full sample.prompts=prompts.txt
    stafinetune-sample sample.checkpoint=outputs/<run>     # the run's export (or newest checkpoint)
    stafinetune-sample model=wan2.1_t2v_1.3b model.path=/models/Wan2.1-T2V-1.3B-Diffusers \\
        attention=sta_720p attention.strategy_path=strategy.json attention.dense_first_steps=15 \\
        data=folder data.manifest=... sample.prompts=prompts.txt sample.steps=50 \\
        sample.shift=5 sample.guidance_scale=5 ...

On several GPUs, under torchrun with exactly ``parallel.sp x parallel.cfg`` processes (every
rank samples every video together; rank 0 writes)::

    torchrun --standalone --nproc-per-node 4 -m stafinetune sample parallel.sp=2 \\
        parallel.cfg=2 sample.guidance_scale=5 ...

Bad input (a missing prompts file, a checkpoint that does not fit the model) ends the
command with exit code 2 and one line naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from stafinetune.config import LoggingConfig, resolved_dict
from stafinetune.data import DataConfig
from stafinetune.errors import user_errors
from stafinetune.inference.generate import (
    GeneratedVideo,
    SampleConfig,
    resolve_prompts,
    sample_model,
)
from stafinetune.models import AttentionConfig, ModelConfig
from stafinetune.parallel import cleanup
from stafinetune.parallel.sampling import SampleParallelConfig, init_sampling
from stafinetune.training.tracking import build_tracker

from .cli import hydra_command, shared_run_dir


@dataclass
class SampleJobConfig:
    """Root of ``conf/sample.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(backend="none"))
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: SampleParallelConfig = field(default_factory=SampleParallelConfig)

    def __post_init__(self) -> None:
        self.parallel.check_guidance(self.sample.guidance_scale)


def register_sample_config() -> None:
    """Register the root schema of ``conf/sample.yaml`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="sample_config", node=SampleJobConfig)


def run(job: SampleJobConfig, run_dir: Path) -> None:
    """Sample every prompt and write the videos, ``samples.json`` and the tracker's records
    (rank 0 of a torchrun launch; the other ranks only sample)."""
    with user_errors():  # sample.device=cuda without a GPU, a launch of the wrong size
        dims = init_sampling(job.parallel, job.sample.device)
    try:
        run_dir = shared_run_dir(run_dir)
        if dims.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(job), run_dir / "config.yaml")
        progress = job.logging.progress and dims.is_main
        prompts = resolve_prompts(
            job.sample, job.data, verbose=progress, rank=dims.rank, world_size=dims.world_size
        )
        videos, settings = sample_model(
            job.model, job.attention, job.data, job.sample, prompts, run_dir,
            checkpoint=job.sample.checkpoint, progress=progress, dims=dims,
        )  # fmt: skip
    finally:
        cleanup()
    if not dims.is_main:
        return
    tracker = build_tracker(job.logging, is_main=True, directory=run_dir, config=resolved_dict(job))
    try:
        columns = ["index", "prompt", "seed", "file", "latency_s", "attention_s"]
        rows = [[v.index, v.prompt, v.seed, v.file, v.latency_s, v.attention_s] for v in videos]
        tracker.log_table("samples", columns, rows, step=0)
        for v in videos:
            tracker.log_video(f"videos/{v.index}", run_dir / "videos" / v.file, 0, caption=v.prompt)
        tracker.log(_latency_summary(videos), step=0)
    finally:
        tracker.finish()
    summary = _latency_summary(videos)
    print(
        f"\n{len(videos)} videos  {run_dir / 'videos'}\n"
        f"samples       {run_dir / 'samples.json'}\n"
        f"weights       {settings['weights']}; attention {settings['attention']}, "
        f"video density {settings['video_density']:.1%}\n"
        f"latency       {summary['sample/latency_s']:.3f} s a video (mean of {len(videos)}), "
        f"attention {summary['sample/attention_share']:.0%} of it",
        flush=True,
    )


def _latency_summary(videos: list[GeneratedVideo]) -> dict[str, float]:
    latency = sum(v.latency_s for v in videos)
    return {
        "sample/latency_s": latency / len(videos),
        "sample/attention_share": sum(v.attention_s for v in videos) / max(latency, 1e-12),
    }


register_sample_config()
main = hydra_command(run, config_name="sample", name="sample")

if __name__ == "__main__":
    main()
