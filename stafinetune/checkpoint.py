"""Atomic, resumable training checkpoints.

Layout of one checkpoint, ``<run>/checkpoints/step_00000100/``:

    model.safetensors     trainable student weights (the full module state)
    ema.safetensors       EMA weights (when EMA is on)
    optimizer.pt          optimiser state
    trainer.pt            step, scheduler, anything the loop needs to continue
    rank_00000.pt ...     per-rank RNG states and data-loader position
    meta.json             step, time, world size (written last)

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed into place only once every
file is flushed to disk, so a crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def rng_state() -> dict[str, Any]:
    """Capture python, numpy, torch CPU and CUDA RNG states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous_state(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module_state.items()}


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    found = [p for p in found if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    model_state: dict[str, torch.Tensor] | None,
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write one checkpoint atomically; every rank calls this (rank 0 writes the shared parts).

    Args:
        ckpt_dir: folder holding the run's checkpoints.
        step: optimiser steps done.
        model_state, ema_state, optimizer_state: rank 0's full states (others pass None).
        trainer_state: scheduler and loop state (rank 0).
        rank_state: this rank's own state (RNG, data position).
        keep_last: checkpoints to keep; older complete ones are removed after the write.
    Returns:
        The final checkpoint directory.
    """
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"step_{step:08d}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    rank_file = tmp / f"rank_{rank:05d}.pt"
    torch.save(rank_state, rank_file)
    _fsync_file(rank_file)
    barrier()
    if rank == 0:
        if model_state is not None:
            save_file(_contiguous_state(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_contiguous_state(ema_state), str(tmp / "ema.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        meta = {"step": step, "world_size": world_size, "time": time.time(), "format": 1}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for path in tmp.iterdir():
            _fsync_file(path)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, *, rank: int, world_size: int) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns a dict with ``step``, ``model``, ``ema`` (or None), ``optimizer`` (or None),
    ``trainer`` and ``rank`` (this rank's own state).
    """
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {path} was written by {meta['world_size']} ranks but this run has "
            f"{world_size}; exact resume needs the same world size"
        )
    ema_path = path / "ema.safetensors"
    opt_path = path / "optimizer.pt"
    return {
        "step": int(meta["step"]),
        "model": load_file(str(path / "model.safetensors")),
        "ema": load_file(str(ema_path)) if ema_path.exists() else None,
        "optimizer": torch.load(opt_path, weights_only=False) if opt_path.exists() else None,
        "trainer": torch.load(path / "trainer.pt", weights_only=False),
        "rank": torch.load(path / f"rank_{rank:05d}.pt", weights_only=False),
    }


def resolve_resume(resume: str | None, ckpt_dir: Path, is_main: bool) -> Path | None:
    """Turn ``train.resume`` into a checkpoint path, agreed on by every rank.

    ``None``/"never": start fresh. "auto": the latest checkpoint in this run, if any.
    Anything else: a checkpoint directory, or a run/checkpoints directory whose latest is used.
    """
    choice: Path | None = None
    if is_main and resume not in (None, "never", ""):
        if resume == "auto":
            choice = latest_checkpoint(ckpt_dir)
        else:
            given = Path(resume).expanduser()
            if (given / "meta.json").is_file():
                choice = given
            else:
                choice = latest_checkpoint(given) or latest_checkpoint(given / "checkpoints")
                if choice is None:
                    raise FileNotFoundError(
                        f"train.resume={resume!r}: no complete checkpoint found there"
                    )
    return broadcast_object(choice)  # type: ignore[return-value]
