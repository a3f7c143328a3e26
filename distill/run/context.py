"""What every stage of a run shares: the recipe, the output folder, the tokenizer and data, and the
stages finished so far; and how a stage reaches a model by reference (an earlier stage's output or a
key of `models`)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from distill.config import ModelSpec, Recipe
from distill.errors import RecipeError
from distill.models import (
    build_model,
    check_head_covers_tokenizer,
    check_same_tokenizer,
    check_seq_len,
    has_tokenizer,
    load_pretrained,
    load_tokenizer,
)
from distill.run.results import StageResult

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from distill.data.blocks import PackedData

STAGE_DONE = "stage.json"


@dataclass
class RunContext:
    """A run of a recipe, as its stages see it."""

    recipe: Recipe
    out_dir: Path
    max_steps: int | None = None
    """`--max-steps`: every training stage capped at this many steps."""
    force_resume: bool = False
    accelerator: Accelerator | None = None
    """The run's process group (barriers, the main process); a training stage trains under an
    accelerator of its own."""
    tokenizer: PreTrainedTokenizerBase | None = None
    data: PackedData | None = None
    data_fingerprint: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Stage name -> fingerprint of its settings and everything upstream."""
    results: list[StageResult] = field(default_factory=list)
    """The stages finished so far, in order."""
    prompts: object = None
    """On-policy prompts (a data.prompts.PromptSets), tokenized on first use."""

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[distill] {message}", file=sys.stderr, flush=True)


def stage_dir(ctx: RunContext, name: str) -> Path:
    return ctx.out_dir / name


def model_dir(ctx: RunContext, name: str) -> Path:
    return stage_dir(ctx, name) / "model"


def read_stage_record(ctx: RunContext, name: str) -> dict | None:
    """A finished stage's record (`stage.json`: its fingerprint and summary entry), or None."""
    done = stage_dir(ctx, name) / STAGE_DONE
    return json.loads(done.read_text()) if done.is_file() else None


def _earlier_stage(ctx: RunContext, ref: str):
    for result in ctx.results:
        if result.name == ref:
            return result
    return None


def root_model_key(recipe: Recipe, ref: str) -> tuple[str, list]:
    """The `models` key a reference leads to when no earlier stage has run (`distill bench` builds
    models fresh), following each stage's `model`; and the prune stages passed on the way."""
    prunes = []
    while ref not in recipe.models:
        upstream = recipe.stage(ref)
        if upstream.kind == "prune":
            prunes.append(upstream)
        ref = upstream.model
    return ref, prunes


def _spec_of(ctx: RunContext, ref: str) -> ModelSpec:
    return ctx.recipe.models[root_model_key(ctx.recipe, ref)[0]]


def ref_fingerprint(ctx: RunContext, ref: str) -> str:
    if ref in ctx.fingerprints:
        return ctx.fingerprints[ref]
    return ctx.recipe.fingerprint(ctx.recipe.models[ref].model_dump(mode="json"))


def load_ref(ctx: RunContext, ref: str, what: str, dtype: str | None = None):
    """A model by reference: an earlier stage's output, or a spec of `models`."""

    entry = _earlier_stage(ctx, ref)
    if entry is not None:
        return load_pretrained(
            entry.model_dir, what=f"{what} (stage {ref!r})", dtype=dtype or "float32"
        )
    spec = _spec_of(ctx, ref)
    if dtype is not None and spec.dtype == "float32":
        spec = spec.model_copy(update={"dtype": dtype})
    return build_model(spec, ctx.tokenizer, seed=ctx.recipe.seed, what=ref)


def ref_config(ctx: RunContext, ref: str):
    """The transformers config of a model by reference, without loading its weights."""
    from transformers import AutoConfig

    entry = _earlier_stage(ctx, ref)
    if entry is not None:
        return AutoConfig.from_pretrained(entry.model_dir)
    spec = _spec_of(ctx, ref)
    if spec.config is not None:
        fields = dict(spec.config)
        if "vocab_size" not in fields:
            fields["vocab_size"] = len(ctx.tokenizer)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(
        os.path.expanduser(spec.path),
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
    )


def ref_spec(ctx: RunContext, ref: str) -> ModelSpec | None:
    return None if _earlier_stage(ctx, ref) is not None else _spec_of(ctx, ref)


def check_model_against_tokenizer(ctx: RunContext, ref: str, model, what: str) -> None:

    spec = ref_spec(ctx, ref)
    if (
        spec is not None
        and spec.path
        and (has_tokenizer(spec.path) or not os.path.isdir(spec.path))
    ):
        try:
            own = load_tokenizer(spec.path, what, spec.trust_remote_code)
        except RecipeError:
            own = None
        if own is not None:
            check_same_tokenizer(
                ctx.tokenizer, own, "the recipe's tokenizer", f"{what} ({spec.path})"
            )
    check_head_covers_tokenizer(model, ctx.tokenizer, what)
    check_seq_len(model, ctx.recipe.data.seq_len, what)
