"""What a file or folder is, recorded when it is written and checked when it is read again: the
size and sha256 of each file (a stage's output), and a cheap identity of an input that a recipe
points at (a model or tokenizer directory), so that replaced weights are noticed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from distill.files import sha256_file

# Small files (configs, indexes, tokenizer files) are identified by content; larger ones (weights)
# by size and modification time, so that fingerprinting a 140 GB teacher reads no weights.
CONTENT_HASH_MAX_BYTES = 1 << 20


def _files_of(path: Path) -> list[tuple[str, Path]]:
    if path.is_file():
        return [(path.name, path)]
    return sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())


def file_manifest(path: Path) -> dict[str, dict]:
    """{relative name: {size, sha256}} of every file under `path` (or of `path` itself)."""
    return {
        name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for name, p in _files_of(path)
    }


def manifest_problem(path: Path, files: dict[str, dict], hashes: bool = True) -> str | None:
    """None when every recorded file is there with its size (and, with `hashes`, its sha256);
    else what differs. Files added since are not a problem (a later export may add one)."""
    for name, meta in files.items():
        p = path if path.is_file() and name == path.name else path / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{p} has {size} bytes, {meta['size']} were written"
        if hashes and sha256_file(p) != meta["sha256"]:
            return f"{p} fails its sha256 checksum (its bytes changed since it was written)"
    return None


def path_identity(path: str | os.PathLike | None, revision: str | None = None) -> list | None:
    """[name, size, sha256 or mtime] of every file of a local model/tokenizer path; for a hub id,
    the commit the local hub cache resolves it to; None when neither is known."""
    if path is None:
        return None
    local = Path(os.path.expanduser(str(path)))
    if not local.exists():
        return _hub_commit(str(path), revision or "main")
    return [file_identity(name, p) for name, p in _files_of(local)]


def file_identity(name: str, path: str | os.PathLike) -> list:
    """[name, size, sha256] of a small file, [name, size, mtime] of a larger one."""
    st = os.stat(path)
    if st.st_size <= CONTENT_HASH_MAX_BYTES:
        return [name, st.st_size, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
    return [name, st.st_size, st.st_mtime_ns]


def _hub_commit(repo_id: str, revision: str) -> list | None:
    """The commit a hub id's `revision` points at in the local hub cache (what an offline load
    reads), or None."""
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return ["hub", repo_id, revision]  # a pinned commit is its own identity
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    return ["hub", repo_id, ref.read_text().strip()] if ref.is_file() else None
