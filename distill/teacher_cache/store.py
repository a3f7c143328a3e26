"""The teacher cache on disk: shards written atomically, a manifest written last, memory-mapped reads.

    cache/
      shard-00000.topk     records [blocks, seq_len - 1] (see encoding.py), raw, little-endian
      shard-00000.hidden   bf16 bits as uint16 [blocks, cached layers, seq_len, hidden] (optional)
      shard-00000.json     that shard's blocks and each file's size and sha256, written after them
      blocks.npy           the training-block index of every cached row, in row order
      MANIFEST.json        what the cache was made from, every shard, written last

Rows are training blocks: row r holds block ``blocks[r]``, and shard s holds rows
``[s * shard_blocks, (s + 1) * shard_blocks)``. Every file is written under a temporary name,
fsynced and renamed, so a shard whose ``.json`` exists is whole; an interrupted write resumes at the
first shard without one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.errors import RecipeError
from distill.files import atomic_write, sha256_file
from distill.objective.module import TeacherOutput
from distill.safe_load import load_array
from distill.teacher_cache.encoding import ENCODING, decode_topk, record_dtype

MANIFEST = "MANIFEST.json"
BLOCKS = "blocks.npy"
IDENTITY_KEYS = ("tokenizer", "data", "seq_len", "vocab_size")
"""What a reading stage must share with the cache (the teacher, k and layers may differ)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(
        path,
        data,
        f"writing the teacher cache file {path}",
        "The shards finished before it are whole; the `cache-teacher` stage resumes after them",
    )


def write_shard(
    root: Path, index: int, first_row: int, topk: np.ndarray, hidden: np.ndarray | None
) -> None:
    """One whole shard: its data files (atomically), then its `.json` record."""
    files = {}
    parts = [("topk", topk)] + ([("hidden", hidden)] if hidden is not None else [])
    for suffix, array in parts:
        path = root / f"{shard_name(index)}.{suffix}"
        _write_atomic(path, np.ascontiguousarray(array).tobytes())
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    record = {"index": index, "first_row": first_row, "rows": len(topk), "files": files}
    _write_atomic(root / f"{shard_name(index)}.json", json.dumps(record).encode())


def finished_shard(root: Path, index: int) -> dict | None:
    """The record of a shard written whole (its files of the recorded sizes), else None."""
    path = root / f"{shard_name(index)}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    for name, meta in record["files"].items():
        if not (root / name).is_file() or (root / name).stat().st_size != meta["size"]:
            return None
    return record


