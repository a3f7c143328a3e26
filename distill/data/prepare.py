"""The tokenizer and the token store of a recipe, built once and reused: one process builds
them while the others wait, then every process memory-maps the same files.

The store is rebuilt when what it was built from changes (see `identity`); `seq_len` and
`eval_max_blocks` only decide how blocks are cut from it, so they never rebuild it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distill.config import DataSpec, Recipe
from distill.data.blocks import PackedData, StoreBlocks, not_one_block
from distill.data.build import PeakRss, build_store
from distill.data.documents import BadInput, iter_documents
from distill.data.identity import input_identity, store_spec, tokenizer_sha256
from distill.data.store import STATS, TokenStore, check_replaceable, read_manifest
from distill.data.tokenizer import train_tokenizer, training_sample
from distill.errors import DamagedOutput, RecipeError
from distill.manifest import path_identity
from distill.models import load_tokenizer


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
            built = inputs is not None and _ensure_store(
                recipe, store_dir, tok_dir, inputs, log, peak
            )
            if not built:
                verify_store(store_dir, log)
    wait_for_everyone()
    return open_prepared(recipe, tok_dir, store_dir)


def store_path(recipe: Recipe, out_dir: Path) -> Path:
    return Path(os.path.expanduser(recipe.data.store)) if recipe.data.store else out_dir / "data"


def open_prepared(recipe: Recipe, tok_dir: Path, store_dir: Path) -> PreparedData:
    """The tokenizer and the store's blocks, refusing a store built with another tokenizer."""
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
# Tokenizer


def _ensure_tokenizer(recipe: Recipe, tok_dir: Path, inputs: list | None, log) -> None:
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
        [store_spec(recipe.data), inputs] if trained else path_identity(origin),
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
) -> bool:
    """Build the store unless an up-to-date one is there; True when it was built."""
    spec = recipe.data
    tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
    tok_sha = tokenizer_sha256(tokenizer)
    fingerprint = recipe.fingerprint("token-store", tok_sha, store_spec(spec), inputs)
    with _store_lock(store_dir):
        manifest = read_manifest(store_dir)
        if manifest is not None and manifest["fingerprint"] == fingerprint:
            log(f"data store {store_dir} is up to date; reusing it")
            return False
        if manifest is not None and spec.store:
            _check_shared_store(spec, store_dir, manifest, tok_sha)
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
    skipped = stats["skipped_documents"]
    log(
        f"data store {store_dir}: {stats['documents']:,} documents, {stats['train_tokens']:,} "
        f"training and {stats['heldout_tokens']:,} held-out tokens in {stats['wall_s']:.1f} s "
        f"({stats['tokens_per_s']:,.0f} tokens/s)"
        + (
            f"; skipped {skipped} bad documents (first: {stats['first_skipped']})"
            if skipped
            else ""
        )
    )
    return True


def verify_store(store_dir: Path, log) -> None:
    """Every shard of a store built earlier against the checksums written with it, before any
    stage trains on it: a flipped bit would otherwise crash a stage after hours, or be trained on
    if never sampled. Reads the store once (in parallel; about 1 GB/s per core)."""
    if read_manifest(store_dir) is None:
        return  # not a store: opening it names the problem
    t0 = time.perf_counter()
    bad = TokenStore(store_dir).verify()
    if bad:
        raise DamagedOutput(
            f"data: the token store {store_dir} is damaged: {', '.join(bad)} fail their sha256 "
            "checksums (the bytes changed since the store was written). Nothing was trained on "
            "it. Delete the store and prepare it again (`distill data RECIPE`), or copy it again "
            "in full"
        )
    log(f"data store {store_dir}: checksums verified in {time.perf_counter() - t0:.1f} s")


def _check_shared_store(spec: DataSpec, store_dir: Path, manifest: dict, tok_sha: str) -> None:
    """A store named in `data.store` may serve several recipes: it is rebuilt for new versions
    of the same inputs, never for another recipe's data or tokenizer."""
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


@contextlib.contextmanager
def _store_lock(store_dir: Path) -> Iterator[None]:
    """One builder per store at a time, also across recipes and runs sharing it."""
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(store_dir.with_name(store_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
        f"{s['num_proc']} processes ({s['tokens_per_cpu_s']:,.0f} per CPU second), peak RSS "
        f"{s['peak_rss_bytes'] / gib:.2f} GiB (this process and its workers)"
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
