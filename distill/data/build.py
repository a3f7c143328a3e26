"""Building a token store: documents read in order, tokenized in `num_proc` processes, written
split by split, with the statistics of the build (speed, size, peak memory of the process tree)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

from distill.config import DataSpec
from distill.data.documents import BadInput, iter_documents
from distill.data.identity import backend_json
from distill.data.store import StoreWriter, token_dtype
from distill.data.tokenize import EncoderSpec, TokenizedBatch, tokenized_batches
from distill.errors import RecipeError, StopRequested


def build_store(
    spec: DataSpec, store_dir: Path, tokenizer, tok_dir: Path, meta: dict, peak: PeakRss
) -> dict:
    """Read, tokenize and write every document, then commit the store; returns its stats."""
    if tokenizer.eos_token_id is None:
        raise RecipeError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token) so documents can be "
            "separated when packed"
        )
    t0, cpu0 = time.perf_counter(), _tree_cpu_s()
    num_proc = spec.num_proc or _cores()
    dtype = token_dtype(max(tokenizer.get_vocab().values()))
    encoder = EncoderSpec(
        tokenizer_json=backend_json(tokenizer),
        tokenizer_dir=str(tok_dir),
        eos_token_id=tokenizer.eos_token_id,
        dtype=dtype,
        eval_fraction=spec.eval_fraction,
    )
    bad = BadInput(spec.on_error)
    writer = StoreWriter(store_dir, dtype, spec.shard_tokens)
    try:
        with _signals_stop_the_build():
            batches = tokenized_batches(iter_documents(spec, bad), encoder, num_proc)
            chars = _write_splits(batches, writer)
            with writer.writing():
                tokenizer.save_pretrained(writer.partial / "tokenizer")
            disk = writer.close()
            train, held = writer.splits["train"], writer.splits["heldout"]
            wall_s, cpu_s = time.perf_counter() - t0, _tree_cpu_s() - cpu0
            tokens = train.tokens + held.tokens
            stats = {
                "documents": train.documents + held.documents,
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
                "cpu_s": cpu_s,
                "tokens_per_cpu_s": tokens / cpu_s,
                "num_proc": num_proc,
                "peak_rss_bytes": peak.sample(),
            }
            writer.commit(meta, stats)
    except BaseException:
        writer.discard()
        raise
    return stats


def _write_splits(batches: Iterator[TokenizedBatch], writer: StoreWriter) -> int:
    """Append every batch to its splits; returns the characters read."""
    train, held = writer.splits["train"], writer.splits["heldout"]
    # The last training document is held back: if no document hashes into the held-out split,
    # it becomes the held-out split (tiny corpora), which the tokenizer's sample expects.
    pending: np.ndarray | None = None
    chars = 0
    for batch in batches:
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
            f"data: found {documents} document; at least 2 are needed (one to train on, one "
            "held out for evaluation); add text files or records"
        )
    if train.documents == 0:
        raise RecipeError("data: every document fell into the held-out split; lower eval_fraction")
    return chars


def _tree_cpu_s() -> float:
    """CPU seconds of this process and its finished children (the workers, once the pool is
    closed): with other jobs on the machine, speed per CPU second is what the build controls."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _cores() -> int:
    """The cores this process may run on (not all the machine's, under a CPU affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def _signals_stop_the_build() -> Iterator[None]:
    """SIGTERM/SIGUSR1 stop the build at once (a store is rebuilt whole, so nothing is worth
    finishing): the partial store is removed, the workers stopped, exit 75 (StopRequested) like
    every other phase; Ctrl-C the same with 130. A stop asked for before the build (the command's
    signal watch, see runtime/signals.py, noted it) stops it before it starts."""

    def stop(signum, frame):
        raise StopRequested(None, "data preparation (the token store build)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        # duck-typed: the data layer does not import the runtime's watch
        if any(
            getattr(getattr(h, "__self__", None), "requested", False) for h in previous.values()
        ):
            stop(signal.SIGTERM, None)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class PeakRss:
    """Peak resident memory of this process and its children (the tokenizer workers) together,
    sampled every 200 ms while the block is running."""

    INTERVAL_S = 0.2

    def __enter__(self) -> PeakRss:
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
        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        self.peak = max(self.peak, total)
        return self.peak

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
