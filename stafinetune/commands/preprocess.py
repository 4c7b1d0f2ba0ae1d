"""``stafinetune-preprocess`` / ``python -m stafinetune preprocess``: build the latent cache.

Composes the same configuration as training (so ``data=folder data.manifest=...`` and every
other ``data.*`` override mean the same thing) and runs ``prepare_data`` on its ``data``
group. Under torchrun (or with ``RANK``/``WORLD_SIZE`` set) each process encodes its share of
the shards; they meet through files, so no process group is needed::

    stafinetune-preprocess                                        # the synthetic default
    stafinetune-preprocess data=folder data.manifest=/videos/train.jsonl
    torchrun --nproc-per-node 8 -m stafinetune preprocess data=hf_dataset \\
        data.dataset_path=/datasets/clips data.device=cuda
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from stafinetune.build import check_data_geometry
from stafinetune.config import JobConfig
from stafinetune.data import prepare_data
from stafinetune.data.preprocess import summary_line
from stafinetune.errors import UserError, user_errors
from stafinetune.parallel import launcher_coordinates

from .cli import hydra_command


def run(job: JobConfig, default_run_dir: Path) -> None:
    """Encode this process's share of the cache; rank 0 prints the cache folder last.

    Raises:
        UserError: bad data geometry or device, a missing or empty source, or a source whose
            every record was skipped (the reasons are in ``bad_inputs.jsonl``).
    """
    with user_errors():
        rank, world_size, local_rank = launcher_coordinates()
        check_data_geometry(job.data, job.model)  # before any encoding
    data = job.data
    if data.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("data.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        data = dataclasses.replace(data, device=f"cuda:{local_rank}")
    cache_dir = prepare_data(data, rank=rank, world_size=world_size, verbose=job.logging.progress)
    info = json.loads((cache_dir / "cache.json").read_text())
    if info["kept"] == 0:
        raise UserError(f"{summary_line(info, cache_dir)}: every record was skipped")
    if rank == 0:
        print(cache_dir, flush=True)


main = hydra_command(run, name="preprocess")

if __name__ == "__main__":
    main()
