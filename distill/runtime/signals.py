"""SIGTERM/SIGUSR1 in every phase of a run: the first one asks for a stop, honoured at the next
safe point (the training loop's next optimizer step, which saves a checkpoint first; elsewhere the
next phase boundary, which leaves nothing unfinished marked done); both end with exit 75 (run again
to resume). A second one exits at once (130), unless it comes within REPEAT_WINDOW_S of the first:
that is the same stop delivered twice (`scancel` signals every process of a job step, and the
launcher passes its own copy on to its workers).

One watch serves the whole command: the outermost caller installs it (`distill run`, `distill
data`) and inner ones (the training loop) reuse it, so no phase falls back to the default action
(killed at once, nothing saved).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from distill.errors import EXIT_INTERRUPTED, StopRequested

TRAINING = "training"
REPEAT_WINDOW_S = 3.0


class SignalWatch:
    """SIGTERM/SIGUSR1: note the request; a second one: exit at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._first_at = 0.0
        self.phase, self.stage = "setup", None
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
            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return
            print("distill: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.requested, self._first_at = True, time.monotonic()
        then = (
            "saving a checkpoint after this step"
            if self.phase == TRAINING
            else "stopping at the end of this phase (nothing unfinished is marked done)"
        )
        print(
            f"distill: got {signal.Signals(signum).name} during {self.where()}; {then}",
            file=sys.stderr,
            flush=True,
        )

    def where(self) -> str:
        return f"{self.phase} of stage {self.stage!r}" if self.stage else self.phase

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_active: SignalWatch | None = None


@contextlib.contextmanager
def watch() -> Iterator[SignalWatch]:
    """The command's watch: installed by the outermost caller, the same object for inner ones."""
    global _active
    if _active is not None:
        yield _active
        return
    with SignalWatch() as installed:
        _active = installed
        try:
            yield installed
        finally:
            _active = None


def enter_phase(name: str, stage: str | None = None) -> None:
    """Name the phase now running (for the messages), and fire a `term_in_phase` fault there.
    Phases: data, setup (a training stage before its loop), training, final-eval, export (a
    training stage's model dir, or an export stage), measure (a stage's eval metrics), prune, ptq,
    cache-teacher, evaluate, report."""
    if _active is not None:
        _active.phase, _active.stage = name, stage
    if "DISTILL_FAULT" in os.environ:
        from distill.faults import from_env

        faults = from_env()
        if faults:
            faults.in_phase(name)


def requested() -> bool:
    """Whether this process was asked to stop (no communication: for one process's own loops)."""
    return _active is not None and _active.requested


def stop_agreed(acc=None, also: bool = False) -> bool:
    """Whether any process was asked to stop (or says `also`); a collective when there are
    several (every rank must call it at the same point, and all then take the same branch)."""
    flag = requested() or also
    if acc is None or acc.num_processes == 1:
        return flag
    import torch

    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum") > 0)


def stop_point(acc=None, phase: str | None = None, checkpoint: Path | None = None) -> None:
    """A safe point: raise StopRequested (exit 75) on every rank when any was asked to stop."""
    if stop_agreed(acc):
        raise StopRequested(checkpoint, phase or (_active.where() if _active else None))


# ----------------------------------------------------------------------------------------------
# Workers of a launcher


ORPHAN_GRACE_ENV = "DISTILL_ORPHAN_GRACE_S"
"""Seconds a worker whose launcher died may take to save and stop before it exits at once."""


def exit_with_launcher() -> None:
    """A worker started by a launcher (torchrun, `accelerate launch`) stops when the launcher
    dies: torchrun starts each worker in a session of its own, so killing the launcher's process
    group (or the launcher alone) would leave them training beside the next run.

    When the launcher is gone the worker sends itself one SIGTERM, which the watch turns into
    checkpoint-and-stop (before the watch is installed: the default, exit at once). Linux tells it
    at once: `PR_SET_PDEATHSIG`, with SIGUSR2 rather than SIGTERM because the kernel sends it again
    as each of the dying launcher's threads exits, which the watch would take for a second signal.
    A daemon thread polling the parent pid each second covers other systems, and a worker that
    cannot reach its next safe point because a peer is gone (blocked in a collective): it exits at
    once `DISTILL_ORPHAN_GRACE_S` (120) s after its launcher died.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return  # a command started by a shell or a scheduler directly: nohup must keep working
    if threading.current_thread() is not threading.main_thread():
        return
    parent = os.getppid()
    told = []

    def launcher_gone(*_) -> None:
        if not told:
            told.append(True)
            print("distill: the launcher is gone; stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR2, launcher_gone)
    _set_pdeathsig(signal.SIGUSR2)
    grace = float(os.environ.get(ORPHAN_GRACE_ENV, "120"))

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler runs in the main thread, once
        time.sleep(grace)
        print("distill: the launcher is gone and this worker did not stop; exiting", flush=True)
        os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=poll, name="distill-launcher-watch", daemon=True).start()


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
