"""What every command-line entry point shares: Hydra composition and the run directory.

A command is a function ``task(job, run_dir)`` receiving the validated root config (a
dataclass) and the run directory; :func:`hydra_command` turns it into a console-script
``main`` that composes ``conf/<config_name>.yaml`` with the command line, validates it
(a bad value exits with code 2 and one line naming the field) and hands over. A task
that finds bad input while running (a missing file, an empty folder) raises a
:class:`~stafinetune.errors.UserError`, which also ends the
command with code 2 and one line; so does a Hydra composition error (an unknown key, a value
of the wrong type) and a run directory Hydra cannot create. ``STAFINETUNE_DEBUG=1`` (or
``HYDRA_FULL_ERROR=1``) shows the traceback instead. Every message, and the traceback of a
bug, also goes to this rank's log file; under torchrun the message also goes where
``launch/torchrun.sh`` reads it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig

from stafinetune.config import conf_dir, to_job_config, unknown_key_message
from stafinetune.errors import UserError, debug_enabled


def hydra_command(
    task: Callable[[Any, Path], None], config_name: str = "config", *, name: str | None = None
) -> Callable[[], None]:
    """A console-script ``main`` running ``task`` on the composed, validated config.

    Hydra's own errors (an unknown key, a value of the wrong type, a missing config group
    option, an override it cannot parse, a run directory it cannot create) end the command
    with one line and exit code 2 instead of Hydra's multi-line report; so do a rejected
    config and a :class:`UserError` of the task. A rejected config leaves no run directory
    behind (Hydra's files of this start are removed when the folder held nothing else).
    ``STAFINETUNE_DEBUG=1`` / ``HYDRA_FULL_ERROR=1`` show the tracebacks instead (exit 1).

    ``--help`` opens with what the command does and how to see its config (the root
    config's ``hydra.help.header``: :func:`command_about`), then Hydra's list of groups and
    the composed config.

    Args:
        task: ``task(job, default_run_dir)``; ``default_run_dir`` is Hydra's output directory.
        config_name: the root file under ``conf/`` (``config`` for training).
        name: the command (``train``; a key of :data:`~stafinetune.commands.COMMANDS`), which
            ``--help`` names; None: Hydra's job name.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig

    started: list[Path] = []  # Hydra's output directory, once Hydra hands over a config
    user: dict[str, Any] = {}  # the user's debug switch and HYDRA_FULL_ERROR, per call

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        started.append(output_dir)
        # only what Hydra just made there: removed again if the config is rejected
        fresh = output_dir if _only_hydra_files(output_dir) else None
        with _environ(_FULL_ERROR, user["full_error"]):  # the task sees the user's setting
            try:
                job = to_job_config(cfg)
            except ValueError as err:
                if user["debug"]:
                    raise
                _reject(f"config error: {err}", fresh)
            try:
                task(job, output_dir)
            except UserError as err:  # the run's log keeps the message
                if user["debug"]:
                    raise
                _fail(f"error: {err}")
            except Exception:
                log_to_file(logging.ERROR, traceback.format_exc().rstrip())
                raise

    def main() -> None:
        sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]
        if name and {"--help", "-h"} & set(sys.argv[1:]):  # train, preprocess: one config
            sys.argv.append(f"hydra.help.app_name=stafinetune-{name}")
        started.clear()
        user.update(debug=debug_enabled(), full_error=os.environ.get(_FULL_ERROR))
        try:
            # Hydra then raises its errors instead of printing its own report
            with _environ(_FULL_ERROR, "1"):
                _main()
        except Exception as err:
            if not user["debug"] and not started:
                line = hydra_error_line(err)
                if line is not None:
                    _fail(line)
            traceback.print_exc()  # a bug, or debugging: the traceback, exit code 1
            sys.exit(1)

    return main


_FULL_ERROR = "HYDRA_FULL_ERROR"


def command_about(app_name: str) -> str:
    """The opening of a command's ``--help`` (resolver ``${stafinetune.about:APP}``): what
    ``stafinetune-<command>`` does and how to see the config it would run with."""
    from stafinetune.commands import COMMANDS

    what = COMMANDS.get(app_name.removeprefix("stafinetune-"), "a stafinetune command")
    return (
        f"{app_name}: {what}.\n\n"
        f"usage: {app_name} [group=option ...] [key=value ...]\n"
        f"The composed config it would run with: {app_name} [overrides] --cfg job\n"
        "Every key below can be overridden (key=value); Hydra's own options: --hydra-help.\n"
    )


def register_help_resolver() -> None:
    """Register ``${stafinetune.about:APP}`` (idempotent), used by ``hydra.help.header``."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("stafinetune.about"):
        OmegaConf.register_new_resolver("stafinetune.about", command_about)


register_help_resolver()


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """Set (or, for None, unset) one environment variable inside the block."""
    saved = os.environ.get(name)
    _setenv(name, value)
    try:
        yield
    finally:
        _setenv(name, saved)


def _setenv(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def hydra_error_line(err: BaseException) -> str | None:
    """One line for an error Hydra raised before handing over a config, or None when it is
    not the user's (a bug keeps its traceback).

    Composition errors keep OmegaConf's first line and the key; an unknown key gets the
    closest field (:func:`~stafinetune.config.unknown_key_message`); a run directory that
    cannot be created or written names the path.
    """
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    cause = err.__cause__
    schema = getattr(cause, "object_type", None)
    if dataclasses.is_dataclass(schema) and isinstance(schema, type):
        names = {f.name for f in dataclasses.fields(schema)}
        if getattr(cause, "key", None) not in names:  # a key the group has no field for
            return f"config error: {unknown_key_message(cause.full_key, schema)}"
    if isinstance(err, OverrideParseException):
        return f"config error: cannot parse the override {err.override!r}: {_first_line(err)}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        first = _first_line(err)
        override = re.search(r"override (\S+)", first)
        if isinstance(cause, OmegaConfBaseException):
            where = override.group(1) if override else getattr(cause, "full_key", "") or first
            return f"config error: {where}: {_first_line(cause)}"
        options = getattr(err, "options", None)
        if options:
            first += f" (options: {', '.join(options)})"
        return f"config error: {first}"
    chain = [err, err.__cause__, err.__context__]
    failed = next((e for e in chain if isinstance(e, OSError) and e.filename), None)
    if failed is not None:
        where = f" {failed.filename}" if failed.filename else ""
        return (
            f"error: cannot create or write the run directory{where}: "
            f"{failed.strerror or failed} (hydra.run.dir must name a writable folder)"
        )
    return None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _only_hydra_files(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but Hydra's record of this start (``.hydra/``) and
    empty log files: what Hydra creates before a command runs."""
    for path in folder.rglob("*"):
        if path.is_file():
            hydra_record = path.relative_to(folder).parts[0] == ".hydra"
            if not hydra_record and not (path.suffix == ".log" and path.stat().st_size == 0):
                return False
    return True


def _reject(message: str, fresh: Path | None) -> NoReturn:
    """:func:`_fail` with ``message``; first remove this process's Hydra files from
    ``fresh`` (a run directory Hydra made for this start), and the folders left empty.

    Under a launcher of several processes (``WORLD_SIZE`` > 1) the folders stay: the other
    ranks are creating their files in them at the same moment, and a folder removed under
    one of them fails its start with a different error. The launch script removes the
    folders left empty once every rank has ended (``launch/torchrun.sh``).
    """
    echo(message, error=True)
    _record_for_launcher(message)
    if fresh is not None:
        from hydra.core.hydra_config import HydraConfig

        subdir = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
        if subdir:
            shutil.rmtree(fresh / subdir, ignore_errors=True)
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                log_file = Path(handler.baseFilename)
                if log_file.is_relative_to(fresh):
                    root.removeHandler(handler)
                    handler.close()
                    log_file.unlink(missing_ok=True)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            remove_empty_folders(fresh)
    sys.exit(2)


def remove_empty_folders(root: Path) -> None:
    """Remove every empty folder under ``root``, deepest first, then ``root`` if empty
    (never a folder that holds a file)."""
    for folder in (*sorted(root.rglob("*"), reverse=True), root):
        if folder.is_dir():
            try:
                folder.rmdir()
            except OSError:
                pass


LAUNCHER_ERROR_FILE = "stafinetune_error.txt"


def _record_for_launcher(message: str) -> None:
    """Under torchrun, leave the one-line error where the launcher finds it.

    torchrun gives each rank an error file (``TORCHELASTIC_ERROR_FILE``): the line goes
    there in torchelastic's JSON, so torchrun's failure report shows it, and as plain text in
    :data:`LAUNCHER_ERROR_FILE` beside it, which ``launch/torchrun.sh`` prints last before it
    exits with code 2.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
        (Path(path).parent / LAUNCHER_ERROR_FILE).write_text(message + "\n")
    except OSError:
        pass


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
    _record_for_launcher(message)
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
    remove_empty_folders(hydra_dir)  # what Hydra created and is now empty


def shared_run_dir(default_run_dir: Path) -> Path:
    """Rank 0's run directory, on every rank of a launch (``default_run_dir`` in one process).

    For the commands whose run directory is Hydra's own (``sample``, ``eval``): a rank whose
    Hydra made another folder moves its files there (:func:`share_run_dir`).
    """
    from stafinetune.parallel import broadcast_object

    run_dir = Path(broadcast_object(str(default_run_dir.resolve())))  # type: ignore[arg-type]
    share_run_dir(default_run_dir, run_dir)
    return run_dir


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
