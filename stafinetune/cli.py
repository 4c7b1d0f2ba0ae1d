"""What every command-line entry point shares: Hydra composition and the run directory.

A command is a function ``task(job, run_dir)`` receiving the validated root config (a
dataclass) and the run directory; :func:`hydra_command` turns it into a console-script
``main`` that composes ``conf/<config_name>.yaml`` with the command line, validates it
(a bad value exits with code 2 and one line naming the field) and hands over. A task
that finds bad input while running (a missing file, an empty folder) raises
:class:`CommandError`, which also ends the command with code 2 and one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from .config import conf_dir, to_job_config


class CommandError(Exception):
    """Bad input a command finds after start-up; printed as ``error: <message>``, exit code 2.

    The message names the config field or file at fault. Raise it only for the user's input,
    never for a bug (those keep their traceback).
    """


def hydra_command(
    task: Callable[[Any, Path], None], config_name: str = "config"
) -> Callable[[], None]:
    """A console-script ``main`` running ``task`` on the composed, validated config.

    Args:
        task: ``task(job, default_run_dir)``; ``default_run_dir`` is Hydra's output directory.
        config_name: the root file under ``conf/`` (``config`` for training).
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        try:
            job = to_job_config(cfg)
        except ValueError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        try:
            task(job, Path(HydraConfig.get().runtime.output_dir))
        except CommandError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def main() -> None:
        sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]
        _main()

    return main


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (the deepspeed launcher appends it; Hydra
    would reject it) into ``LOCAL_RANK``, keeping every Hydra override."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for flag in ("--local_rank", "--local-rank"):
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                break
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                skip = True
                break
        else:
            out.append(arg)
    return out


def config_error(err: Exception) -> NoReturn:
    """Stop a command over a bad input: one line naming the field on stderr, exit code 2.

    For checks a task can only make after composition (e.g. against the data's canvas).
    """
    print(f"config error: {err}", file=sys.stderr)
    sys.exit(2)
