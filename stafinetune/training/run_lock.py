"""One run at a time in a run directory: an advisory lock held for the run's whole life.

Rank 0 of a training run opens ``<run dir>/.run.lock`` and takes an exclusive
``fcntl.flock`` on it before anything is written there (config, metrics, checkpoints); it
keeps the file open until the run ends. The kernel drops the lock when the process exits for
any reason, ``kill -9`` included, so a stale lock never blocks the next run, and there is no
lock file to clean up by hand (the file stays; only an open, locked descriptor counts). The
holder writes its host, pid and start time into the file, which a second run on the same
directory quotes when it refuses to start.

On a filesystem without ``flock`` support the run goes ahead with a warning.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import IO

from stafinetune.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunDirectoryLocked(UserError):
    """Another live run holds the run directory; the message names its host, pid and start."""


def _holder(text: str) -> str:
    """How the lock file's record reads in a message."""
    try:
        info = json.loads(text)
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    """The exclusive lock of ``run_dir``; :meth:`acquire` it once, :meth:`release` at the end
    (or use it as a context manager).

    Args:
        run_dir: the run directory (created if missing).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock and record this process as its holder.

        Raises:
            RunDirectoryLocked: another live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = handle.read()
            handle.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryLocked(
                    f"run directory {self.path.parent} is in use by another run "
                    f"({_holder(holder)}); wait for it to end, or choose another hydra.run.dir"
                ) from None
            log.warning(
                "cannot lock %s (%s): nothing stops a second run from using this directory",
                self.path, err.strerror or err,
            )  # fmt: skip
            return
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock (a no-op when it is not held)."""
        if self._handle is not None:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
