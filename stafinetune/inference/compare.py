"""Compare models on one prompt set: quality, fidelity to a reference model, latency.

The compare mode of ``stafinetune-eval``. :func:`compare_models`

1. samples every model of ``compare.models`` with the same prompts and seeds (the sample
   command's :func:`~stafinetune.inference.generate.sample_model`) into ``<run>/<name>/videos/``;
2. scores each model's videos with :func:`stafinetune.metrics.score_folder`, against the
   reference model's videos of the same prompt (``compare.reference``, the dense model by
   default): VBench-style temporal quality, PSNR / SSIM / MS-SSIM / VMAF, and the motion
   errors where a prompt states a shape's motion (the synthetic captions do);
3. adds the latent gap to the reference (mean squared difference of the generated latents),
   the latency per video, the share of it spent in attention (``AttentionTimer``) and the
   attended fraction of video token pairs;
4. writes ``compare.json`` (everything, per video), ``compare.md`` (the tables) and
   ``compare.png`` (fidelity and quality against latency).

A metric that cannot be computed (no VMAF package, no prompt with a motion, consistency
without DINO / CLIP weights) is named in the tables as such, never left out silently.
"""

# OmegaConf 2.3 structured configs understand typing.Optional, not PEP 604 unions.
# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from stafinetune.data import DataConfig
from stafinetune.metrics import METRIC_TABLE, latent_gap, score_folder
from stafinetune.metrics.fidelity import VMAF_AVAILABLE
from stafinetune.metrics.motion import parse_caption
from stafinetune.models import AttentionConfig, ModelConfig
from stafinetune.parallel.dims import ParallelDims

from .generate import GeneratedVideo, SampleConfig, sample_model, sampling_schedule
from .weights import inference_attention, resolve_weights

QUALITY = (
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "subject_consistency",
    "background_consistency",
)
FIDELITY = ("psnr", "ssim", "ms_ssim", "vmaf")
MOTION = ("motion_direction_error_deg", "motion_speed_error")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class ModelSpec:
    """One compared model: its weights and how it attends.

    Attributes:
        name: a label, also the folder of its videos (letters, digits, ``_.-``).
        checkpoint: a run directory, checkpoint or export folder (as ``sample.checkpoint``);
            None: ``model.path`` (the base model).
        mode: ``full`` (dense) or ``sta``.
        strategy_path: a mask-strategy file (overrides ``attention.strategy_path``; an
            export's own strategy is used when neither is set).
        window: ``[wt, wh, ww]`` tiles for every layer and head (overrides ``attention.window``).
        dense_first_steps: overrides ``attention.dense_first_steps``.
        steps, schedule: override ``sample.steps`` / ``sample.schedule`` for this model (a
            few-step student beside a many-step teacher, or one student at several step
            counts: ``{name: s2, checkpoint: run, steps: 2, schedule: stochastic}``).
    """

    name: str = "sta"
    checkpoint: Optional[str] = None
    mode: str = "sta"
    strategy_path: Optional[str] = None
    window: Optional[list[int]] = None
    dense_first_steps: Optional[int] = None
    steps: Optional[int] = None
    schedule: Optional[str] = None


def spec_sample(sample_cfg: SampleConfig, spec: ModelSpec) -> SampleConfig:
    """The ``sample`` section with ``spec``'s own steps and schedule (validated)."""
    changes = {k: v for k, v in (("steps", spec.steps), ("schedule", spec.schedule))
               if v is not None}  # fmt: skip
    return dataclasses.replace(sample_cfg, **changes) if changes else sample_cfg


