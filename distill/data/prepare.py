"""The tokenizer and the token store of a recipe, built once and reused: one process builds
them while the others wait, then every process memory-maps the same files.

The store is rebuilt when what it was built from changes (its fingerprint covers the data
settings that decide the documents, the tokenizer, and each input file's path, size and
modification time, or its content hash when the file is small); `seq_len` and `eval_max_blocks`
only decide how blocks are cut from it, so they never rebuild it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.config import DataSpec, Recipe
from distill.data.blocks import PackedData, StoreBlocks, not_one_block
from distill.data.documents import BadInput, input_paths, iter_documents, stdlib_paths
from distill.data.store import (
    STATS,
    StoreWriter,
    TokenStore,
    check_replaceable,
    read_manifest,
    token_dtype,
)
from distill.data.tokenize import EncoderSpec, tokenized_batches
from distill.errors import RecipeError

# Settings that decide which documents land in which split (the rest only cut or place them).
STORE_KEYS = (
    "stdlib",
    "files",
    "hub",
    "hub_config",
    "split",
    "format",
    "text_field",
    "eval_fraction",
    "max_documents",
    "stdlib_exclude",
    "streaming",
    "on_error",
)
CONTENT_HASH_MAX_BYTES = 1 << 20  # files this small are identified by content, not mtime


@dataclass
class PreparedData:
    tokenizer: object
    data: PackedData
    fingerprint: str  # of the blocks: the store's fingerprint, seq_len and eval_max_blocks
    store_dir: Path
    stats: dict


def prepare_data(
    recipe: Recipe,
    out_dir: Path,
    *,
    is_main: bool,
    wait_for_everyone: Callable[[], None],
    log: Callable[[str], None],
) -> PreparedData:
    """Build (on the main process) or reuse the tokenizer and the store, then open them."""
    spec = recipe.data
    tok_dir = out_dir / "tokenizer"
    store_dir = store_path(recipe, out_dir)
    if is_main:
        with PeakRss() as peak:
            inputs = None if _store_only(spec) else input_identity(spec)
            _ensure_tokenizer(recipe, tok_dir, inputs, log)
            if inputs is not None:
                _ensure_store(recipe, store_dir, tok_dir, inputs, log, peak)
    wait_for_everyone()
    return open_prepared(recipe, tok_dir, store_dir)


def store_path(recipe: Recipe, out_dir: Path) -> Path:
    return Path(os.path.expanduser(recipe.data.store)) if recipe.data.store else out_dir / "data"


def open_prepared(recipe: Recipe, tok_dir: Path, store_dir: Path) -> PreparedData:
    """The tokenizer and the store's blocks, refusing a store built with another tokenizer."""
    from distill.models import load_tokenizer

    spec = recipe.data
    tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
    store = TokenStore(store_dir)
    if store.tokenizer_sha256 != tokenizer_sha256(tokenizer):
        raise RecipeError(
            f"data.store: {str(store_dir)!r} was built with another tokenizer than this "
            f"recipe's ({tok_dir}); use the store's own (`tokenizer: {{source: path, path: "
            f"{store_dir / 'tokenizer'}}}`) or point `data.store` at a new directory"
        )
    train = StoreBlocks(store.shards("train"), spec.seq_len)
    held = StoreBlocks(store.shards("heldout"), spec.seq_len)
    for blocks, split, what in ((train, "train", "training"), (held, "heldout", "held-out")):
        if len(blocks) == 0:
            raise RecipeError(not_one_block(what, store.tokens(split), spec.seq_len))
    data = PackedData(train=train, eval=held[: spec.eval_max_blocks])
    fingerprint = recipe.fingerprint(store.fingerprint, spec.seq_len, spec.eval_max_blocks)
    return PreparedData(tokenizer, data, fingerprint, store_dir, store.stats)


def _store_only(spec: DataSpec) -> bool:
    return not (spec.stdlib or spec.files or spec.hub)


# ----------------------------------------------------------------------------------------------
# Fingerprints


