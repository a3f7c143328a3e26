"""The token store on disk: per split (`train`, `heldout`), the token ids of every document with
EOS after each, concatenated and cut into shards of `shard_tokens` ids (uint16 when the
vocabulary fits 65,536 ids, else uint32), and the start offset of each document (int64).

    <store>/manifest.json          written last: format, fingerprint, tokenizer, every file's size
                                   and sha256; a directory without it is not a store
    <store>/stats.json             documents, tokens, bytes, speed and peak memory of the build
    <store>/train-00000.bin ...    token ids; train-offsets.bin: document starts
    <store>/heldout-00000.bin ...
    <store>/tokenizer/             the tokenizer it was built with (AutoTokenizer-loadable)

A store is built in `<store>.partial/` (every file fsynced, the manifest last) and renamed into
place, so an interrupted build never looks complete. It is read with numpy memory maps.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from distill.errors import RecipeError
from distill.faults import from_env
from distill.files import fsync_path, sha256_file

FORMAT = "distill-token-store"
VERSION = 1
MANIFEST = "manifest.json"
STATS = "stats.json"
SPLITS = ("train", "heldout")


def token_dtype(max_token_id: int) -> str:
    """The narrowest unsigned integer type that holds every id of the vocabulary."""
    return "uint16" if max_token_id < 2**16 else "uint32"


class _SplitWriter:
    """One split: shards of exactly `shard_tokens` ids (the last one shorter), and the start
    offset of every document, each hashed as it is written (nothing is read back)."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int, on_shard):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.on_shard = on_shard
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0
        self._shard = None
        self._shard_hash = hashlib.sha256()
        self._in_shard = 0
        self._offsets_name = f"{split}-offsets.bin"
        self._offsets = open(root / self._offsets_name, "wb")  # noqa: SIM115 - closed in close()
        self._offsets_hash = hashlib.sha256()

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: their ids concatenated, and how many ids each has."""
        starts = (self.tokens + np.cumsum(lengths) - lengths).astype(np.int64).tobytes()
        self._offsets.write(starts)
        self._offsets_hash.update(starts)
        self.documents += len(lengths)
        pos = 0
        while pos < ids.size:
            if self._shard is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self._shard = open(self.root / name, "wb")  # noqa: SIM115 - closed below
                self.shards.append({"file": name})
            take = min(ids.size - pos, self.shard_tokens - self._in_shard)
            chunk = ids[pos : pos + take].astype(self.dtype, copy=False).tobytes()
            self._shard.write(chunk)
            self._shard_hash.update(chunk)
            pos += take
            self._in_shard += take
            self.tokens += take
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self._shard is not None
        self._shard.flush()
        os.fsync(self._shard.fileno())
        self._shard.close()
        self.shards[-1].update(tokens=self._in_shard, sha256=self._shard_hash.hexdigest())
        self._shard, self._shard_hash, self._in_shard = None, hashlib.sha256(), 0
        self.on_shard()

    def close(self) -> dict:
        if self._shard is not None:
            self._close_shard()
        self._offsets.flush()
        os.fsync(self._offsets.fileno())
        self._offsets.close()
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "shards": self.shards,
            "offsets": {"file": self._offsets_name, "sha256": self._offsets_hash.hexdigest()},
        }


class StoreWriter:
    """Builds a store in `<path>.partial/`; `commit` renames it into place, `discard` removes it."""

    def __init__(self, path: Path, dtype: str, shard_tokens: int):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.dtype = dtype
        if self.partial.exists():  # an interrupted build: callers hold the store's lock
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.shards_written = 0
        self._faults = from_env()
        self._closed: dict = {}
        self.splits = {
            split: _SplitWriter(self.partial, split, dtype, shard_tokens, self._shard_done)
            for split in SPLITS
        }

    def _shard_done(self) -> None:
        self.shards_written += 1
        if self._faults:
            self._faults.after_store_shard(self.shards_written)

    def close(self) -> int:
        """Close and fsync every file; returns the bytes of ids and offsets written."""
        self._closed = {name: writer.close() for name, writer in self.splits.items()}
        total = 0
        for split in self._closed.values():
            for item in [*split["shards"], split["offsets"]]:
                item["bytes"] = (self.partial / item["file"]).stat().st_size
                total += item["bytes"]
        return total

    def commit(self, meta: dict, stats: dict) -> dict:
        """After `close`: write stats and the manifest (last), then rename into place."""
        manifest = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, **meta}
        manifest["splits"] = self._closed
        _write_json(self.partial / STATS, stats)
        _write_json(self.partial / MANIFEST, manifest)
        fsync_path(self.partial)
        replace_dir(self.partial, self.path)
        return manifest

    def discard(self) -> None:
        for writer in self.splits.values():
            for f in (writer._shard, writer._offsets):
                if f is not None and not f.closed:
                    f.close()
        shutil.rmtree(self.partial, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def check_replaceable(path: Path) -> None:
    """A store may replace a directory only if that is a store, empty, or the old packed cache."""
    if not path.exists() or read_manifest(path) is not None:
        return
    others = [p.name for p in path.iterdir() if not p.name.startswith("packed-")]
    if others:
        raise RecipeError(
            f"data.store: {str(path)!r} exists and is not a token store (it holds "
            f"{', '.join(sorted(others)[:5])}); give a new or empty directory"
        )


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


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete store at `path`, or None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


class ShardMap:
    """One shard's token ids, memory-mapped read-only (`ids` is a numpy view of the map)."""

    def __init__(self, path: Path, dtype: str):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.ids = np.frombuffer(self._map, dtype=dtype)

    def release(self) -> None:
        """Unmap the pages read so far from this process; they stay in the page cache. Batches
        are drawn from the whole corpus, so without this the pages a long run has touched (and
        the kernel's read-around of each) would count in its RSS until it reached the store's
        size, though they are shared cache, not the process's memory."""
        if hasattr(mmap, "MADV_DONTNEED"):  # Linux, macOS; elsewhere pages stay mapped
            self._map.madvise(mmap.MADV_DONTNEED)


