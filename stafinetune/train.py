"""Hydra entry point: ``stafinetune-train`` / ``python -m stafinetune.train``.

Hydra composes ``conf/`` plus command-line overrides; everything below :func:`main` gets
explicit, validated dataclasses. Under torchrun every rank composes the same config, writes
its own ``.hydra/rank<N>`` and ``train_rank<N>.log``, and uses rank 0's output directory as
the shared run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import JobConfig, conf_dir, resolved_dict, to_job_config
from .distributed import broadcast_object, cleanup, init_distributed


def run(job: JobConfig, default_run_dir: Path) -> None:
    """Train with a validated config; prints where everything went on rank 0."""
    from .trainer import Trainer

    dist = init_distributed(job.train.device)
    run_dir = Path(job.run_dir) if job.run_dir else default_run_dir
    run_dir = Path(broadcast_object(str(run_dir.resolve())))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved_dict(job)), run_dir / "config.yaml")
    try:
        trainer = Trainer(job, run_dir, dist)
        result = trainer.fit()
    finally:
        cleanup()
    if dist.is_main:
        losses = result.losses
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
        if losses:
            head = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10)
            tail = sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)
            lines.append(f"train loss        {head:.4f} (first 10%) -> {tail:.4f} (last 10%)")
        if len(result.val_history) >= 2:
            first, last = result.val_history[0], result.val_history[-1]
            for key in first:
                if key != "step" and key in last:
                    lines.append(
                        f"{key:<17} {first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})"
                    )
        print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        job = to_job_config(cfg)
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run(job, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """Console-script entry point."""
    _hydra_main()


if __name__ == "__main__":
    main()
