"""Tokenizing documents in `num_proc` worker processes, in order: batches of documents go out,
token ids (EOS after each document) come back as numpy arrays split into train and held-out, in
the order the documents were read, so the result is the same for any number of workers.

Workers are spawned, not forked, and import only this module, numpy and the tokenizer library:
a forked worker would carry the parent's torch and transformers pages in its resident set.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from distill.data.documents import Document, is_heldout

BATCH_DOCUMENTS = 512
BATCH_CHARS = 1 << 20  # about 1 MB of text per task: large enough to hide the IPC, small in RAM


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to tokenize exactly like the recipe's tokenizer."""

    tokenizer_json: str | None  # a fast tokenizer, serialized (the common case)
    tokenizer_dir: str  # otherwise loaded with AutoTokenizer from here
    eos_token_id: int
    dtype: str  # "uint16" or "uint32"
    eval_fraction: float


@dataclass
class TokenizedBatch:
    train_ids: np.ndarray
    train_lengths: np.ndarray  # tokens of each document, EOS included
    heldout_ids: np.ndarray
    heldout_lengths: np.ndarray
    chars: int


_worker: tuple[EncoderSpec, object] | None = None


def _init(spec: EncoderSpec) -> None:
    global _worker
    if spec.tokenizer_json is not None:
        from tokenizers import Tokenizer

        _worker = (spec, Tokenizer.from_str(spec.tokenizer_json))
    else:
        from transformers import AutoTokenizer

        _worker = (spec, AutoTokenizer.from_pretrained(spec.tokenizer_dir))


def _init_worker(spec: EncoderSpec) -> None:
    _init(spec)
    # A pool worker waits on a queue whose writing end it holds too, so it would never notice a
    # parent killed with SIGKILL; it checks instead, and leaves no idle orphan behind.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _encode(texts: list[str]) -> list[list[int]]:
    assert _worker is not None, "tokenizer worker used before _init"
    spec, tokenizer = _worker
    if spec.tokenizer_json is not None:
        return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]  # type: ignore[operator]


def encode_documents(docs: list[Document]) -> TokenizedBatch:
    """Token ids of each document plus EOS, concatenated per split."""
    assert _worker is not None, "tokenizer worker used before _init"
    spec = _worker[0]
    encoded = _encode([text for _, text in docs])
    held = [is_heldout(doc_id, spec.eval_fraction) for doc_id, _ in docs]
    parts = {True: [], False: []}  # type: dict[bool, list[list[int]]]
    for ids, is_held in zip(encoded, held):
        ids.append(spec.eos_token_id)
        parts[is_held].append(ids)

    def concat(docs_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter((len(d) for d in docs_ids), dtype=np.int64, count=len(docs_ids))
        flat = np.fromiter(
            itertools.chain.from_iterable(docs_ids), dtype=spec.dtype, count=int(lengths.sum())
        )
        return flat, lengths

    train_ids, train_lengths = concat(parts[False])
    heldout_ids, heldout_lengths = concat(parts[True])
    chars = sum(len(text) for _, text in docs)
    return TokenizedBatch(train_ids, train_lengths, heldout_ids, heldout_lengths, chars)


def document_batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    """Consecutive documents grouped into tasks of about `BATCH_CHARS` characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[1])
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenized_batches(
    docs: Iterable[Document], spec: EncoderSpec, num_proc: int
) -> Iterator[TokenizedBatch]:
    """Tokenize `docs` in `num_proc` processes (1: in this one), results in the input's order."""
    batches = document_batches(docs)
    first = list(itertools.islice(batches, 2))
    if num_proc == 1 or len(first) < 2:  # one task: starting workers would cost more than it
        _init(spec)
        yield from map(encode_documents, first)
        yield from map(encode_documents, batches)
        return
    batches = itertools.chain(first, batches)
    with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, (spec,)) as pool:
        # Not `pool.imap`: its feeder thread would read the whole corpus ahead into memory. A
        # window of a few tasks per worker keeps them busy and memory bounded.
        window: deque = deque()
        for batch in batches:
            window.append(pool.apply_async(encode_documents, (batch,)))
            if len(window) >= 3 * num_proc:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()
