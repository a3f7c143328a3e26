"""SIGTERM/SIGUSR1: finish the optimizer step, save, exit 75 (run again to resume)."""

from __future__ import annotations

import os
import signal
import sys

from distill.errors import EXIT_INTERRUPTED


class SignalWatch:
    """SIGTERM/SIGUSR1: finish the optimizer step, save, exit. A second one: exit at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            print("distill: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        print(
            f"distill: got {signal.Signals(signum).name}; saving a checkpoint after this step",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
