"""Stopping a training run cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop at the end of the current step; a second
    signal falls through to Python's default handling."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