@dataclass
class CompareConfig:
    """The ``compare`` section of ``stafinetune-eval``.

    Attributes:
        models: the models to sample and compare (default: the dense base model and the
            training-free STA model with the attention group's windows). On the command line:
            ``'compare.models=[{name: dense, mode: full}, {name: ft, checkpoint: run/export}]'``.
        reference: the model whose videos and latents the fidelity metrics compare against.
    """

    models: list[ModelSpec] = field(
        default_factory=lambda: [ModelSpec(name="dense", mode="full"), ModelSpec(name="sta")]
    )
    reference: str = "dense"

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.models]
        if not names:
            raise ValueError("compare.models must name at least one model")
        for i, spec in enumerate(self.models):
            if not _NAME.fullmatch(spec.name or ""):
                raise ValueError(
                    f"compare.models[{i}].name must be letters, digits, '_', '.' or '-', "
                    f"got {spec.name!r}"
                )
            if spec.mode not in ("full", "sta"):
                raise ValueError(f"compare.models[{i}].mode must be full or sta, got {spec.mode!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"compare.models names must be unique, repeated: {duplicates}")
        if self.reference not in names:
            raise ValueError(
                f"compare.reference={self.reference!r} is not one of compare.models {names}"
            )


def spec_attention(attention: AttentionConfig, spec: ModelSpec) -> AttentionConfig:
    """The attention group with ``spec``'s overrides applied (an ``AttentionConfig``)."""
    changes: dict[str, Any] = {"mode": spec.mode}
    if spec.strategy_path is not None:
        changes["strategy_path"] = spec.strategy_path
    if spec.window is not None:
        changes["window"] = list(spec.window)
    if spec.dense_first_steps is not None:
        changes["dense_first_steps"] = spec.dense_first_steps
    return dataclasses.replace(attention, **changes)


def check_models(
    compare_cfg: CompareConfig, attention: AttentionConfig, sample_cfg: SampleConfig
) -> None:
    """Before any sampling: every compared model's weights, schedule and strategy file resolve.

    Raises ValueError naming ``compare.models[i]`` and the field at fault.
    """
    for i, spec in enumerate(compare_cfg.models):
        weights = resolve_weights(spec.checkpoint, f"compare.models[{i}].checkpoint")
        try:
            steps = sampling_schedule(spec_sample(sample_cfg, spec), weights).steps
            inference_attention(spec_attention(attention, spec), steps)
        except ValueError as err:
            raise ValueError(f"compare.models[{i}] ({spec.name}): {err}") from None


def motion_captions(videos: list[GeneratedVideo]) -> dict[str, str]:
    """File name -> prompt for the prompts that state a shape's motion (motion metrics)."""
    out = {}
    for video in videos:
        try:
            parse_caption(video.prompt)
        except ValueError:
            continue
        out[video.file] = video.prompt
    return out


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise_model(
    videos: list[GeneratedVideo],
    scores: dict[str, Any],
    reference: list[GeneratedVideo],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """One model's entry of ``compare.json``: settings, latency, per-video scores and means."""
    per_video: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for video, ref in zip(videos, reference, strict=True):
        row = dict(scores["videos"].get(video.file, {}))
        if "error" in row:
            errors[video.file] = row.pop("error")
        row.update(
            latent_gap=latent_gap(video.latents, ref.latents),
            latency_s=video.latency_s,
            attention_s=video.attention_s,
            prompt=video.prompt,
            seed=video.seed,
        )
        per_video[video.file] = row
    mean = dict(scores["mean"])
    mean["latent_gap"] = sum(v["latent_gap"] for v in per_video.values()) / len(per_video)
    latencies = [v.latency_s for v in videos]
    return {
        "settings": settings,
        "latency_s": _median(latencies),
        "latency_mean_s": sum(latencies) / len(latencies),
        "attention_share": sum(v.attention_s for v in videos) / max(sum(latencies), 1e-12),
        "mean": mean,
        "videos": per_video,
        "errors": errors,
    }


def metric_notes(
    models: dict[str, Any], *, dino_path: str | None, clip_path: str | None, motion: int
) -> dict[str, str]:
    """Why a metric column is a proxy or missing, by metric (shown under the tables)."""
    notes = {}
    sources = {m["mean"].get("feature_source", "") for m in models.values()}
    if dino_path is None:
        notes["subject_consistency"] = "pixel proxy: dino_path is not set (no DINO weights)"
    if clip_path is None:
        notes["background_consistency"] = "pixel proxy: clip_path is not set (no CLIP weights)"
    if dino_path or clip_path:
        notes["feature_source"] = ", ".join(sorted(s for s in sources if s))
    if not VMAF_AVAILABLE:
        notes["vmaf"] = "not computed: vmaf-torch is not installed"
    if motion == 0:
        notes["motion"] = (
            "not computed: no prompt states a shape's motion (the motion metrics read the "
            "synthetic captions, e.g. 'a red circle moving left at 3 pixels per frame')"
        )
    return notes


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """``compare.md``: speed and fidelity, then quality, one row per model, and the notes."""
    ref = report["reference"]
    models = report["models"]
    lines = [
        f"# Model comparison ({len(report['prompts'])} prompts, seeds {report['seeds'][0]}.."
        f"{report['seeds'][-1]}, {report['steps']} steps, guidance {report['guidance_scale']}, "
        f"{report['device']})",
        "",
        f"## Speed and fidelity to `{ref}`",
        "",
        "| model | weights | attention | video density | latency s (median) | speedup | "
        "attention share | PSNR dB | SSIM | MS-SSIM | VMAF | latent gap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in models.items():
        s, mean = m["settings"], m["mean"]
        cells = [
            name,
            s["weights"],
            s["attention"],
            f"{s['video_density']:.1%}",
            f"{m['latency_s']:.3f}",
            f"{m['speedup']:.2f}x",
            f"{m['attention_share']:.0%}",
            _fmt(mean.get("psnr"), 2),
            _fmt(mean.get("ssim")),
            _fmt(mean.get("ms_ssim")),
            _fmt(mean.get("vmaf"), 2),
            _fmt(mean.get("latent_gap")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Quality (VBench-style, higher is better) and motion errors (lower is better)",
        "",
        "| model | " + " | ".join(QUALITY) + " | direction error deg | speed error px/frame |",
        "| --- " * (len(QUALITY) + 3) + "|",
    ]
    for name, m in models.items():
        mean = m["mean"]
        cells = [name, *(_fmt(mean.get(k)) for k in QUALITY)]
        cells += [_fmt(mean.get(MOTION[0]), 1), _fmt(mean.get(MOTION[1]), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Metrics", ""]
    for name in (*FIDELITY, *QUALITY, *MOTION):
        kind, formula = METRIC_TABLE[name]
        note = report["notes"].get(name) or (
            report["notes"].get("motion") if name in MOTION else None
        )
        lines.append(f"- `{name}`: {kind}; {formula}" + (f". **{note}**" if note else ""))
    lines.append(
        "- `latent_gap`: exact; mean((latents - reference latents)^2) of the generated latents"
    )
    lines.append(
        "- latency: wall clock of the denoising loop per video (CUDA-synchronised), median over "
        "prompts after one untimed warm-up video; speedup = reference latency / latency; "
        "attention share from AttentionTimer"
    )
    errors = [(n, f, e) for n, m in models.items() for f, e in m["errors"].items()]
    if errors:
        lines += ["", "## Videos that could not be scored", ""]
        lines += [f"- {n}/{f}: {e}" for n, f, e in errors]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """``compare.png``: PSNR to the reference and a VBench-style quality mean, each against
    the median latency per video, one labelled point per model."""
    from matplotlib.figure import Figure

    ref = report["reference"]
    models = report["models"]
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, (name, m) in enumerate(models.items()):
        x, colour = m["latency_s"], f"C{i}"  # one colour per model in both panels
        if name != ref and m["mean"].get("psnr") is not None:
            left.scatter([x], [m["mean"]["psnr"]], color=colour)
            left.annotate(name, (x, m["mean"]["psnr"]), textcoords="offset points", xytext=(4, 4))
        quality = [m["mean"][k] for k in QUALITY if isinstance(m["mean"].get(k), float)]
        if quality:
            y = sum(quality) / len(quality)
            right.scatter([x], [y], color=colour)
            right.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    for ax in (left, right):
        ax.axvline(models[ref]["latency_s"], linestyle="--", color="grey", linewidth=1)
        ax.set_xlabel(f"latency per video, s (dashed: {ref})")
        ax.grid(alpha=0.3)
    left.set_ylabel(f"PSNR to {ref}, dB")
    left.set_title(f"fidelity to {ref}")
    right.set_ylabel("mean of the 5 VBench-style metrics")
    right.set_title("temporal quality")
    fig.savefig(path, dpi=100)


def compare_models(
    compare_cfg: CompareConfig,
    *,
    model_cfg: ModelConfig,
    attention_cfg: AttentionConfig,
    data_cfg: DataConfig,
    sample_cfg: SampleConfig,
    prompts: list[str],
    run_dir: Path,
    dino_path: str | None = None,
    clip_path: str | None = None,
    progress: bool = True,
    dims: ParallelDims | None = None,
) -> dict[str, Any] | None:
    """Sample, score and compare every model of ``compare_cfg`` (see the module docstring).

    Args:
        compare_cfg: the models and the reference.
        model_cfg, attention_cfg: the base model and the attention each model's spec overrides.
        data_cfg: the text and video encoders and the latent size.
        sample_cfg: sampler, seeds and device, the same for every model.
        prompts: the prompt set.
        run_dir: receives ``<name>/videos``, ``<name>/samples.json``, ``compare.json``,
            ``compare.md`` and ``compare.png``.
        dino_path, clip_path: local DINO / CLIP folders (None: pixel proxies, noted).
        dims: the launch's degrees (None: one process); every rank samples, rank 0 scores
            and writes.
    Returns:
        the ``compare.json`` content; None on ranks other than 0.
    """
    ccfg, scfg = compare_cfg, sample_cfg
    generated: dict[str, list[GeneratedVideo]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(ccfg.models):
        videos, model_settings = sample_model(
            model_cfg, spec_attention(attention_cfg, spec), data_cfg, spec_sample(scfg, spec),
            prompts,
            run_dir / spec.name, checkpoint=spec.checkpoint,
            checkpoint_field=f"compare.models[{i}].checkpoint", progress=progress, name=spec.name,
            dims=dims,
        )  # fmt: skip
        generated[spec.name], settings[spec.name] = videos, model_settings
    if dims is not None and not dims.is_main:
        return None
    ref = ccfg.reference
    captions = motion_captions(generated[ref])
    models: dict[str, Any] = {}
    for spec in ccfg.models:
        scores = score_folder(
            run_dir / spec.name / "videos",
            reference_dir=run_dir / ref / "videos",
            captions=captions,
            dino_path=dino_path,
            clip_path=clip_path,
            progress=progress,
        )
        models[spec.name] = summarise_model(
            generated[spec.name], scores, generated[ref], settings[spec.name]
        )
        models[spec.name]["spec"] = dataclasses.asdict(spec)
    for m in models.values():
        m["speedup"] = models[ref]["latency_s"] / max(m["latency_s"], 1e-12)
    report = {
        "reference": ref,
        "prompts": prompts,
        "seeds": [scfg.seed + k for k in range(len(prompts))],
        "steps": scfg.steps,
        "shift": scfg.shift,
        "guidance_scale": scfg.guidance_scale,
        "device": settings[ref]["device"],
        "metrics": {name: {"kind": k, "formula": f} for name, (k, f) in METRIC_TABLE.items()},
        "notes": metric_notes(
            models, dino_path=dino_path, clip_path=clip_path, motion=len(captions)
        ),
        "models": models,
    }
    (run_dir / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "compare.md").write_text(markdown(report))
    plot(report, run_dir / "compare.png")
    return report
