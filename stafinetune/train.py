"""``stafinetune-train`` / ``python -m stafinetune.train``: distil (or finetune) a video DiT.

Under torchrun every rank composes the same config, writes its own ``.hydra/rank<N>`` and
``train_rank<N>.log``, and uses rank 0's output directory as the shared run directory.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from .cli import hydra_command
from .config import JobConfig, resolved_dict
from .parallel import broadcast_object, cleanup, init_world
from .trainer import Trainer, TrainResult


def summary(result: TrainResult) -> str:
    """Where everything went and how the losses and validation metrics moved."""
    lines = [
        "",
        f"run directory     {result.run_dir}",
        f"resolved config   {result.run_dir / 'config.yaml'}",
        f"checkpoint        {result.last_checkpoint}",
        f"metrics           {result.run_dir / 'metrics.jsonl'}",
    ]
    if result.export_dir:
        lines.append(f"exported student  {result.export_dir}")
    if result.tracker_dir:
        lines.append(f"wandb run         {result.tracker_dir}")
    for path in result.figures:
        lines.append(f"figure            {path}")
    losses = result.losses
    if losses:
        k = max(1, len(losses) // 10)
        head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
        lines.append(f"train loss        {head:.4f} (first 10%) -> {tail:.4f} (last 10%)")
    if len(result.val_history) >= 2:
        first, last = result.val_history[0], result.val_history[-1]
        for key in first:
            if key != "step" and key in last:
                lines.append(
                    f"{key:<17} {first[key]:.4f} (step {first['step']}) -> "
                    f"{last[key]:.4f} (step {last['step']})"
                )
    return "\n".join(lines)


def run(job: JobConfig, default_run_dir: Path) -> None:
    """Train with a validated config; prints where everything went on rank 0."""
    world = init_world(job.train.device, process_group=job.parallel.strategy != "ddp")
    run_dir = Path(job.run_dir) if job.run_dir else default_run_dir
    run_dir = Path(broadcast_object(str(run_dir.resolve())))
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved_dict(job)), run_dir / "config.yaml")
    try:
        result = Trainer(job, run_dir, world).fit()
    finally:
        cleanup()
    if world.is_main:
        print(summary(result), flush=True)


main = hydra_command(run)

if __name__ == "__main__":
    main()