class TokenStore:
    """A complete store, opened read-only: each split's shards as numpy memory maps."""

    def __init__(self, path: Path):
        manifest = read_manifest(path)
        if manifest is None:
            raise RecipeError(
                f"data: {str(path)!r} holds no complete token store (no valid {MANIFEST}); "
                "prepare it with `distill data RECIPE` (with several nodes and no shared file "
                "system, prepare once and copy the store to every node, then set `data.store`)"
            )
        if manifest.get("version") != VERSION:
            raise RecipeError(
                f"data: the token store {str(path)!r} has format version "
                f"{manifest.get('version')}, this distill reads {VERSION}; prepare it again"
            )
        self.path = path
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer_sha256: str = manifest["tokenizer_sha256"]
        for split in manifest["splits"].values():
            for item in [*split["shards"], split["offsets"]]:
                size = (
                    (path / item["file"]).stat().st_size if (path / item["file"]).is_file() else -1
                )
                if size != item["bytes"]:
                    raise RecipeError(
                        f"data: the token store {str(path)!r} is damaged: {item['file']} has "
                        f"{size} bytes, its manifest says {item['bytes']}; delete the store and "
                        "prepare it again (or copy it again in full)"
                    )

    @property
    def stats(self) -> dict:
        return json.loads((self.path / STATS).read_text())

    def shards(self, split: str) -> list[ShardMap]:
        """The split's token ids, one read-only memory map per shard."""
        dtype = self.manifest["dtype"]
        return [
            ShardMap(self.path / s["file"], dtype) for s in self.manifest["splits"][split]["shards"]
        ]

    def document_offsets(self, split: str) -> np.ndarray:
        """The start of every document of the split in its token stream."""
        item = self.manifest["splits"][split]["offsets"]
        if item["bytes"] == 0:
            return np.zeros(0, dtype=np.int64)
        return np.memmap(self.path / item["file"], dtype=np.int64, mode="r")

    def tokens(self, split: str) -> int:
        return self.manifest["splits"][split]["tokens"]

    def verify(self) -> list[str]:
        """Files whose sha256 differs from the manifest's (reads every byte, one thread per core:
        hashlib releases the GIL on large buffers)."""
        items = [
            item
            for split in self.manifest["splits"].values()
            for item in [*split["shards"], split["offsets"]]
        ]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            digests = list(pool.map(lambda item: sha256_file(self.path / item["file"]), items))
        return [item["file"] for item, digest in zip(items, digests) if digest != item["sha256"]]
