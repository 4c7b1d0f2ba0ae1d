"""What every command-line entry point shares: Hydra composition and the run directory.

A command is a function ``task(job, run_dir)`` receiving the validated root config (a
dataclass) and the run directory; :func:`hydra_command` turns it into a console-script
``main`` that composes ``conf/<config_name>.yaml`` with the command line, validates it
(a bad value exits with code 2 and one line naming the field) and hands over. A task
that finds bad input while running (a missing file, an empty folder) raises a
:class:`~stafinetune.errors.UserError`, which also ends the
command with code 2 and one line; so does a Hydra composition error (an unknown key, a value
of the wrong type). ``STAFINETUNE_DEBUG=1`` (or ``HYDRA_FULL_ERROR=1``) shows the traceback
instead. Every message, and the traceback of a bug, also goes to this rank's log file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from stafinetune.config import conf_dir, to_job_config
from stafinetune.errors import UserError, debug_enabled


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

    composed = []  # set once Hydra hands over a composed config

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        composed.append(True)
        try:
            job = to_job_config(cfg)
        except ValueError as err:
            if debug_enabled():
                raise
            config_error(err)
        try:
            task(job, Path(HydraConfig.get().runtime.output_dir))
        except UserError as err:
            if debug_enabled():
                raise
            _fail(f"error: {err}")
        except Exception:
            log_to_file(logging.ERROR, traceback.format_exc().rstrip())
            raise

    def main() -> None:
        sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]
        composed.clear()
        try:
            _main()
        except SystemExit as exc:
            # Hydra reports a composition error (unknown key, wrong type) in one message and
            # exits 1 before calling us: that is a user error too
            if exc.code == 1 and not composed:
                sys.exit(2)
            raise

    return main


def log_to_file(level: int, text: str) -> None:
    """Append ``text`` to this process's log file(s) only (Hydra's ``train_rank<N>.log``)."""
    record = logging.LogRecord("stafinetune", level, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def echo(text: str, *, error: bool = False) -> None:
    """Print ``text`` (on stderr when ``error``) and append it to this rank's log file, so
    the log holds what the console showed."""
    print(text, file=sys.stderr if error else sys.stdout, flush=True)
    log_to_file(logging.ERROR if error else logging.INFO, text)


def _fail(message: str) -> NoReturn:
    echo(message, error=True)
    sys.exit(2)


def share_run_dir(hydra_dir: Path, run_dir: Path, output_subdir: str | None = None) -> None:
    """Move this process's Hydra files into ``run_dir`` when Hydra made its own folder.

    Ranks started a second apart get different ``outputs/<date>/<time>`` folders when
    ``hydra.run.dir`` is not set, and ``run_dir=...`` names another folder: the rank's
    ``.hydra/rank<N>`` (``output_subdir``, default Hydra's) and its open log file move to
    ``run_dir`` (appended to a log of an earlier attempt), and the emptied folder is removed.
    """
    hydra_dir, run_dir = hydra_dir.resolve(), run_dir.resolve()
    if hydra_dir == run_dir:
        return
    if output_subdir is None:
        from hydra.core.hydra_config import HydraConfig

        output_subdir = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if output_subdir and (hydra_dir / output_subdir).is_dir():
        target = run_dir / output_subdir
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(hydra_dir / output_subdir), str(target))
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        old = Path(handler.baseFilename)
        if not old.is_relative_to(hydra_dir):
            continue
        handler.acquire()
        try:
            handler.close()
            new = run_dir / old.relative_to(hydra_dir)
            new.parent.mkdir(parents=True, exist_ok=True)
            if old.is_file():
                with open(new, "ab") as dst:
                    dst.write(old.read_bytes())
                old.unlink()
            handler.baseFilename, handler.mode = str(new), "a"
            handler.stream = handler._open()
        finally:
            handler.release()
    # remove what Hydra created and is now empty (never anything holding files)
    for folder in (*sorted(hydra_dir.rglob("*"), reverse=True), hydra_dir):
        if folder.is_dir():
            try:
                folder.rmdir()
            except OSError:
                pass


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
    _fail(f"config error: {err}")
