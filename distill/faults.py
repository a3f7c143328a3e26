"""Deterministic fault injection, so tests can kill, corrupt and starve a real run at an exact
point, in training and in data preparation. Installed only when the DISTILL_FAULT environment variable is set (read once per stage), e.g.

    DISTILL_FAULT=kill_at_micro=5.1        SIGKILL itself before micro-batch 1 of step 5
    DISTILL_FAULT=slow_save=3              sleep 3 s after writing a checkpoint, before committing it
    DISTILL_FAULT=nan_at=3-7               make the loss NaN at steps 3..7
    DISTILL_FAULT=enospc_at_save=4         the save of step 4 writes its weights into /dev/full
    DISTILL_FAULT=fill_disk_at_save=4      fill the file system (checkpoints/disk-filler) just
                                           before the save of step 4, after its free-space check
    DISTILL_FAULT=step_sleep=0.3           sleep after every optimizer step (time to send a signal)
    DISTILL_FAULT=kill_after_store_shard=2 SIGKILL itself once the 2nd token-store shard is written
    DISTILL_FAULT=term_after_store_shard=2 SIGTERM itself at that point instead
    DISTILL_FAULT=kill_after_cache_shard=1 SIGKILL itself once teacher-cache shard 1 is written
    DISTILL_FAULT=term_in_phase=final-eval SIGTERM itself as that phase starts (a phase name of
                                           distill.runtime.signals: data, final-eval, export, ...)

Several faults are separated by commas.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

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

    def before_save(self, step: int, checkpoint_dir: Path) -> None:
        """A full disk at the real write point: the weights file of the checkpoint about to be
        written is a link to /dev/full, where every write fails with ENOSPC, so torch.save fails
        as it does on a full disk (a RuntimeError "unexpected pos", not an OSError)."""
        if self.settings.get("fill_disk_at_save") == str(step):
            fill_disk(checkpoint_dir.parent / FILLER)
        if self.settings.get("enospc_at_save") != str(step):
            return
        if not os.path.exists("/dev/full"):  # not Linux: raise what torch.save raises there
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 0 vs 0")
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / "pytorch_model.bin").symlink_to("/dev/full")

    def during_save(self, step: int) -> None:
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


FILLER = "disk-filler"


def fill_disk(path: Path) -> None:
    """Write `path` until the file system is full (another job filling a shared disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:  # ENOSPC (or EFBIG, EDQUOT): full at this chunk size
                continue
    finally:
        os.close(fd)


def from_env() -> Faults | None:
    """The faults DISTILL_FAULT asks for, or None (the production loop then calls nothing)."""
    text = os.environ.get("DISTILL_FAULT", "")
    settings = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    return Faults(settings) if settings else None
