"""Stopping a training run cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import threading


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop at the next safe point: the end of the
    current step, or the next batch of an evaluation. The first signal is answered at once
    on stderr, with `message` and what a second one does (when `message` is not empty); a
    second falls through to Python's default handling (Ctrl-C: KeyboardInterrupt, so the run
    stops without saving)."""

    def __init__(self, message: str = ""):
        self.signum: int | None = None
        self.message = message
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __call__(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.message:
            again = "press Ctrl-C" if signum == signal.SIGINT else f"send {signal.Signals(signum).name}"
            try:  # os.write, not print: a handler may interrupt a print to the same stream
                os.write(2, f"\n{self.message}; {again} again to quit without saving\n".encode())
            except OSError:
                pass

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
