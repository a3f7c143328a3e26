"""Durable files: what every writer (checkpoints, model dirs, the token store, the teacher cache,
exports, the report) does the same way: write under a temporary name in the same directory, fsync,
rename; check free space before a large write; and turn a failed write, whatever the library raised,
into one `DiskWriteError` naming the path, the free space and what is intact."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from distill.errors import DiskWriteError, DistillError

TMP_PREFIX = ".tmp-"

LOW_SPACE_BYTES = 4 << 20
"""Below this much free space a file system counts as full: a write that failed there failed for
want of room, whatever the library made of it (writes fail a page or a block short of zero)."""

# The libraries do not all report a failed write as an OSError: torch.save's C++ writer raises
# RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") (after
# "basic_ios::clear: iostream error"),
# safetensors SafetensorError("Error while serializing: I/O error: No space left on device (os
# error 28)"), and others wrap the OSError in their own type. These phrases are those libraries'
# words for "the bytes did not reach the file".
_WRITE_FAILURE_TEXTS = (
    "unexpected pos",
    "iostream error",
    "No space left",
    "Disk quota",
    "Read-only file system",
    "I/O error",
    "os error",
    "Input/output error",
)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (memory independent of the file's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def free_bytes(path: Path) -> int | None:
    """Free space (for this user) on the file system that holds, or would hold, `path`."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_write_failure(err: BaseException, free: int | None) -> bool:
    """Whether `err`, raised while writing, means the write itself failed (and not a bug in what
    was being written): an OSError anywhere in its chain, a library's words for a failed write, or
    any error at all once the file system is full. Anything else stays a traceback."""
    seen: BaseException | None = err
    for _ in range(8):  # the chain of causes, bounded (a chain can loop)
        if seen is None:
            break
        if isinstance(seen, OSError) or any(t in str(seen) for t in _WRITE_FAILURE_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return free is not None and free < LOW_SPACE_BYTES


def _space_sentence(path: Path, free_at: int | None, free_now: int | None, needed: int | None):
    if free_now is None:
        return f"The free space of the file system holding {path} cannot be read"
    text = f"The file system holding {path} has {format_bytes(free_now)} free"
    if free_at is not None and free_at < LOW_SPACE_BYTES:
        text += f" ({format_bytes(free_at)} when the write failed: No space left on device)"
    if needed:
        text += f"; about {format_bytes(needed)} were to be written"
    return text


@contextlib.contextmanager
def writing(
    path: Path,
    what: str,
    intact: str,
    *,
    needed: int | None = None,
    cleanup: Callable[[], None] | None = None,
    fix: str = "Free space there, or point `output_dir` at a file system with room (or fix its "
    "permissions), then run the same command again.",
) -> Iterator[None]:
    """Around a write to `path` (and only the write: any OSError in the block counts as one):
    a failure becomes a DiskWriteError saying `what` failed, the free space there, and `intact`
    (what the failure left untouched). `cleanup` removes the partial write first."""
    try:
        yield
    except DistillError:
        _clean(cleanup)
        raise  # already says what to do (a recipe error found mid-write, an inner write)
    except Exception as err:
        free_at = free_bytes(path)
        _clean(cleanup)
        if not is_write_failure(err, free_at):
            raise
        reason = (str(err).strip().splitlines() or [""])[0].rstrip(".")
        raise DiskWriteError(
            f"{what} failed: {type(err).__name__}: {reason}. "
            f"{_space_sentence(Path(path), free_at, free_bytes(path), needed)}. {intact}. {fix}"
        ) from err


def _clean(cleanup: Callable[[], None] | None) -> None:
    if cleanup:
        with contextlib.suppress(OSError):  # best effort: the error to report is the write's
            cleanup()


def check_free_space(path: Path, needed: int, what: str, fix: str) -> None:
    """Refuse, before writing anything, a write of about `needed` bytes (plus 10%) that cannot fit
    in the file system holding `path`."""
    free = free_bytes(path)
    if free is not None and needed and free < needed * 1.1:
        raise DiskWriteError(
            f"not enough disk space for {what} in {path}: {format_bytes(free)} free, about "
            f"{format_bytes(needed)} needed. Nothing was written. {fix}"
        )


def _intact(path: Path) -> str:
    if path.exists():
        return f"The previous {path} is unchanged"
    return f"Nothing was written to {path}"


@contextlib.contextmanager
def atomic_file(
    path: Path, what: str | None = None, needed: int | None = None, intact: str | None = None
) -> Iterator[Path]:
    """Write a whole file or nothing, for writers that take a path (matplotlib, gguf): the block
    writes the yielded temporary name in the same directory, which is fsynced and renamed."""
    path = Path(path)
    tmp = path.with_name(TMP_PREFIX + path.name)
    with writing(
        path,
        what or f"writing {path}",
        intact or _intact(path),
        needed=needed,
        cleanup=lambda: tmp.unlink(missing_ok=True),
    ):
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)


def atomic_write(
    path: Path, data: bytes | str, what: str | None = None, intact: str | None = None
) -> None:
    """Write a whole file or nothing: a temporary name in the same directory, fsync, rename."""
    content = data.encode() if isinstance(data, str) else data
    with atomic_file(path, what, len(content), intact) as tmp:
        tmp.write_bytes(content)


@contextlib.contextmanager
def atomic_dir(
    out: Path, what: str, needed: int | None = None, merge: bool = False
) -> Iterator[Path]:
    """Write a whole directory or nothing: the block fills a temporary sibling (yielded), whose
    files are fsynced before it replaces `out` (with `merge`, each file replaces its namesake in
    `out` and other files there stay); a failed write leaves `out` as it was."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with writing(
        out,
        what,
        _intact(out),
        needed=needed,
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
    ):
        if tmp.exists():  # a write that was killed
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        files = [f for f in tmp.rglob("*") if f.is_file()]
        for file in files:
            fsync_path(file)
        if not merge or not out.exists():
            replace_dir(tmp, out)
            return
        for file in files:
            target = out / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
        fsync_path(out)
        shutil.rmtree(tmp)


def replace_dir(new: Path, path: Path) -> None:
    """Rename `new` to `path`, replacing what was there; a crash leaves one or the other."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    new.rename(path)
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old)
