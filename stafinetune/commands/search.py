"""``stafinetune-search`` / ``python -m stafinetune search``: training-free window search.

Searches an STA window for every (denoising step, layer, head) of the dense model on a few
calibration samples of the data cache, and writes ``<run dir>/mask_strategy.json`` with the
report and heatmap (``stafinetune.search.write_report``)::

    stafinetune-search search.budget=0.3                  # budget mode: mean density <= 30%
    stafinetune-search search.threshold=0.03              # threshold mode (the default mode)
    stafinetune-search model=wan2.1_t2v_1.3b model.path=/models/Wan2.1-T2V-1.3B-Diffusers \\
        attention.tile=[6,8,8] data=folder data.manifest=/data/clips.jsonl ... search.budget=0.15

The configuration is ``conf/search.yaml``: the ``model``, ``attention``, ``data`` and
``logging`` groups of training plus a ``search`` section (:class:`SearchConfig`). The searched
model is the dense one: ``model.path`` (or, without weights, the random initial weights of
``seed``, as the trainer builds them); ``attention`` gives only the tile and the backend.
Train from the result with ``stafinetune-train attention.strategy_path=<run>/mask_strategy.json``.

The work is :func:`stafinetune.search.job.search_dense_model` (model and calibration in,
``SearchResult`` out).
Under torchrun with ``parallel.sp=N`` (N = the number of processes) the model runs with
Ulysses sequence parallelism: each rank scores its own heads on the whole sequence, the error
tables are gathered over heads and every rank makes the same selection; rank 0 writes::

    torchrun --nproc-per-node 8 -m stafinetune search parallel.sp=8 model=... search.budget=0.15
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf

from stafinetune.build import check_data_fits_model
from stafinetune.config import resolved_dict
from stafinetune.data import prepare_data
from stafinetune.parallel import (
    ParallelDims,
    broadcast_object,
    cleanup,
    init_world,
    launcher_coordinates,
)
from stafinetune.parallel.parallelize import sequence_split
from stafinetune.search import SearchResult, write_report
from stafinetune.search.job import (
    SearchJobConfig,
    build_search_model,
    calibration_batches,
    log_result,
    register_search_configs,
    search_canvas,
    search_dense_model,
)
from stafinetune.training.tracking import build_tracker

from .cli import config_error, hydra_command


def summary(
    run_dir: Path, paths: Mapping[str, Path], result: SearchResult, tracker_dir: Path | None
) -> str:
    """Where everything went (``tracker_dir``: the wandb run, if any) and what was chosen."""
    report = result.report
    setting = (
        f"budget {report['budget']}"
        if report["mode"] == "budget"
        else f"threshold {report['threshold']}"
    )
    dens, speed = report["density"], report["predicted_attention_speedup"]
    lines = [
        "",
        f"run directory     {run_dir}",
        f"mask strategy     {paths['strategy']}",
        *([f"mask strategy 2   {paths['strategy_2']}"] if "strategy_2" in paths else []),
        f"report            {paths['markdown']}",
        f"heatmap           {paths['heatmap']}",
    ]
    if tracker_dir is not None:
        lines.append(f"wandb run         {tracker_dir}")
    lines += [
        f"mode              {report['mode']} ({setting}, {report['metric']})",
        f"density           {dens['searched_steps']:.4f} per-step windows "
        f"({speed['searched_steps']:.2f}x predicted attention speedup), "
        f"{dens['train']:.4f} train windows",
        f"search time       {report['timing']['wall_s']:.1f} s wall, "
        f"{report['timing']['cpu_s']:.1f} s CPU",
        f"train with        stafinetune-train attention.strategy_path={paths['strategy']}"
        + (f" attention.strategy_path_2={paths['strategy_2']}" if "strategy_2" in paths else ""),
    ]
    return "\n".join(lines)


def run(job: SearchJobConfig, default_run_dir: Path) -> None:
    """Search with a validated config and write the outputs into the run directory."""
    _, world_size, _ = launcher_coordinates()
    if world_size != job.parallel.sp:
        config_error(
            ValueError(
                f"parallel.sp={job.parallel.sp} must equal the number of launched processes "
                f"({world_size}): the search runs one sequence-parallel group"
            )
        )
    try:
        canvas, grid = search_canvas(job)
    except ValueError as err:
        config_error(err)
    world = init_world(job.device)
    dims = ParallelDims(world, sp=job.parallel.sp)
    device, main = world.device, world.is_main
    run_dir = Path(job.run_dir) if job.run_dir else default_run_dir
    run_dir = Path(broadcast_object(str(run_dir.resolve())))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved_dict(job)), run_dir / "config.yaml")
    prepare_data(job.data, rank=world.rank, world_size=world.world_size, verbose=main)
    cfg = job.search
    try:
        calibration = calibration_batches(
            job.data, grid, num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed
        )
        dit = build_search_model(job, device)
        check_data_fits_model(calibration[0], dit, job)  # type: ignore[arg-type]
        sequence_split(dit, dims)
    except ValueError as err:
        config_error(err)
    tracker = build_tracker(job.logging, is_main=main, directory=run_dir, config=resolved_dict(job))
    metadata = {
        "model": job.model.flavor,
        "model_path": job.model.path,
        "command": "stafinetune-search",
        "calibration_indices": torch.cat([b["index"] for b in calibration]).tolist(),
    }
    try:
        if main:
            print(
                f"searching {job.model.flavor} on canvas {list(canvas)} (tile "
                f"{job.attention.tile}), {cfg.num_samples} calibration samples, {cfg.steps} "
                f"steps, {device}, {dims.describe()}",
                flush=True,
            )
        result = search_dense_model(
            dit, calibration, cfg, progress=job.logging.progress and main, metadata=metadata
        )
        if main:
            paths = write_report(result, run_dir)
            log_result(tracker, result, paths["heatmap"])
    finally:
        tracker.finish()
        cleanup()
    if main:
        print(summary(run_dir, paths, result, tracker.run_dir), flush=True)


register_search_configs()
main = hydra_command(run, config_name="search", name="search")

if __name__ == "__main__":
    main()
