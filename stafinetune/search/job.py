"""What the ``stafinetune-search`` command runs, as a library: its job config, the canvas and
calibration samples it searches on, the dense model, and the timed search.

:class:`SearchJobConfig` is the root of ``conf/search.yaml``; :func:`search_canvas`,
:func:`calibration_batches`, :func:`build_search_model` and :func:`search_dense_model` are the
steps of the command (``stafinetune.commands.search``), usable on their own (the benchmarks
call them).
"""

# OmegaConf 2.3 structured configs understand typing.Optional, not PEP 604 unions.
# ruff: noqa: UP045
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore

from ..build import build_seeded, check_data_geometry, use_bf16
from ..config import LoggingConfig, ParallelConfig, conf_dir, to_job_config
from ..data import DataConfig, build_train_loader
from ..models import AttentionConfig, ModelConfig, VideoDiT
from .candidates import resolve_candidates
from .config import SearchConfig
from .search import SearchResult, search_windows
from .select import check_budget

# Offset from ``search.seed`` of the loader stream the calibration samples are drawn from
# (apart from the trainer's and the validation batches' streams).
CALIBRATION_LOADER_SEED = 2_000_029


@dataclass
class SearchJobConfig:
    """Root of ``conf/search.yaml``.

    Attributes:
        model, attention, data, logging: the groups of training (``attention`` supplies the
            tile and the kernel backend; the search runs the model dense).
        parallel: only ``parallel.sp`` is read: the sequence-parallel degree, equal to the
            number of launched processes (each scores its heads).
        search: how candidates are scored and chosen, and how many calibration samples.
        seed: seed of the random weights of a model without ``model.path`` (as
            ``train.seed``: the same seed searches the model the trainer starts from).
        device: ``auto`` (CUDA when visible), ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 weights on CUDA, fp32 elsewhere), ``fp32`` or ``bf16``.
        run_dir: where the outputs go; None: Hydra's output directory.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    run_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.model.expert is not None and self.parallel.sp != 1:
            raise ValueError(
                f"a two-expert model (model.flavor={self.model.flavor}) is searched in one "
                f"process: parallel.sp must be 1, got {self.parallel.sp}"
            )


def register_search_configs() -> None:
    """Register the root schema of ``conf/search.yaml`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="base_search", node=SearchJobConfig)


def compose_search_config(
    overrides: Sequence[str] = (), *, validate: bool = True
) -> SearchJobConfig | Any:
    """Compose ``conf/search.yaml`` with command-line style overrides, without running.

    Returns a :class:`SearchJobConfig` (``validate=True``) or the raw DictConfig.
    """
    from hydra import compose, initialize_config_dir

    register_search_configs()

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="search", overrides=list(overrides))
    return to_job_config(cfg) if validate else cfg


def search_canvas(job: SearchJobConfig) -> tuple[tuple[int, int, int], list[int]]:
    """The canvas the search runs on, checked with the candidates and budget before any work.

    The canvas is the largest data bucket's (as the trainer exports its strategy for); a
    strategy belongs to one canvas.

    Returns:
        ((T, Hc, Wc) token canvas, [T, H, W] latent grid of that bucket).
    Raises:
        ValueError naming the field: data that cannot feed the model, an empty candidate set,
        a candidate wider than the tile grid, a budget below the sparsest candidate.
    """
    canvases = check_data_geometry(job.data, job.model)
    grids = job.data.latent_grids()
    best = max(range(len(canvases)), key=lambda i: math.prod(canvases[i]))
    canvas = tuple(canvases[best])
    cfg = job.search
    _, densities = resolve_candidates(
        cfg.candidates, canvas, job.attention.tile, cfg.density_levels
    )
    if cfg.budget is not None:
        check_budget(cfg.budget, densities)
    return canvas, [int(g) for g in grids[best]]  # type: ignore[return-value]


def calibration_batches(
    data_cfg: DataConfig,
    latent_grid: Sequence[int],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
) -> list[dict[str, Any]]:
    """``num_samples`` samples of the latent grid ``latent_grid``, in batches of ``batch_size``.

    Drawn from the prepared data with a loader stream of its own (seed ``seed +
    CALIBRATION_LOADER_SEED``), at most one epoch; samples of other buckets are skipped.

    Returns:
        Loader batches (``latents`` (B, C, T, H, W), ``text`` (B, L, Dt), ``text_mask`` (B, L),
        ``pooled_text`` (B, Dp), ``caption``, ``index`` (B,)); the last one may be smaller.
    Raises:
        ValueError naming ``search.num_samples`` when the data holds fewer such samples.
    """
    loader = build_train_loader(
        data_cfg, batch_size=min(batch_size, num_samples), seed=seed + CALIBRATION_LOADER_SEED
    )
    batches: list[dict[str, Any]] = []
    found = 0
    for batch, _ in zip(loader, range(len(loader)), strict=False):  # one epoch at most
        if list(batch["latents"].shape[2:]) != list(latent_grid):
            continue
        take = min(batch["latents"].shape[0], num_samples - found)
        batches.append({k: v[:take] for k, v in batch.items()})
        found += take
        if found == num_samples:
            break
    if found < num_samples:
        raise ValueError(
            f"search.num_samples={num_samples} but the data holds only {found} samples of "
            f"latent shape {list(latent_grid)} in full batches of search.batch_size"
        )
    return batches


def build_search_model(job: SearchJobConfig, device: torch.device) -> VideoDiT:
    """The dense model to search: ``model.path``'s weights (or ``seed``'s random ones), frozen.

    Built with ``attention.mode=full`` (the search scores windows against dense attention
    and takes only the tile and backend from ``attention``), in bf16 when ``precision`` says
    so on ``device``. A two-expert flavor is searched with both experts whatever
    ``model.expert`` says: the calibration trajectory passes through both.
    """
    attention = dataclasses.replace(
        job.attention, mode="full", strategy_path=None, strategy_path_2=None
    )
    dtype = torch.bfloat16 if use_bf16(job.precision, device) else torch.float32
    model = job.model
    if model.expert is not None:
        model = dataclasses.replace(model, expert="both")
    dit = build_seeded(model, attention, seed=job.seed, device=device, dtype=dtype)
    dit.requires_grad_(False)
    dit.eval()
    return dit


def search_dense_model(
    dit: VideoDiT,
    calibration: Sequence[Mapping[str, Any]],
    cfg: SearchConfig,
    *,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Search ``dit``'s windows on ``calibration`` and time it.

    Args:
        dit: the model (run dense during the search).
        calibration: batches with ``latents`` (B, C, T, H, W), ``text`` (B, L, Dt),
            ``text_mask`` (B, L), ``pooled_text`` (B, Dp), of one latent shape.
        cfg: the search settings.
        progress: a tqdm bar over the denoising steps.
        metadata: extra facts stored in the strategy.
    Returns:
        the ``SearchResult``; its report gains ``timing`` (wall and process CPU seconds).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = search_windows(dit, calibration, cfg, progress=progress, metadata=metadata)
    result.report["timing"] = {
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
        "torch_threads": torch.get_num_threads(),
        "device": str(next(dit.parameters()).device),
    }
    return result


def log_result(tracker: Any, result: SearchResult, heatmap: Path) -> None:
    """Per-step density and error, the summary and the heatmap, to a ``tracking`` tracker.

    The heatmap is logged at the last denoising step: wandb drops anything logged at a step
    below one it has already seen.
    """
    report = result.report
    last = 0
    for step, (dens, err) in enumerate(
        zip(report["density_per_step"], report["error_per_step"], strict=True)
    ):
        row = {"search/density": dens}
        if err is not None:
            row[f"search/{report['metric']}"] = err
        tracker.log(row, step=step)
        last = step
    values = {f"search/density_{k}": v for k, v in report["density"].items()}
    values.update(
        {f"search/speedup_{k}": v for k, v in report["predicted_attention_speedup"].items()}
    )
    values.update(
        {
            "search/total_error": report["total_error"],
            "search/mode": report["mode"],
            "search/cpu_s": report["timing"]["cpu_s"],
            "search/wall_s": report["timing"]["wall_s"],
        }
    )
    tracker.summary(values)
    caption = f"{report['mode']} mode, density {report['density']['searched_steps']:.3f}"
    tracker.log_image("search/window_heatmap", heatmap, step=last, caption=caption)