def input_identity(spec: DataSpec) -> list:
    """[path, size, sha256 or mtime] of every input file, in reading order; [] for hub data
    (known only by its id, config and split)."""
    if spec.stdlib:
        paths = [str(p) for p in stdlib_paths(spec.stdlib_exclude)]
    elif spec.files:
        paths = input_paths(spec)
        if len(paths) == 1 and os.path.isdir(paths[0]):  # a save_to_disk folder
            paths = sorted(str(p) for p in Path(paths[0]).rglob("*") if p.is_file())
    else:
        return []
    identity = []
    for path in paths:
        st = os.stat(path)
        if st.st_size <= CONTENT_HASH_MAX_BYTES:
            with open(path, "rb") as f:
                identity.append([path, st.st_size, hashlib.sha256(f.read()).hexdigest()])
        else:
            identity.append([path, st.st_size, st.st_mtime_ns])
    return identity


def store_spec(spec: DataSpec) -> dict:
    return {k: v for k, v in spec.model_dump(mode="json").items() if k in STORE_KEYS}


def tokenizer_sha256(tokenizer) -> str:
    """Identity of what a tokenizer does: its serialized pipeline (vocabulary, merges,
    normalization, special tokens), or for one without a `tokenizers` backend its vocabulary and
    special tokens."""
    identity = _backend_json(tokenizer) or json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map], sort_keys=True
    )
    return hashlib.sha256(identity.encode()).hexdigest()


