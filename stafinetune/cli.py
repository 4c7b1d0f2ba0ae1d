"""What every command-line entry point shares: Hydra composition and the run directory.

A command is a function ``task(job, run_dir)`` receiving the validated root config (a
dataclass) and the run directory; :func:`hydra_command` turns it into a console-script
``main`` that composes ``conf/<config_name>.yaml`` with the command line, validates it
(a bad value exits with code 2 and one line naming the field) and hands over.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from .config import conf_dir, to_job_config


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
            config_error(err)
        task(job, Path(HydraConfig.get().runtime.output_dir))

    return _main


def config_error(err: Exception) -> NoReturn:
    """Stop a command over a bad input: one line naming the field on stderr, exit code 2.

    For checks a task can only make after composition (e.g. against the data's canvas).
    """
    print(f"config error: {err}", file=sys.stderr)
    sys.exit(2)
