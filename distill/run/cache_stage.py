"""The `cache-teacher` stage: run the teacher once over the training blocks and write its top-k
log-probabilities (and chosen layers' hidden states) to `<stage>/cache/`, for any number of
students to distill from without loading it. Every process writes its own shards; a killed run
resumes at the first shard not written whole."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from distill.config import CacheSpec, TeacherRef, TrainSpec
from distill.errors import RecipeError
from distill.faults import from_env
from distill.files import atomic_write
from distill.models import count_params, num_layers
from distill.objective.module import teacher_forward
from distill.run.assemble import frozen_teacher
from distill.run.cache_source import CACHE_DIR, blocks_needed, run_identity
from distill.run.context import RunContext, ref_fingerprint, stage_dir
from distill.run.results import StageResult
from distill.run.stage_output import _heldout
from distill.runtime import signals
from distill.runtime.distributed import make_accelerator
from distill.runtime.loop import autocast_for
from distill.teacher_cache.encoding import ENCODING, encode_topk
from distill.teacher_cache.store import finished_shard, write_manifest, write_shard

IDENTITY_FILE = "identity.json"
LOGITS_ROWS = 1024
"""Positions per lm_head chunk: memory O(chunk x vocab), as in the training objective."""


def run_cache_stage(ctx: RunContext, stage, fingerprint: str) -> StageResult:
    """Write the cache (resuming a partial one), then its manifest; the summary entry."""
    spec = stage.cache
    acc = make_accelerator(1)
    forward_spec = TrainSpec(batch_size=spec.batch_size, precision=spec.precision)
    ref = TeacherRef(
        model=stage.model, placement=spec.placement, max_memory_fraction=spec.max_memory_fraction
    )
    teacher, in_loop, _ = frozen_teacher(ctx, ref, forward_spec, acc, stage.model)
    if in_loop is teacher:
        teacher.to(acc.device)
    identity = _identity(ctx, stage, teacher)
    root = stage_dir(ctx, stage.name) / CACHE_DIR
    if acc.is_main_process:
        _start_or_resume(ctx, root, identity)
    acc.wait_for_everyone()
    blocks = _cached_blocks(ctx, spec.blocks)
    num_shards = math.ceil(len(blocks) / spec.shard_blocks)
    t0 = time.perf_counter()
    written = 0
    faults = from_env()
    autocast = autocast_for(forward_spec, acc.device)
    for index in range(acc.process_index, num_shards, acc.num_processes):
        if finished_shard(root, index) is not None:
            continue
        if signals.requested():  # the shards written are kept: the rerun resumes after them
            break
        first = index * spec.shard_blocks
        rows = blocks[first : first + spec.shard_blocks]
        ids = ctx.data.train[torch.from_numpy(rows)]
        # its own seed per shard: a resumed or re-run cache draws the same tail samples
        generator = torch.Generator(acc.device).manual_seed(ctx.recipe.seed * 1_000_003 + index)
        topk, hidden = teacher_outputs(
            in_loop, ids, spec, len(ctx.tokenizer), autocast, acc.device, generator
        )
        write_shard(root, index, first, topk, hidden)
        written += len(rows)
        if faults:
            faults.after_cache_shard(index)
    acc.wait_for_everyone()
    signals.stop_point(acc)
    wall_s = time.perf_counter() - t0
    shards = [finished_shard(root, index) for index in range(num_shards)]
    if any(shard is None for shard in shards):
        raise RecipeError(f"stage {stage.name!r}: a process did not finish its shards of {root}")
    size = sum(meta["size"] for shard in shards for meta in shard["files"].values())
    positions = len(blocks) * (ctx.data.seq_len - 1)
    if acc.is_main_process:
        write_manifest(root, {**identity, "wall_s": wall_s}, blocks, shards)
    acc.wait_for_everyone()
    ctx.log(
        f"teacher cache {root}: {len(blocks)} blocks, k={spec.k}, {spec.tail_samples} tail "
        f"samples, {size / positions:.1f} bytes per token, {size / 2**20:.1f} MiB"
    )
    metrics = _heldout(ctx, teacher, stage)
    computed_tokens = int(acc.reduce(torch.tensor(written, device=acc.device), "sum"))
    computed_tokens *= ctx.data.seq_len
    return StageResult(
        name=stage.name,
        kind=stage.kind,
        model_dir=str(root),
        source=stage.model,
        params=count_params(teacher),
        size_bytes=size,
        perplexity=metrics["perplexity"],
        loss=metrics["loss"],
        scheme=f"{identity['encoding']}+tail{spec.tail_samples}"
        if spec.tail_samples
        else identity["encoding"],
        tokens=len(blocks) * ctx.data.seq_len,
        wall_s=wall_s,
        tokens_per_s=computed_tokens / max(wall_s, 1e-9) if computed_tokens else None,
        k=spec.k,
        tail_samples=spec.tail_samples,
        bytes_per_token=size / positions,
    )


def _identity(ctx: RunContext, stage, teacher) -> dict:
    """What the cache is made from and how it is laid out (the manifest's first keys)."""
    spec = stage.cache
    layers = num_layers(teacher)
    bad = [layer for layer in spec.hidden_layers if not 0 <= layer < layers]
    if bad:
        raise RecipeError(
            f"stage {stage.name!r}: cache.hidden_layers {bad} are out of range for the teacher's "
            f"{layers} layers (0-based: 0..{layers - 1})"
        )
    vocab = len(ctx.tokenizer)
    if spec.tail_samples and spec.k >= vocab:
        raise RecipeError(
            f"stage {stage.name!r}: cache.k={spec.k} covers the whole vocabulary ({vocab} tokens), "
            "so there is no tail to sample; set cache.tail_samples: 0"
        )
    return {
        **run_identity(ctx),
        "teacher": stage.model,
        "teacher_fingerprint": ref_fingerprint(ctx, stage.model),
        "teacher_layers": layers,
        "hidden_size": teacher.config.hidden_size,
        "k": spec.k,
        "tail_samples": spec.tail_samples,
        "hidden_layers": sorted(set(spec.hidden_layers)),
        "precision": spec.precision,
        "blocks_requested": spec.blocks,
        "order_seed": ctx.recipe.seed,
        "num_train_blocks": len(ctx.data.train),
        "shard_blocks": spec.shard_blocks,
        "encoding": ENCODING,
    }


def _start_or_resume(ctx: RunContext, root: Path, identity: dict) -> None:
    """Keep shards written with these settings (resume); clear those of other settings."""
    marker = root / IDENTITY_FILE
    if marker.is_file() and json.loads(marker.read_text()) == identity:
        done = len(list(root.glob("shard-*.json")))
        if done:
            ctx.log(f"teacher cache {root}: resuming after {done} whole shards")
        return
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    atomic_write(marker, json.dumps(identity, indent=1))


def _cached_blocks(ctx: RunContext, requested: int | None) -> np.ndarray:
    """Every training block, or those the first `requested` positions of the batch order visit
    (a stage of `requested / global batch` steps with the recipe's seed reads only those)."""
    num_blocks = len(ctx.data.train)
    if requested is None:
        return np.arange(num_blocks)
    return blocks_needed(num_blocks, 1, requested, ctx.recipe.seed)


@torch.no_grad()
def teacher_outputs(
    teacher,
    blocks: torch.Tensor,
    spec: CacheSpec,
    vocab: int,
    autocast,
    device,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """What the cache stores of these blocks [n, seq_len]: records [n, seq_len - 1] and bf16
    bits [n, layers, seq_len, hidden] (None without `spec.hidden_layers`)."""
    topk, hidden = [], []
    want_states = bool(spec.hidden_layers)
    for start in range(0, len(blocks), spec.batch_size):
        ids = blocks[start : start + spec.batch_size].to(device)
        out = teacher_forward(teacher, ids, want_states, autocast)
        flat = out.hidden[:, :-1].reshape(-1, out.hidden.shape[-1])
        head = out.head_weight
        labels = ids[:, 1:].reshape(-1)
        records = [
            encode_topk(
                flat[i : i + LOGITS_ROWS].float() @ head.float().T,
                spec.k,
                vocab,
                labels[i : i + LOGITS_ROWS],
                spec.tail_samples,
                generator,
            )
            for i in range(0, len(flat), LOGITS_ROWS)
        ]
        topk.append(np.concatenate(records).reshape(len(ids), -1))
        if want_states:
            layers = torch.stack([out.states[i] for i in sorted(set(spec.hidden_layers))], 1)
            hidden.append(layers.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16))
    return np.concatenate(topk), (np.concatenate(hidden) if want_states else None)