def _backend_json(tokenizer) -> str | None:
    """The `tokenizers` pipeline as JSON, without the padding/truncation state that calls with
    `padding=`/`truncation=` leave on it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    state["truncation"] = state["padding"] = None
    return json.dumps(state, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _ensure_tokenizer(recipe: Recipe, tok_dir: Path, inputs: list | None, log) -> None:
    import shutil

    from distill.data.tokenizer import train_tokenizer, training_sample
    from distill.models import load_tokenizer

    tok = recipe.tokenizer
    trained = tok.source == "train"
    if trained and inputs is None:
        raise RecipeError(
            "tokenizer.source: train needs documents, but `data` names only a prepared `store`; "
            "use the store's tokenizer (`tokenizer: {source: path, path: "
            f"{Path(recipe.data.store or '') / 'tokenizer'}}}`)"
        )
    origin = None if trained else tokenizer_origin(recipe)
    fingerprint = recipe.fingerprint(
        tok.model_dump(mode="json"),
        origin,
        [store_spec(recipe.data), inputs] if trained else None,
    )
    marker = tok_dir / "distill_fingerprint.txt"
    if marker.is_file() and marker.read_text() == fingerprint:
        return
    t0 = time.perf_counter()
    if trained:
        docs = iter_documents(recipe.data, BadInput(recipe.data.on_error))
        sample = training_sample(docs, recipe.data.eval_fraction, tok.train.max_documents)
        tokenizer = train_tokenizer(sample, tok.train)
    else:
        tokenizer = load_tokenizer(origin, "tokenizer")  # type: ignore[arg-type]
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.save_pretrained(tok_dir)
    marker.write_text(fingerprint)  # last: a tokenizer dir without it is rebuilt
    log(f"tokenizer ready ({len(tokenizer)} tokens, {time.perf_counter() - t0:.1f} s)")


def tokenizer_origin(recipe: Recipe) -> str | None:
    tok = recipe.tokenizer
    if tok.source == "train":
        return None
    if tok.source == "path":
        return tok.path
    for spec in recipe.models.values():
        if spec.path:
            return spec.path
    raise RecipeError(
        "tokenizer.source is `model` but no model in `models` has a `path` to take it from; "
        "use `tokenizer.source: train` or `tokenizer.source: path`"
    )


# ----------------------------------------------------------------------------------------------
# Store


def _ensure_store(
    recipe: Recipe, store_dir: Path, tok_dir: Path, inputs: list, log, peak: PeakRss
) -> None:
    from distill.models import load_tokenizer

    spec = recipe.data
    tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
    tok_sha = tokenizer_sha256(tokenizer)
    fingerprint = recipe.fingerprint("token-store", tok_sha, store_spec(spec), inputs)
    with _store_lock(store_dir):
        _build_unless_current(
            spec, store_dir, tokenizer, tok_dir, tok_sha, fingerprint, inputs, log, peak
        )


def _build_unless_current(
    spec: DataSpec,
    store_dir: Path,
    tokenizer,
    tok_dir: Path,
    tok_sha: str,
    fingerprint: str,
    inputs: list,
    log,
    peak: PeakRss,
) -> None:
    manifest = read_manifest(store_dir)
    if manifest is not None and manifest["fingerprint"] == fingerprint:
        log(f"data store {store_dir} is up to date; reusing it")
        return
    if manifest is not None and spec.store:
        # A store named in `data.store` may serve several recipes: rebuild it only for new
        # versions of the same inputs, never for another recipe's data or tokenizer.
        if manifest["tokenizer_sha256"] != tok_sha:
            raise RecipeError(
                f"data.store: {spec.store!r} was built with another tokenizer; use its own "
                f"(`tokenizer: {{source: path, path: {store_dir / 'tokenizer'}}}`), or point "
                "`data.store` at a new directory"
            )
        differ = sorted(k for k, v in store_spec(spec).items() if manifest["spec"].get(k) != v)
        if differ:
            raise RecipeError(
                f"data.store: {spec.store!r} was built from other data (data.{', data.'.join(differ)} "
                "differ); point `data.store` at a new directory, or delete it to rebuild"
            )
        log(f"the input files changed since {store_dir} was built; rebuilding it")
    check_replaceable(store_dir)
    meta = {
        "fingerprint": fingerprint,
        "tokenizer_sha256": tok_sha,
        "spec": store_spec(spec),
        "inputs": {
            "files": len(inputs),
            "bytes": sum(i[1] for i in inputs),
            "sha256": hashlib.sha256(json.dumps(inputs).encode()).hexdigest(),
        },
    }
    stats = build_store(spec, store_dir, tokenizer, tok_dir, meta, peak)
    log(
        f"data store {store_dir}: {stats['documents']:,} documents, {stats['train_tokens']:,} "
        f"training and {stats['heldout_tokens']:,} held-out tokens in {stats['wall_s']:.1f} s "
        f"({stats['tokens_per_s']:,.0f} tokens/s)"
        + (
            f"; skipped {stats['skipped_documents']} bad documents"
            if stats["skipped_documents"]
            else ""
        )
    )


def build_store(
    spec: DataSpec, store_dir: Path, tokenizer, tok_dir: Path, meta: dict, peak: PeakRss
) -> dict:
    """Read, tokenize (in `num_proc` processes) and write every document; returns the stats."""
    if tokenizer.eos_token_id is None:
        raise RecipeError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token) so documents can be "
            "separated when packed"
        )
    t0 = time.perf_counter()
    num_proc = spec.num_proc or len(os.sched_getaffinity(0))
    dtype = token_dtype(max(tokenizer.get_vocab().values()))
    encoder = EncoderSpec(
        tokenizer_json=_backend_json(tokenizer),
        tokenizer_dir=str(tok_dir),
        eos_token_id=tokenizer.eos_token_id,
        dtype=dtype,
        eval_fraction=spec.eval_fraction,
    )
    bad = BadInput(spec.on_error)
    writer = StoreWriter(store_dir, dtype, spec.shard_tokens)
    train, held = writer.splits["train"], writer.splits["heldout"]
    try:
        with _sigterm_interrupts():
            # The last training document is held back: if no document hashes into the held-out
            # split, it becomes the held-out split (tiny corpora), as the tokenizer expects.
            pending: np.ndarray | None = None
            chars = 0
            docs = iter_documents(spec, bad)
            for batch in tokenized_batches(docs, encoder, num_proc):
                chars += batch.chars
                held.add(batch.heldout_ids, batch.heldout_lengths)
                if len(batch.train_lengths):
                    if pending is not None:
                        train.add(pending, np.array([len(pending)]))
                    last = int(batch.train_lengths[-1])
                    train.add(batch.train_ids[:-last], batch.train_lengths[:-1])
                    pending = batch.train_ids[-last:].copy()
            if pending is not None:
                (held if held.documents == 0 else train).add(pending, np.array([len(pending)]))
            documents = train.documents + held.documents
            if documents < 2:
                raise RecipeError(
                    f"data: found {documents} document; at least 2 are needed (one to train on, "
                    "one held out for evaluation); add text files or records"
                )
            if train.documents == 0:
                raise RecipeError(
                    "data: every document fell into the held-out split; lower eval_fraction"
                )
            tokenizer.save_pretrained(writer.partial / "tokenizer")
            disk = writer.close()
            wall_s = time.perf_counter() - t0
            tokens = train.tokens + held.tokens
            stats = {
                "documents": documents,
                "train_documents": train.documents,
                "heldout_documents": held.documents,
                "skipped_documents": bad.skipped,
                "first_skipped": bad.first,
                "train_tokens": train.tokens,
                "heldout_tokens": held.tokens,
                "characters": chars,
                "token_dtype": dtype,
                "shard_tokens": spec.shard_tokens,
                "bytes_on_disk": disk,
                "bytes_per_token": disk / tokens,
                "wall_s": wall_s,
                "tokens_per_s": tokens / wall_s,
                "num_proc": num_proc,
                "peak_rss_bytes": peak.sample(),
            }
            writer.commit(meta, stats)
    except BaseException:
        writer.discard()
        raise
    return stats


@contextlib.contextmanager
def _store_lock(store_dir: Path) -> Iterator[None]:
    """One builder per store at a time, also across recipes and runs sharing it."""
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(store_dir.with_name(store_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the build like Ctrl-C: the partial store is removed, the workers stopped."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PeakRss:
    """Peak resident memory of this process and its children (the tokenizer workers) together,
    sampled every 50 ms while the block is running."""

    INTERVAL_S = 0.05

    def __enter__(self) -> PeakRss:
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self.sample()

    def sample(self) -> int:
        """Sample now; returns the peak so far in bytes."""
        import psutil

        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        self.peak = max(self.peak, total)
        return self.peak

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------------------------
# `distill data`


def run_data_command(recipe: Recipe, verify: bool = False) -> int:
    """Prepare the recipe's tokenizer and store, print the store's statistics."""
    out_dir = recipe.resolved_output_dir

    def log(message: str) -> None:
        print(f"[distill] {message}", file=sys.stderr, flush=True)

    prepared = prepare_data(recipe, out_dir, is_main=True, wait_for_everyone=lambda: None, log=log)
    s = prepared.stats
    gib = 1 << 30
    print(
        f"token store {prepared.store_dir} ({STATS})\n"
        f"  documents       {s['documents']:,} ({s['train_documents']:,} train, "
        f"{s['heldout_documents']:,} held out; {s['skipped_documents']:,} bad ones skipped)\n"
        f"  tokens          {s['train_tokens']:,} train, {s['heldout_tokens']:,} held out "
        f"({s['token_dtype']})\n"
        f"  blocks          {len(prepared.data.train):,} train, {len(prepared.data.eval):,} "
        f"held out of {prepared.data.seq_len} tokens\n"
        f"  on disk         {s['bytes_on_disk'] / 1e6:,.1f} MB, {s['bytes_per_token']:.3f} "
        "bytes per token\n"
        f"  prepared in     {s['wall_s']:.1f} s, {s['tokens_per_s']:,.0f} tokens/s with "
        f"{s['num_proc']} processes, peak RSS {s['peak_rss_bytes'] / gib:.2f} GiB"
    )
    if verify:
        bad = TokenStore(prepared.store_dir).verify()
        if bad:
            raise RecipeError(
                f"data: the token store {prepared.store_dir} fails its checksums ({', '.join(bad)}); "
                "delete it and prepare it again (or copy it again in full)"
            )
        print("  checksums       all match the manifest")
    return 0
