"""``stafinetune-train`` / ``python -m stafinetune train``: distil (or finetune) a video DiT.

Under torchrun every rank composes the same config, writes its own ``.hydra/rank<N>`` and
``train_rank<N>.log``, and uses rank 0's output directory as the shared run directory (a
rank whose Hydra made another folder moves its files there). The start-up summary, the
closing summary and any error also go to the rank's log.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from stafinetune.config import JobConfig, resolved_dict
from stafinetune.errors import user_errors
from stafinetune.parallel import broadcast_object, cleanup, init_world
from stafinetune.training.run_lock import RunDirectoryLocked, RunLock
from stafinetune.training.trainer import Trainer, TrainResult

from .cli import echo, hydra_command, share_run_dir


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


def lock_run_dir(lock: RunLock, *, is_main: bool) -> None:
    """Rank 0 takes the run directory's lock for the run; every rank of the run stops with
    the same one-line error when another run holds it.

    Raises:
        RunDirectoryLocked: naming the other run's host, pid and start time.
    """
    refused = None
    if is_main:
        try:
            lock.acquire()
        except RunDirectoryLocked as err:
            refused = str(err)
    refused = broadcast_object(refused)
    if refused is not None:
        raise RunDirectoryLocked(refused)


def run(job: JobConfig, default_run_dir: Path) -> None:
    """Train with a validated config; prints where everything went on rank 0.

    A run stopped by SIGTERM / SIGUSR1 saves a checkpoint and exits with 128 + the signal's
    number (143 for SIGTERM), so schedulers see that it did not finish. A second run started
    on a directory that a live run holds stops at once (exit code 2, naming the holder).
    """
    with user_errors():  # train.device=cuda without a GPU, a launcher's bad RANK
        world = init_world(job.train.device, process_group=job.parallel.strategy != "ddp")
    run_dir = Path(job.run_dir) if job.run_dir else default_run_dir
    run_dir = Path(broadcast_object(str(run_dir.resolve())))
    lock = RunLock(run_dir)
    try:
        lock_run_dir(lock, is_main=world.is_main)  # before anything is written there
        share_run_dir(default_run_dir, run_dir)
        trainer = Trainer(job, run_dir, world)  # checks a resume against the old config.yaml
        if world.is_main:
            echo(trainer.describe())
            OmegaConf.save(OmegaConf.create(resolved_dict(job)), run_dir / "config.yaml")
        result = trainer.fit()
    finally:
        lock.release()
        cleanup()
    if world.is_main:
        echo(summary(result))
    if result.stopped_by is not None:
        if world.is_main:
            echo(
                f"stopped by {result.stopped_by} at step {result.step}: checkpoint "
                f"{result.last_checkpoint}; run the same command to resume",
                error=True,
            )
        sys.exit(128 + getattr(signal, result.stopped_by, signal.SIGTERM))


main = hydra_command(run, name="train")

if __name__ == "__main__":
    main()
