"""``stafinetune-eval`` / ``python -m stafinetune eval``: score videos, or compare models.

Two modes (``mode=auto`` picks ``score`` when ``videos`` is set, else ``compare``):

``score``: every mp4 of a folder with the offline metrics (:mod:`stafinetune.metrics`), into
``<run dir>/metrics.json`` shaped ``{"videos": {file: {metric: value}}, "mean": {metric:
value}}``. A file that cannot be scored is reported by name (on stderr and as ``{"error":
...}`` in ``videos``) and the rest are scored::

    stafinetune-eval videos=outputs/sample/.../videos hydra.run.dir=eval/run1
    stafinetune-eval videos=student/ reference=teacher/ captions=clips.jsonl \\
        dino_path=/weights/dino-vitb16 clip_path=/weights/clip-vit-b-32

``compare``: sample every model of ``compare.models`` with the same prompts and seeds, score
them, measure fidelity to the reference model, latency and attention share, and write
``compare.json``, ``compare.md`` and ``compare.png`` (:mod:`stafinetune.inference.compare`)::

    stafinetune-eval sample.num_prompts=8 'compare.models=[{name: dense, mode: full},
        {name: sta, mode: sta}, {name: distilled, checkpoint: outputs/<run>/export}]'

Compare mode samples on several GPUs as ``stafinetune-sample`` does, under torchrun with
exactly ``parallel.sp x parallel.cfg`` processes (rank 0 scores and writes)::

    torchrun --standalone --nproc-per-node 2 -m stafinetune eval parallel.sp=2 ...

An empty or missing folder, or a missing weights / manifest path, ends the command with exit
code 2 and one line naming the field.
"""

# OmegaConf 2.3 structured configs understand typing.Optional, not PEP 604 unions.
# ruff: noqa: UP045
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from stafinetune.config import LoggingConfig, resolved_dict
from stafinetune.data import DataConfig
from stafinetune.errors import UserError, user_errors
from stafinetune.inference.compare import (
    FIDELITY,
    QUALITY,
    CompareConfig,
    check_models,
    compare_models,
)
from stafinetune.inference.generate import SampleConfig, resolve_prompts
from stafinetune.metrics import METRIC_TABLE, score_folder
from stafinetune.metrics.score import load_captions
from stafinetune.models import AttentionConfig, ModelConfig
from stafinetune.parallel import cleanup, launcher_coordinates
from stafinetune.parallel.sampling import SampleParallelConfig, init_sampling
from stafinetune.training.tracking import build_tracker

from .cli import hydra_command, shared_run_dir

EVAL_MODES = ("auto", "score", "compare")


