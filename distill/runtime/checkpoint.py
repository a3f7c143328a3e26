"""Checkpoints that cannot be half-written.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding accelerate's state (weights,
optimizer, RNG states of every rank, or DeepSpeed's engine shards), `trainer_state.json` (step,
tokens, the tracker's run id, the recipe fingerprint, the world size) and, written last,
`MANIFEST.json` with every file's size and sha256. It is written under a temporary name and renamed
into place only when complete, so a directory named `step_*` with a valid manifest is always whole.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from distill.files import check_free_space as check_space
from distill.files import fsync_path, sha256_file

MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def write_manifest(directory: Path) -> None:
    """Hash every file, fsync them, then write the manifest (itself fsynced) last."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        rel = path.relative_to(directory).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable MANIFEST.json ({err})"
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{rel} fails its sha256 checksum (corrupt)"
    if STATE not in files:
        return f"no {STATE}"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
        key=lambda p: int(p.name[len(PREFIX) :]),
    )


def find_latest_valid(root: Path, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest whole checkpoint; broken ones are skipped with a loud warning naming them."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        message = f"skipping checkpoint {path}: {problem}; falling back to an older one"
        warnings.warn(message, stacklevel=2)
        if log:
            log(message)
    return None


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE).read_text())


SAVE_FIX = (
    "Free space there, lower `train.keep_last`, or point `output_dir` at another disk, then run "
    "the same command again"
)


def check_free_space(root: Path, needed_bytes: int, previous: Path | None = None) -> None:
    """Refuse a save that cannot fit: `needed_bytes` is the last checkpoint's real size, or before
    the first one `estimate_checkpoint_bytes`."""
    kept = f"the previous checkpoint ({previous}) is intact" if previous else "no checkpoint yet"
    check_space(root, needed_bytes, f"a checkpoint ({kept})", SAVE_FIX + ".")


def estimate_checkpoint_bytes(module) -> int:
    """What a checkpoint of `module` trained by AdamW takes before one exists: every parameter
    at its dtype, plus two fp32 moments per trainable one (LoRA: its adapters only), plus the RNG
    states and records (a few KiB)."""
    total, seen = 64 << 10, set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        numel = getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partition: its full size
        total += numel * p.element_size() + (2 * 4 * numel if p.requires_grad else 0)
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{checkpoint_name(step)}"


def commit(root: Path, step: int, keep_last: int) -> Path:
    """Manifest, rename into place, then (only then) delete checkpoints beyond `keep_last`."""
    tmp = tmp_dir_for(root, step)
    final = root / checkpoint_name(step)
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)  # a re-save of the same step (e.g. signal right after a save)
    os.replace(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_stale_tmp(root: Path) -> None:
    """Leftovers of a save that was killed; never mistaken for checkpoints, removed on start."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