def write_manifest(root: Path, identity: dict, blocks: np.ndarray, shards: list[dict]) -> dict:
    """`blocks.npy`, then the manifest (last): the cache is complete once it exists."""
    _write_atomic(root / BLOCKS, _npy_bytes(blocks))
    manifest = {**identity, "encoding": ENCODING, "rows": len(blocks), "shards": shards}
    _write_atomic(root / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def read_manifest(root: Path, what: str) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise RecipeError(
            f"{what}: {root} is not a finished teacher cache (no {MANIFEST}); run its "
            "`cache-teacher` stage (`distill cache-teacher RECIPE`) to write or finish it"
        )
    return json.loads(path.read_text())


def check_identity(manifest: dict, expected: dict, root: Path, what: str) -> None:
    """A clear error naming both sides when the cache was made from other inputs."""
    wrong = [
        f"{key}: cache {manifest.get(key)!r}, {what} {expected[key]!r}"
        for key in IDENTITY_KEYS
        if manifest.get(key) != expected[key]
    ]
    if wrong:
        raise RecipeError(
            f"{what} cannot read the teacher cache {root}: it was made from other inputs ("
            + "; ".join(wrong)
            + "). Write the cache again with this recipe's tokenizer, data and seq_len."
        )


@dataclass
class CachedTeacher:
    """The teacher as a cache: what the loop reads instead of running a teacher forward."""

    root: Path
    manifest: dict
    topk: list[np.ndarray]
    """Per shard, memory-mapped records [rows, seq_len - 1]."""
    hidden: list[np.ndarray] | None
    """Per shard, memory-mapped bf16 bits [rows, layers, seq_len, hidden]."""
    row_of_block: np.ndarray
    """Training-block index -> cache row (-1: not cached)."""

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def hidden_layers(self) -> list[int]:
        return self.manifest["hidden_layers"]

    def cached_blocks(self) -> np.ndarray:
        return np.flatnonzero(self.row_of_block >= 0)

    def read(self, blocks: torch.Tensor, device: torch.device, want_states: bool) -> TeacherOutput:
        """The cached teacher outputs of these training blocks, on `device`."""
        rows = self.row_of_block[blocks.cpu().numpy()]
        if (rows < 0).any():
            missing = blocks.cpu().numpy()[rows < 0]
            raise RecipeError(
                f"blocks {missing.tolist()[:8]} are not in the teacher cache {self.root}"
            )
        per = self.manifest["shard_blocks"]
        records = np.stack([self.topk[r // per][r % per] for r in rows])
        topk = decode_topk(records)
        states = None
        if want_states:
            bits = np.stack([self.hidden[r // per][r % per] for r in rows])  # [B, L, S, H]
            layers = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(device)
            states = [None] * self.manifest["teacher_layers"]
            for position, layer in enumerate(self.hidden_layers):
                states[layer] = layers[:, position]
        return TeacherOutput(
            hidden=None,
            head_weight=None,
            states=states,
            topk=tuple(t.to(device) for t in topk),
        )


def cache_in_memory(manifest: dict, topk: np.ndarray, hidden: np.ndarray | None) -> CachedTeacher:
    """A cache of blocks 0..n-1 held in memory, as written by the cache stage (`distill bench`
    measures reading it; `manifest` needs k, hidden_layers and teacher_layers)."""
    rows = len(topk)
    manifest = {**manifest, "shard_blocks": rows, "rows": rows, "num_train_blocks": rows}
    return CachedTeacher(
        Path("<memory>"),
        manifest,
        [topk],
        [hidden] if hidden is not None else None,
        np.arange(rows),
    )


def open_cache(root: Path, expected: dict, what: str, verify: bool = True) -> CachedTeacher:
    """Open a finished cache: its identity checked against `expected` (IDENTITY_KEYS), every shard's
    checksum verified, the shards memory-mapped read-only."""
    manifest = read_manifest(root, what)
    check_identity(manifest, expected, root, what)
    dtype = record_dtype(manifest["k"], manifest["vocab_size"], manifest.get("tail_samples", 0))
    positions = manifest["seq_len"] - 1
    layers = len(manifest["hidden_layers"])
    topk, hidden = [], [] if layers else None
    for shard in manifest["shards"]:
        for name, meta in shard["files"].items():
            path = root / name
            if not path.is_file() or path.stat().st_size != meta["size"]:
                raise RecipeError(
                    f"teacher cache shard {path} is missing or has the wrong size "
                    f"(expected {meta['size']} bytes); write the cache again"
                )
            if verify and sha256_file(path) != meta["sha256"]:
                raise RecipeError(
                    f"teacher cache shard {path} is corrupt (its sha256 does not match "
                    f"{root / MANIFEST}); delete the cache directory and write it again"
                )
        rows = shard["rows"]
        topk.append(
            np.memmap(
                root / f"{shard_name(shard['index'])}.topk",
                dtype=dtype,
                mode="r",
                shape=(rows, positions),
            )
        )
        if layers:
            shape = (rows, layers, manifest["seq_len"], manifest["hidden_size"])
            path = root / f"{shard_name(shard['index'])}.hidden"
            hidden.append(np.memmap(path, dtype=np.uint16, mode="r", shape=shape))
    blocks = _read_blocks(root, manifest["num_train_blocks"])
    row_of_block = np.full(manifest["num_train_blocks"], -1, dtype=np.int64)
    row_of_block[blocks] = np.arange(len(blocks))
    return CachedTeacher(root, manifest, topk, hidden, row_of_block)


def _read_blocks(root: Path, num_train_blocks: int) -> np.ndarray:
    """The row -> training-block index: plain integers in range, never an unpickled object."""
    path, fix = root / BLOCKS, "Delete the cache directory and run its cache stage again."
    try:
        blocks = load_array(path, fix)
    except (OSError, ValueError) as err:
        raise RecipeError(f"teacher cache index {path} is unreadable ({err}). {fix}") from None
    if (
        blocks.ndim != 1
        or blocks.dtype.kind not in "iu"
        or not (blocks.size == 0 or 0 <= blocks.min() <= blocks.max() < num_train_blocks)
    ):
        raise RecipeError(
            f"teacher cache index {path} is not a list of training-block numbers below "
            f"{num_train_blocks} ({blocks.dtype}, shape {blocks.shape}). {fix}"
        )
    return blocks
