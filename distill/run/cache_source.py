"""How a stage reaches an offline teacher cache: where it lies (a `cache-teacher` stage or a
directory), what the reading run must share with it, and whether it covers the stage's steps."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from distill.data.order import BatchOrder
from distill.errors import RecipeError
from distill.run.context import RunContext, stage_dir
from distill.teacher_cache.store import CachedTeacher, open_cache, read_manifest

CACHE_DIR = "cache"


def cache_dir(ctx: RunContext, ref: str) -> Path:
    """A `cache-teacher` stage's cache directory, or `ref` itself read as a directory."""
    if ref in {stage.name for stage in ctx.recipe.stages}:
        return stage_dir(ctx, ref) / CACHE_DIR
    return Path(ref).expanduser()


def tokenizer_identity(tokenizer) -> str:
    """A hash of the vocabulary and special tokens: two tokenizers that encode alike agree."""
    blob = json.dumps(
        [sorted(tokenizer.get_vocab().items()), sorted(tokenizer.special_tokens_map.items())],
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_identity(ctx: RunContext) -> dict:
    """What this run's data is: a cache must have been made from the same (store.IDENTITY_KEYS)."""
    return {
        "tokenizer": tokenizer_identity(ctx.tokenizer),
        "data": ctx.data_fingerprint,
        "seq_len": ctx.data.seq_len,
        "vocab_size": len(ctx.tokenizer),
    }


def cache_fingerprint(ctx: RunContext, ref: str) -> str:
    """The identity of a cache for the fingerprint of a stage reading it: the cache stage's own
    fingerprint, or a finished cache directory's manifest."""
    if ref in ctx.fingerprints:
        return ctx.fingerprints[ref]
    manifest = read_manifest(cache_dir(ctx, ref), f"teacher.cache {ref!r}")
    manifest.pop("wall_s", None)
    return ctx.recipe.fingerprint(manifest)


def blocks_needed(num_blocks: int, max_steps: int, global_batch: int, seed: int) -> np.ndarray:
    """The training blocks the first `max_steps` steps visit (any world size: the batch order
    depends only on the global batch)."""
    order = BatchOrder(num_blocks, global_batch, 1, 1, seed)
    visited = [order.indices(step, 0, 0) for step in range(max_steps)]
    return np.unique(np.concatenate([v.numpy() for v in visited]))


def open_stage_cache(ctx: RunContext, stage, spec, world_size: int) -> CachedTeacher:
    """The cache `stage` reads, checked against this run and against the blocks its steps need."""
    ref = stage.teacher_cache
    what = f"stage {stage.name!r}"
    cache = open_cache(cache_dir(ctx, ref), run_identity(ctx), what)
    num_blocks = len(ctx.data.train)
    if cache.manifest["num_train_blocks"] != num_blocks:
        raise RecipeError(
            f"{what}: the teacher cache {cache.root} was made from {cache.manifest['num_train_blocks']} "
            f"training blocks, this run has {num_blocks}; write the cache again"
        )
    cached = cache.cached_blocks()
    if len(cached) < num_blocks:
        seed = spec.seed if spec.seed is not None else ctx.recipe.seed
        global_batch = spec.batch_size * spec.grad_accum * world_size
        needed = blocks_needed(num_blocks, spec.max_steps, global_batch, seed)
        missing = np.setdiff1d(needed, cached)
        if len(missing):
            raise RecipeError(
                f"{what}: its {spec.max_steps} steps of {global_batch} blocks visit "
                f"{len(needed)} training blocks, but the teacher cache {cache.root} holds "
                f"{len(cached)} of them ({len(missing)} missing); raise the cache stage's "
                f"`cache.blocks` to at least {spec.max_steps * global_batch} (or leave it unset "
                "for every block), or lower this stage's `train.max_steps`"
            )
    return cache
