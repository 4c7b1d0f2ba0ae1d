"""What a run directory holds and how a run resumes: the rules, in one place.

**One run per directory.** ``train.resume=auto`` (the default) continues the run in the
directory from its newest complete checkpoint, or starts it when there is none.
``train.resume=never`` needs a directory that holds no run yet (no checkpoint, no
``metrics.jsonl``): it refuses a used one instead of mixing two runs' checkpoints and
metrics. ``train.resume=<checkpoint or run>`` starts this run from another run's checkpoint,
also only in a directory without a run of its own, except that re-running the same command
(the directory's checkpoints were made with the same ``train.resume``) continues the run
from its own newest checkpoint, as a requeued job expects.

**Resuming with a changed config.** The checkpoint's config (``meta.json``, or the run's
``config.yaml`` for older checkpoints) is compared with the current one. Settings that a
resumed run can take (:data:`APPLY_ON_RESUME`: learning rate and schedule, steps, cadences,
loss weights, logging, loader workers, kernel backend) apply and are listed in one warning;
every other difference (model, attention tile and windows, data geometry and content, batch
size, seed, trainable set, parallel layout) stops the run, naming the fields.

**Logs follow the checkpoint.** Rows of ``metrics.jsonl`` / ``tables.jsonl`` past the step a
run resumes at are dropped, so the file holds each step once.

**Which checkpoint.** :func:`resolve_resume` turns ``train.resume`` into a checkpoint that
every rank agrees on; a damaged newest checkpoint is skipped with a warning naming it, and
a checkpoint from elsewhere that DeepSpeed would unpickle needs ``train.trust_checkpoint``
(:func:`check_trusted`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stafinetune.errors import UserError
from stafinetune.parallel import broadcast_object
from stafinetune.safety import load_json_file

from .checkpoint import list_checkpoints, verify_checkpoint

log = logging.getLogger(__name__)

# Settings a resumed run may change; they apply from the resumed step on.
APPLY_ON_RESUME = (
    "train.lr", "train.weight_decay", "train.betas", "train.eps", "train.warmup_steps",
    "train.schedule", "train.min_lr_ratio", "train.grad_clip", "train.steps",
    "train.log_every", "train.ckpt_every", "train.ckpt_minutes", "train.keep_last",
    "train.val_every", "train.export", "train.sample_steps", "train.num_samples",
    "train.sample_shift", "train.precision", "train.device", "train.ema_decay",
    "train.frozen_weights",
    "distill.*", "logging.*", "attention.backend", "attention.dense_first_steps", "attention.fp8",
    "model.gradient_checkpointing", "data.root", "data.cache_dir", "data.num_workers",
    "data.prefetch_factor", "data.decode_workers", "data.encode_batch_size", "data.device",
    "parallel.teacher", "parallel.find_unused_parameters", "model.allow_pickle_weights",
    "data.allow_pickle_weights", "offload.*",
)  # fmt: skip
# Not settings of the trained run (how this process was started).
_IGNORED = ("train.resume", "train.trust_checkpoint", "run_dir", "required")
_LOGS = ("metrics.jsonl", "tables.jsonl")


@dataclass(frozen=True)
class ConfigChange:
    """One setting that differs between the checkpoint's run and this one."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested dicts (lists stay whole values)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _applies(change: ConfigChange) -> bool:
    if change.key == "train.ema_decay" and (change.old is None) != (change.new is None):
        return False  # turning EMA on or off changes what a checkpoint holds
    return any(fnmatch.fnmatchcase(change.key, pattern) for pattern in APPLY_ON_RESUME)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[ConfigChange]:
    """Settings present in both configs whose values differ, in key order."""
    old, new = _flatten(saved), _flatten(current)
    return [
        ConfigChange(key, old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if key not in _IGNORED and old[key] != new[key]
    ]


def saved_config(checkpoint: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The config a checkpoint was written under, and the file it came from.

    ``meta.json``'s ``config``; for checkpoints written before it held one, the
    ``config.yaml`` of the run the checkpoint sits in. (None, None) when neither exists.
    """
    meta = load_json_file(checkpoint / "meta.json")
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return meta["config"], checkpoint / "meta.json"
    run_config = checkpoint.parent.parent / "config.yaml"
    if run_config.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(run_config)), run_config  # type: ignore[return-value]
    return None, None


def check_resume_config(checkpoint: Path, current: dict[str, Any]) -> list[ConfigChange]:
    """Compare the current resolved config with the checkpoint's; return the changes that apply.

    Raises:
        UserError: naming every setting that a resumed run cannot change.
    """
    saved, source = saved_config(checkpoint)
    if saved is None:
        log.warning("%s holds no config to compare with: resuming without a check", checkpoint)
        return []
    changes = config_changes(saved, current)
    refused = [c for c in changes if not _applies(c)]
    if refused:
        raise UserError(
            f"cannot resume from {checkpoint} with these settings changed: "
            + "; ".join(str(c) for c in refused)
            + f". They change the model, the data or the checkpoint's layout; resume with the "
            f"values in {source}, or start a new run in another hydra.run.dir"
        )
    return changes


def _holds_run(run_dir: Path) -> str | None:
    """What shows that ``run_dir`` already holds a run (None: nothing)."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(p.name.startswith("step_") for p in ckpt_dir.iterdir()):
        return f"checkpoints in {ckpt_dir}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return str(metrics)
    return None


def _step(checkpoint: Path) -> int:
    """The step of a checkpoint, from its folder name (``step_XXXXXXXX``; any name for a
    verified checkpoint given by path: its ``meta.json``)."""
    match = re.match(r"^step_(\d{8})$", checkpoint.name)
    if match:
        return int(match.group(1))
    return int(load_json_file(checkpoint / "meta.json")["step"])


def resume_point(run_dir: Path, resume: str | None, checkpoint: Path | None) -> Path | None:
    """Apply the run-directory rules (module docstring) to the checkpoint that ``train.resume``
    resolved to; returns the checkpoint to load (None: start fresh).

    Raises:
        UserError: ``run_dir`` holds another run, or newer checkpoints than the one asked for.
    """
    if resume in (None, "", "auto"):
        return checkpoint
    used = _holds_run(run_dir)
    ckpt_dir = (run_dir / "checkpoints").resolve()
    if resume == "never":
        if used:
            raise UserError(
                f"train.resume=never but {run_dir} already holds a run ({used}); choose a new "
                "hydra.run.dir, remove the old run, or continue it with train.resume=auto"
            )
        return None
    assert checkpoint is not None  # resolve_resume raises when a path holds no checkpoint
    if checkpoint.resolve().parent == ckpt_dir:  # one of this run's own checkpoints
        newer = [p.name for p in list_checkpoints(ckpt_dir) if _step(p) > _step(checkpoint)]
        if newer:
            raise UserError(
                f"train.resume={resume} goes back to step {_step(checkpoint)}, but {ckpt_dir} "
                f"holds newer checkpoints ({', '.join(newer)}) that would mix with the resumed "
                "run; remove them first"
            )
        return checkpoint
    if not used:
        return checkpoint
    own = list_checkpoints(ckpt_dir)
    if own:
        saved, _ = saved_config(own[-1])
        if saved is not None and _flatten(saved).get("train.resume") == resume:
            log.warning(
                "%s already continues train.resume=%s: resuming from its own %s",
                run_dir, resume, own[-1].name,
            )  # fmt: skip
            return own[-1]
    raise UserError(
        f"train.resume={resume} starts from another run's checkpoint, but {run_dir} already "
        f"holds a run ({used}); choose a new hydra.run.dir"
    )


def cut_logs(run_dir: Path, step: int | None) -> None:
    """Drop the rows of ``metrics.jsonl`` and ``tables.jsonl`` logged after ``step`` (None: a
    fresh start, drop every row), so a resumed run logs each step once."""
    for name in _LOGS:
        path = run_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
            if step is not None and row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of each param group as the current config sets them (call after
    the scheduler is built, so ``initial_lr`` is the configured learning rate)."""
    return [
        {k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups
    ]


def apply_optimizer_settings(
    scheduler: torch.optim.lr_scheduler.LambdaLR, settings: list[dict[str, Any]]
) -> None:
    """Put the configured hyper-parameters back after loading a checkpoint.

    Loading restores the param groups (lr, betas, eps, weight decay) and the scheduler's base
    learning rates of the run that wrote it; a changed ``train.lr`` or schedule would be
    ignored. The scheduler's step count stays; the learning rate is recomputed from it with
    the current schedule (unchanged settings give back the saved value exactly).
    """
    groups = scheduler.optimizer.param_groups
    if len(groups) != len(settings):
        raise ValueError(f"the optimizer has {len(groups)} param groups, expected {len(settings)}")
    for group, fresh in zip(groups, settings, strict=True):
        group.update(fresh)
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def _newest_complete(folder: Path, skipped: list[str]) -> Path | None:
    """The newest checkpoint under ``folder`` that verifies; damaged ones go to ``skipped``."""
    for path in reversed(list_checkpoints(folder)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        skipped.append(f"{path} ({problem})")
    return None


def _choose(resume: str, ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """(checkpoint, damaged ones skipped) for ``train.resume`` (not never); raises on errors."""
    skipped: list[str] = []
    if resume == "auto":
        choice = _newest_complete(ckpt_dir, skipped)
        if choice is None and skipped:
            raise ValueError(
                f"train.resume=auto: no complete checkpoint in {ckpt_dir}; damaged: "
                + "; ".join(skipped)
            )
        return choice, skipped
    given = Path(resume).expanduser()
    if (given / "meta.json").is_file():
        problem = verify_checkpoint(given)
        if problem:
            raise ValueError(f"train.resume={resume!r}: checkpoint {given} is damaged: {problem}")
        return given, skipped
    choice = _newest_complete(given, skipped) or _newest_complete(given / "checkpoints", skipped)
    if choice is None:
        damaged = f"; damaged: {'; '.join(skipped)}" if skipped else ""
        raise FileNotFoundError(
            f"train.resume={resume!r}: no complete checkpoint found there{damaged}"
        )
    return choice, skipped


def check_trusted(path: Path, run_dir: Path, *, pickles: bool, trust: bool) -> None:
    """Refuse to hand a checkpoint from outside ``run_dir`` to an engine that unpickles it.

    ``pickles``: the run's engine loads pickle files (DeepSpeed does, with
    ``weights_only=False``); ``trust``: ``train.trust_checkpoint``.
    """
    inside = Path(path).resolve().is_relative_to(Path(run_dir).resolve())
    if pickles and not inside and not trust:
        raise ValueError(
            f"train.resume: {path} is outside this run directory ({run_dir}), and "
            "parallel=zero2/zero3 checkpoints are DeepSpeed pickle files that can run code when "
            "loaded; set train.trust_checkpoint=true if you trust where it came from"
        )


def resolve_resume(resume: str | None, ckpt_dir: Path, is_main: bool) -> Path | None:
    """Turn ``train.resume`` into a checkpoint path, agreed on by every rank.

    ``None``/"never": start fresh. "auto": the newest complete checkpoint in this run, if any
    (damaged newer ones are skipped with a warning). Anything else: a checkpoint directory, or
    a run/checkpoints directory whose newest complete checkpoint is used. Rank 0 decides and
    every rank raises the same error (FileNotFoundError: nothing there; ValueError: damaged).
    """
    answer: tuple[Path | None, list[str], BaseException | None] = (None, [], None)
    if is_main and resume not in (None, "never", ""):
        try:
            answer = (*_choose(resume, ckpt_dir), None)
        except (FileNotFoundError, ValueError) as err:
            answer = (None, [], err)
    choice, skipped, error = broadcast_object(answer)  # type: ignore[misc]
    if error is not None:
        raise error
    if is_main and skipped:
        log.warning(
            "skipping damaged checkpoint(s): %s; resuming from %s", "; ".join(skipped), choice
        )
    return choice
