"""The one exception type for mistakes in what the user gave us, and where bugs stay bugs.

A :class:`UserError` carries a message that names the config field, file or folder at fault;
the command-line entry points (:mod:`stafinetune.commands.cli`) print it as one line and exit with
code 2, without a traceback. Anything else is a bug and keeps its traceback.

Library code that already raises ``ValueError`` / ``FileNotFoundError`` for bad input (config
dataclasses, model and data loading) is mapped to :class:`UserError` where the framework calls
it, with :func:`user_errors` around exactly those calls, never around a whole command.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

DEBUG_ENV = "STAFINETUNE_DEBUG"


class UserError(ValueError):
    """Bad input (config value, path, data) found at start-up or while running.

    The message names what to change. Printed as ``error: <message>``, exit code 2. A
    ``ValueError``, so callers of library code that caught the ``ValueError`` a bad value used
    to raise still catch it.
    """


@contextlib.contextmanager
def user_errors(*types: type[Exception], prefix: str = "") -> Iterator[None]:
    """Re-raise the given exception types (default ``ValueError``, ``FileNotFoundError``)
    from the block as :class:`UserError`, keeping the message (after ``prefix``).

    Wrap only calls whose exceptions of these types all describe the user's input.
    """
    caught = types or (ValueError, FileNotFoundError)
    try:
        yield
    except UserError:
        raise
    except caught as err:
        raise UserError(f"{prefix}{err}") from err


def debug_enabled() -> bool:
    """True when the user asked for tracebacks of user errors too (``STAFINETUNE_DEBUG=1``,
    or Hydra's own ``HYDRA_FULL_ERROR=1``)."""
    return any(
        os.environ.get(name, "") not in ("", "0") for name in (DEBUG_ENV, "HYDRA_FULL_ERROR")
    )
