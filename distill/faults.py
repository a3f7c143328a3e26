"""Deterministic fault injection, so tests can kill, corrupt and starve a real run at an exact
point, in training and in data preparation. Installed only when the DISTILL_FAULT environment variable is set (read once per stage), e.g.

    DISTILL_FAULT=kill_at_micro=5.1        SIGKILL itself before micro-batch 1 of step 5
    DISTILL_FAULT=slow_save=3              sleep 3 s after writing a checkpoint, before committing it
    DISTILL_FAULT=nan_at=3-7               make the loss NaN at steps 3..7
    DISTILL_FAULT=enospc_at_save=4         fail the save of step 4 with "No space left on device"
    DISTILL_FAULT=step_sleep=0.3           sleep after every optimizer step (time to send a signal)
    DISTILL_FAULT=kill_after_store_shard=2 SIGKILL itself once the 2nd token-store shard is written
    DISTILL_FAULT=term_after_store_shard=2 SIGTERM itself at that point instead
    DISTILL_FAULT=kill_after_cache_shard=1 SIGKILL itself once teacher-cache shard 1 is written
    DISTILL_FAULT=term_in_phase=final-eval SIGTERM itself as that phase starts (a phase name of
                                           distill.runtime.signals: data, final-eval, export, ...)

Several faults are separated by commas.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Faults:
    """The faults of one DISTILL_FAULT setting; each method is a point in the loop."""

    settings: dict[str, str]

    def before_micro(self, step: int, micro: int) -> None:
        if self.settings.get("kill_at_micro") == f"{step}.{micro}":
            os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        span = self.settings.get("nan_at")
        if span:
            lo, _, hi = span.partition("-")
            if int(lo) <= step <= int(hi or lo):
                return loss * float("nan")
        return loss

    def during_save(self, step: int) -> None:
        if self.settings.get("enospc_at_save") == str(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if "slow_save" in self.settings:
            time.sleep(float(self.settings["slow_save"]))

    def after_cache_shard(self, index: int) -> None:
        if self.settings.get("kill_after_cache_shard") == str(index):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self) -> None:
        if "step_sleep" in self.settings:
            time.sleep(float(self.settings["step_sleep"]))

    def in_phase(self, name: str) -> None:
        if self.settings.get("term_in_phase") == name:
            os.kill(os.getpid(), signal.SIGTERM)

    def after_store_shard(self, count: int) -> None:
        if self.settings.get("kill_after_store_shard") == str(count):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.settings.get("term_after_store_shard") == str(count):
            os.kill(os.getpid(), signal.SIGTERM)


def from_env() -> Faults | None:
    """The faults DISTILL_FAULT asks for, or None (the production loop then calls nothing)."""
    text = os.environ.get("DISTILL_FAULT", "")
    settings = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    return Faults(settings) if settings else None