@dataclass
class EvalJobConfig:
    """Root of ``conf/eval.yaml``.

    Attributes:
        mode: ``auto`` (``score`` when ``videos`` is set, else ``compare``), ``score`` or
            ``compare``.
        videos: score mode: the folder of mp4s to score.
        reference: score mode: a folder of reference mp4s with the same file names (adds
            PSNR, SSIM, MS-SSIM, VMAF).
        captions: score mode: a JSONL manifest (``path``, ``caption``, optional ``motion``)
            or a sample run's ``samples.json`` (``file``, ``prompt``) whose captions give the
            intended motion (adds the motion errors).
        dino_path, clip_path: local transformers folders of DINO / CLIP (exact subject /
            background consistency); None: the pixel proxy, named in the reports.
        sample, compare: compare mode: how videos are sampled, and which models.
        parallel: compare mode: sequence and guidance parallelism of the sampling (a torchrun
            launch of ``parallel.sp x parallel.cfg`` processes).
        model, attention, data: compare mode: the base model, the default attention (each
            compared model overrides its mode and windows), the text and video encoders.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(backend="none"))
    sample: SampleConfig = field(default_factory=SampleConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    parallel: SampleParallelConfig = field(default_factory=SampleParallelConfig)
    mode: str = "auto"
    videos: Optional[str] = None
    reference: Optional[str] = None
    captions: Optional[str] = None
    dino_path: Optional[str] = None
    clip_path: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"mode must be one of {EVAL_MODES}, got {self.mode!r}")
        if self.mode == "score" and self.videos is None:
            raise ValueError("mode=score needs videos=<folder of mp4s>")
        if self.mode == "compare" and self.videos is not None:
            raise ValueError("mode=compare samples its own videos: leave videos unset")
        if self.resolved_mode == "score" and self.parallel.processes > 1:
            raise ValueError(
                "parallel.sp and parallel.cfg split the sampling of mode=compare; mode=score "
                "samples nothing: leave them at 1"
            )
        self.parallel.check_guidance(self.sample.guidance_scale)

    @property
    def resolved_mode(self) -> str:
        """``score`` or ``compare``."""
        if self.mode != "auto":
            return self.mode
        return "score" if self.videos is not None else "compare"


def register_eval_config() -> None:
    """Register the root schema of ``conf/eval.yaml`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="eval_config", node=EvalJobConfig)


def check_inputs(job: EvalJobConfig) -> None:
    """Every path the job names exists, as the field expects; UserError naming it."""
    folders = {"reference": job.reference, "dino_path": job.dino_path, "clip_path": job.clip_path}
    if job.resolved_mode == "score":
        folders["videos"] = job.videos
    for name, value in folders.items():
        if value is not None and not Path(value).expanduser().is_dir():
            raise UserError(f"{name}={value}: no such folder")
    if job.captions is not None and not Path(job.captions).expanduser().is_file():
        raise UserError(f"captions={job.captions}: no such file")
    if job.resolved_mode == "compare":
        try:
            check_models(job.compare, job.attention, job.sample)
        except ValueError as err:
            raise UserError(str(err)) from None
    if job.videos is not None and not any(
        p.suffix.lower() == ".mp4" and p.is_file() for p in Path(job.videos).iterdir()
    ):
        raise UserError(f"videos={job.videos} holds no .mp4 files")


def score(job: EvalJobConfig, run_dir: Path) -> dict[str, Any]:
    """Score mode: ``run_dir/metrics.json``; failures are reported on stderr by file name.

    ``captions`` is a JSONL manifest or a sample run's ``samples.json``; anything else is a
    :class:`UserError` naming the file.
    """
    assert job.videos is not None
    captions = None
    if job.captions is not None:
        with user_errors(prefix="captions="):
            captions = load_captions(Path(job.captions).expanduser())
    report = score_folder(
        Path(job.videos).expanduser(),
        reference_dir=job.reference,
        captions=captions,
        dino_path=job.dino_path,
        clip_path=job.clip_path,
        progress=job.logging.progress,
    )
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = {name: s["error"] for name, s in report["videos"].items() if "error" in s}
    for name, error in failed.items():
        print(f"warning: {name} was not scored: {error}", file=sys.stderr)
    scored = len(report["videos"]) - len(failed)
    lines = [f"\nscored {scored} of {len(report['videos'])} videos  {run_dir / 'metrics.json'}"]
    for metric, value in report["mean"].items():
        kind = METRIC_TABLE.get(metric, ("", ""))[0]
        shown = value if isinstance(value, str) else f"{value:.4f}"
        lines.append(f"  {metric:<28} {shown:<10} {kind}")
    if job.reference is None:
        lines.append(f"  {', '.join(FIDELITY)}: not computed (set reference=<folder>)")
    if job.captions is None:
        lines.append("  motion errors: not computed (set captions=<manifest.jsonl>)")
    print("\n".join(lines), flush=True)
    return report


def _log(job: EvalJobConfig, run_dir: Path, mode: str, report: dict[str, Any]) -> None:
    """The report's tables and mean scalars to the tracker (``logging=wandb``: a wandb run)."""
    tracker = build_tracker(job.logging, is_main=True, directory=run_dir, config=resolved_dict(job))
    try:
        if mode == "score":
            metrics = sorted({m for s in report["videos"].values() for m in s if m != "error"})
            rows = [
                [name, *(s.get(m) for m in metrics), s.get("error", "")]
                for name, s in report["videos"].items()
            ]
            tracker.log_table("eval/videos", ["video", *metrics, "error"], rows, step=0)
            means = {f"eval/{k}": v for k, v in report["mean"].items() if not isinstance(v, str)}
            tracker.log(means, step=0)
        else:
            columns = ["model", "latency_s", "speedup", "attention_share", *FIDELITY]
            columns += ["latent_gap", *QUALITY]
            rows = []
            for name, m in report["models"].items():
                values = [m["mean"].get(k, "n/a") for k in (*FIDELITY, "latent_gap", *QUALITY)]
                rows.append([name, m["latency_s"], m["speedup"], m["attention_share"], *values])
            tracker.log_table("eval/compare", columns, rows, step=0)
    finally:
        tracker.finish()


def run(job: EvalJobConfig, run_dir: Path) -> None:
    """Score a folder or compare models (see the module docstring)."""
    check_inputs(job)
    mode = job.resolved_mode
    if mode == "score":
        if launcher_coordinates()[1] > 1:
            raise UserError(
                "mode=score scores in one process: start stafinetune-eval without torchrun "
                "(parallel.sp and parallel.cfg split the sampling of mode=compare)"
            )
        _save_config(job, run_dir)
        report = score(job, run_dir)
    else:
        with user_errors():  # sample.device=cuda without a GPU, a launch of the wrong size
            dims = init_sampling(job.parallel, job.sample.device)
        try:
            run_dir = shared_run_dir(run_dir)
            if dims.is_main:
                _save_config(job, run_dir)
            progress = job.logging.progress and dims.is_main
            prompts = resolve_prompts(
                job.sample, job.data, verbose=progress, rank=dims.rank, world_size=dims.world_size
            )
            compared = compare_models(
                job.compare, model_cfg=job.model, attention_cfg=job.attention, data_cfg=job.data,
                sample_cfg=job.sample, prompts=prompts, run_dir=run_dir, dino_path=job.dino_path,
                clip_path=job.clip_path, progress=progress, dims=dims,
            )  # fmt: skip
        finally:
            cleanup()
        if compared is None:  # a rank other than 0: it only helped sample
            return
        report = compared
        print(f"\n{(run_dir / 'compare.md').read_text()}", flush=True)
        print(f"compare.json, compare.md, compare.png and the videos in {run_dir}", flush=True)
    _log(job, run_dir, mode, report)


def _save_config(job: EvalJobConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(job), run_dir / "config.yaml")


register_eval_config()
main = hydra_command(run, config_name="eval", name="eval")

if __name__ == "__main__":
    main()
