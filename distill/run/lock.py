"""One `distill` command per output folder at a time: two runs in one folder delete each other's
temporary dirs and interleave their metrics.

The lock is `<output_dir>/.distill.lock`, held by the main process for the whole command: an
exclusive `flock` on the file (the kernel drops it when the holder dies, SIGKILL included) and, in
the file, who holds it (pid, host, start time, command). A lock whose record names this host and
whose flock is free is stale (its holder is gone) and is taken over with a log line. A record from
another host cannot be checked from here (a shared file system may not carry flocks between
hosts), so it is refused with the holder named and how to remove it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.errors import OutputDirBusy

LOCK_FILE = ".distill.lock"


def _record() -> dict:
    import psutil

    me = psutil.Process()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "pid_created": me.create_time(),
        "command": " ".join(sys.argv),
    }


def _holder(record: dict) -> str:
    return (
        f"pid {record.get('pid')} on host {record.get('host')!r}, started "
        f"{record.get('started')} ({record.get('command') or 'unknown command'})"
    )


def _alive_here(record: dict) -> bool:
    """Whether the record's process still runs on this host (the same process, not a reused pid)."""
    import psutil

    try:
        created = psutil.Process(int(record["pid"])).create_time()
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False
    return abs(created - float(record.get("pid_created", created))) < 1.0


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        return json.loads(data) if data.strip() else None
    except ValueError:
        return None  # a holder killed while writing its record: nothing to name


class RunLock:
    """The lock of one output folder; `acquire` raises OutputDirBusy naming the holder."""

    def __init__(self, out_dir: Path, log: Callable[[str], None] = print):
        self.path = Path(out_dir) / LOCK_FILE
        self.log = log
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _try_flock(fd)
            if locked is False:
                record = _read(fd)
                os.close(fd)
                raise OutputDirBusy(self._busy(record))
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # its holder removed it as we opened it: take the new one
        try:
            self._check_stale(_read(fd), flock_works=locked is True)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(_record(), indent=1).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _check_stale(self, record: dict | None, flock_works: bool) -> None:
        if record is None:
            return
        if record.get("host") != socket.gethostname():
            raise OutputDirBusy(
                f"{self._busy(record)}. That host's processes cannot be checked from here; if no "
                f"`distill` runs there in this folder any more (the node crashed, the job was "
                f"killed), delete {self.path} and run again"
            )
        if not flock_works and _alive_here(record):
            raise OutputDirBusy(self._busy(record))
        self.log(
            f"taking over the stale lock {self.path} of {_holder(record)}: that process is gone"
        )

    def _busy(self, record: dict | None) -> str:
        holder = _holder(record) if record else "a process that has not written its record yet"
        return (
            f"output folder {self.path.parent} is in use by another distill command ({holder}); "
            "two runs in one folder spoil each other's files. Wait for it to finish or stop it "
            "(kill -TERM <pid> saves a checkpoint), or use another output_dir"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # still holding the flock: a waiter sees the file is gone
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def hold_output_lock(out_dir: Path, acc, log: Callable[[str], None]) -> Iterator[None]:
    """The output folder's lock for the block, taken by the main process only; when it cannot be
    had, every process raises the same OutputDirBusy (none runs against a folder it does not
    hold)."""
    lock = RunLock(out_dir, log)
    several = acc is not None and acc.num_processes > 1
    message = None
    if acc is None or acc.is_main_process:
        try:
            lock.acquire()
        except OutputDirBusy as err:
            if not several:
                raise
            message = str(err)
    if several:
        from accelerate.utils import broadcast_object_list

        shared = [message]
        broadcast_object_list(shared)
        message = shared[0]
    if message is not None:
        raise OutputDirBusy(message)
    try:
        yield
    finally:
        lock.release()
