"""Running a console-script ``main`` in-process, as the entry points do, without paying a
Python start-up per case."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


def run_command(
    main: Callable[[], None], *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a console-script ``main`` given ``args``."""
    argv = sys.argv
    sys.argv = ["stafinetune", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """The non-blank lines of stderr, without the data pipeline's progress bars."""
    return [line for line in err.splitlines() if line.strip() and "[data]" not in line]
