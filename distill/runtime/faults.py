"""Deterministic fault injection, so tests can kill, corrupt and starve a real run at an exact
point. Off unless the DISTILL_FAULT environment variable is set, e.g.

    DISTILL_FAULT=kill_at_micro=5.1        SIGKILL itself before micro-batch 1 of step 5
    DISTILL_FAULT=slow_save=3              sleep 3 s after writing a checkpoint, before committing it
    DISTILL_FAULT=nan_at=3-7               make the loss NaN at steps 3..7
    DISTILL_FAULT=enospc_at_save=4         fail the save of step 4 with "No space left on device"
    DISTILL_FAULT=step_sleep=0.3           sleep after every optimizer step (time to send a signal)
    DISTILL_FAULT=kill_after_shard=2       SIGKILL itself once the 2nd token-store shard is written
    DISTILL_FAULT=term_after_shard=2       SIGTERM itself at that point instead

Several faults are separated by commas.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def _faults() -> dict[str, str]:
    text = os.environ.get("DISTILL_FAULT", "")
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def before_micro(step: int, micro: int) -> None:
    at = _faults().get("kill_at_micro")
    if at and at == f"{step}.{micro}":
        os.kill(os.getpid(), signal.SIGKILL)


def loss_is_poisoned(step: int) -> bool:
    span = _faults().get("nan_at")
    if not span:
        return False
    lo, _, hi = span.partition("-")
    return int(lo) <= step <= int(hi or lo)


def during_save(step: int) -> None:
    faults = _faults()
    if faults.get("enospc_at_save") == str(step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if "slow_save" in faults:
        time.sleep(float(faults["slow_save"]))


def after_step() -> None:
    pause = _faults().get("step_sleep")
    if pause:
        time.sleep(float(pause))


def after_shard(count: int) -> None:
    faults = _faults()
    if faults.get("kill_after_shard") == str(count):
        os.kill(os.getpid(), signal.SIGKILL)
    if faults.get("term_after_shard") == str(count):
        os.kill(os.getpid(), signal.SIGTERM)
