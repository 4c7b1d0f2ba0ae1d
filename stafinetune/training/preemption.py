"""Preemption: SIGTERM or SIGUSR1 become a checkpoint and a clean stop.

SIGTERM (preemption, ``scancel``, torchrun passing on its own SIGTERM) or SIGUSR1 asks the
loop (:class:`StopSignals`) to finish its step, write a checkpoint and stop; the command then
exits with 128 + the signal number. SIGINT (Ctrl-C) still interrupts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """Turns SIGTERM and SIGUSR1 into a request to checkpoint and stop at the next step.

    :meth:`install` before the training loop, :meth:`restore` after it (or use it as a
    context manager). Handlers can only be set from the main thread; elsewhere it does
    nothing. Further signals while installed only repeat the request, so a launcher that
    passes a signal on twice cannot kill a checkpoint being written.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Catch the signals (from the main thread only)."""
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning("%s received: checkpointing after this step, then stopping",
                        signal.Signals(signum).name)  # fmt: skip
        self.received = signal.Signals(signum)
