"""Run under torchrun: for each parallel mode, 4 steps straight equal 2 steps + resume + 2.

Usage: torchrun --nproc-per-node 2 resume_check.py DATA_ROOT OUT_DIR MODE [MODE ...], a mode
being ``<strategy>:<sp>``. Prints one JSON line on rank 0: per mode, whether the losses of
steps 3-4 and the final weights (EMA included) are identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stafinetune.config import compose_job_config
from stafinetune.parallel import init_world
from stafinetune.training.trainer import Trainer


def job(data_root: str, strategy: str, sp: int, steps: int):
    return compose_job_config([
        f"data.root={data_root}", "data.num_clips=16", "data.num_workers=0", "train.device=cpu",
        "train.batch_size=2", "train.log_every=1", "train.val_every=0", "train.sample_steps=0",
        f"train.steps={steps}", "train.schedule=constant", "train.warmup_steps=2",
        "train.ema_decay=0.9", "train.grad_accum=2", "train.export=false", "logging=none",
        "logging.progress=false", f"parallel={strategy}", f"parallel.sp={sp}",
    ])  # fmt: skip


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    full = trainer.engine.full_state_dict()
    with trainer.ema.applied(trainer.student):
        ema = trainer.engine.full_state_dict()
    if full is None:
        return {}
    return {**full, **{f"ema.{k}": v for k, v in ema.items()}}


def main() -> None:
    data_root, out, modes = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    world = init_world("cpu", process_group=True)
    report = {}
    for mode in modes:
        strategy, sp = mode.split(":")[0], int(mode.split(":")[1])
        straight = Trainer(job(data_root, strategy, sp, 4), out / f"{mode}-straight", world)
        a = straight.fit()
        first = Trainer(job(data_root, strategy, sp, 4), out / f"{mode}-split", world)
        first.fit(until_step=2)
        second = Trainer(job(data_root, strategy, sp, 4), out / f"{mode}-split", world)
        b = second.fit()
        wa, wb = final_weights(straight), final_weights(second)
        same = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        report[mode] = {"losses": a.losses[2:] == b.losses, "weights": same, "step": second.step}
    if world.is_main:
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
