"""What a token store was built from, as fingerprints: the data settings that decide the
documents and their split, each input file's identity, and the tokenizer's identity."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distill.config import DataSpec
from distill.data.documents import input_paths, stdlib_paths
from distill.manifest import file_identity

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


def store_spec(spec: DataSpec) -> dict:
    return {k: v for k, v in spec.model_dump(mode="json").items() if k in STORE_KEYS}


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
    return [file_identity(path, path) for path in paths]


def tokenizer_sha256(tokenizer) -> str:
    """Identity of what a tokenizer does: its serialized pipeline (vocabulary, merges,
    normalization, special tokens), or for one without a `tokenizers` backend its vocabulary and
    special tokens."""
    identity = backend_json(tokenizer) or json.dumps(
        [sorted(tokenizer.get_vocab().items()), tokenizer.special_tokens_map], sort_keys=True
    )
    return hashlib.sha256(identity.encode()).hexdigest()


def backend_json(tokenizer) -> str | None:
    """The `tokenizers` pipeline as JSON, without the padding/truncation state that calls with
    `padding=`/`truncation=` leave on it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    state["truncation"] = state["padding"] = None
    return json.dumps(state, sort_keys=True)
