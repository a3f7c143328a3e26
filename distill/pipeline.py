"""Running a recipe: tokenizer and data once, then each stage in order, each reading the previous
stage's model directory and writing its own:

    <output_dir>/tokenizer/, data/, <stage>/{model/, checkpoints/, metrics.jsonl, stage.json},
    summary.json, report.md, report.png

A stage whose `stage.json` records the same fingerprint (its resolved settings and those of
everything upstream) is finished and skipped, so re-running a recipe continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import ModelSpec, Recipe, RecipeError

STAGE_DONE = "stage.json"


@dataclass
class RunContext:
    recipe: Recipe
    out_dir: Path
    max_steps: int | None = None
    force_resume: bool = False
    accelerator: object = None
    tokenizer: object = None
    data: object = None
    data_fingerprint: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)
    entries: list[dict] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[distill] {message}", file=sys.stderr, flush=True)


def run_recipe(recipe: Recipe, max_steps: int | None = None, force_resume: bool = False) -> list:
    """Run every stage of `recipe`; returns the summary entries."""
    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    from distill.evaluate import write_report, write_summary

    hf_logging.disable_progress_bar()  # per-shard save/load bars drown the training log
    ctx = RunContext(recipe, recipe.resolved_output_dir, max_steps, force_resume)
    ctx.accelerator = make_accelerator(1)
    from distill.distributed import check_launch, check_same_recipe

    # several processes must agree on the recipe, and the launch must suit every stage of it
    check_same_recipe(ctx.accelerator, f"{_recipe_yaml(recipe)}\nmax_steps={max_steps}")
    check_launch(ctx.accelerator, recipe)
    if ctx.is_main:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        (ctx.out_dir / "recipe.yaml").write_text(_recipe_yaml(recipe))
    assert isinstance(ctx.accelerator, Accelerator)
    prepare_tokenizer_and_data(ctx)
    for stage in recipe.stages:
        entry = run_stage(ctx, stage)
        ctx.entries.append(entry)
        if ctx.is_main:
            write_summary(ctx.out_dir / "summary.json", ctx.entries)
    if ctx.is_main:
        report = write_report(ctx.out_dir, recipe.name, ctx.entries)
        ctx.log(f"report: {report}")
    ctx.accelerator.wait_for_everyone()
    return ctx.entries


def make_accelerator(grad_accum: int):
    """One Accelerator per training stage (grad accumulation differs between stages); gloo on
    machines without CUDA, and clear errors when a rank does not join (see distributed.py)."""
    from distill import distributed

    return distributed.make_accelerator(grad_accum)


def _recipe_yaml(recipe: Recipe) -> str:
    from distill.config import recipe_to_yaml

    return recipe_to_yaml(recipe)


# ----------------------------------------------------------------------------------------------
# Tokenizer and data


def prepare_tokenizer_and_data(ctx: RunContext) -> None:
    from distill import data as data_mod
    from distill.models import load_tokenizer

    recipe, acc = ctx.recipe, ctx.accelerator
    tok_dir = ctx.out_dir / "tokenizer"
    tok_fp = recipe.fingerprint(
        recipe.tokenizer.model_dump(mode="json"),
        _tokenizer_origin(recipe),
        recipe.data.model_dump(mode="json") if recipe.tokenizer.source == "train" else None,
    )
    data_fp = recipe.fingerprint(tok_fp, recipe.data.model_dump(mode="json"))
    data_path = ctx.out_dir / "data" / f"packed-{data_fp}.pt"
    with acc.main_process_first():
        if ctx.is_main:
            marker = tok_dir / "distill_fingerprint.txt"
            docs = None
            if not (marker.is_file() and marker.read_text() == tok_fp):
                t0 = time.perf_counter()
                if recipe.tokenizer.source == "train":
                    docs = data_mod.load_documents(recipe.data)
                    train_texts, _ = data_mod.split_documents(docs, recipe.data.eval_fraction)
                    tokenizer = data_mod.train_tokenizer(train_texts, recipe.tokenizer.train)
                else:
                    tokenizer = load_tokenizer(_tokenizer_origin(recipe), "tokenizer")
                if tok_dir.exists():
                    shutil.rmtree(tok_dir)
                tokenizer.save_pretrained(tok_dir)
                marker.write_text(tok_fp)
                ctx.log(
                    f"tokenizer ready ({len(tokenizer)} tokens, {time.perf_counter() - t0:.1f} s)"
                )
            if not data_path.is_file():
                t0 = time.perf_counter()
                tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
                docs = docs or data_mod.load_documents(recipe.data)
                packed = data_mod.build_packed_data(recipe.data, docs, tokenizer)
                data_path.parent.mkdir(parents=True, exist_ok=True)
                data_mod.save_packed(packed, data_path)
                ctx.log(
                    f"data ready: {len(docs)} documents, {packed.train.numel():,} training tokens "
                    f"in {len(packed.train)} blocks, {len(packed.eval)} held-out blocks "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
    ctx.tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
    ctx.data = data_mod.load_packed(data_path)
    ctx.data_fingerprint = data_fp


def _tokenizer_origin(recipe: Recipe) -> str | None:
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
# Stages


def stage_dir(ctx: RunContext, name: str) -> Path:
    return ctx.out_dir / name


def model_dir(ctx: RunContext, name: str) -> Path:
    return stage_dir(ctx, name) / "model"


def _earlier_stage(ctx: RunContext, ref: str):
    for entry in ctx.entries:
        if entry["name"] == ref:
            return entry
    return None


def ref_fingerprint(ctx: RunContext, ref: str) -> str:
    if ref in ctx.fingerprints:
        return ctx.fingerprints[ref]
    return ctx.recipe.fingerprint(ctx.recipe.models[ref].model_dump(mode="json"))


def load_ref(ctx: RunContext, ref: str, what: str, dtype: str | None = None):
    """A model by reference: an earlier stage's output, or a spec of `models`."""
    from distill.models import build_model, load_pretrained

    entry = _earlier_stage(ctx, ref)
    if entry is not None:
        return load_pretrained(
            entry["model_dir"], what=f"{what} (stage {ref!r})", dtype=dtype or "float32"
        )
    spec: ModelSpec = ctx.recipe.models[ref]
    if dtype is not None and spec.dtype == "float32":
        spec = spec.model_copy(update={"dtype": dtype})
    return build_model(spec, ctx.tokenizer, seed=ctx.recipe.seed, what=ref)


def ref_config(ctx: RunContext, ref: str):
    """The transformers config of a model by reference, without loading its weights."""
    from transformers import AutoConfig

    entry = _earlier_stage(ctx, ref)
    if entry is not None:
        return AutoConfig.from_pretrained(entry["model_dir"])
    spec: ModelSpec = ctx.recipe.models[ref]
    if spec.config is not None:
        fields = dict(spec.config)
        fields.setdefault("vocab_size", len(ctx.tokenizer))
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(
        os.path.expanduser(spec.path),
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
    )


def ref_spec(ctx: RunContext, ref: str) -> ModelSpec | None:
    return None if _earlier_stage(ctx, ref) is not None else ctx.recipe.models.get(ref)


def check_model_against_tokenizer(ctx: RunContext, ref: str, model, what: str) -> None:
    from distill.models import (
        check_head_covers_tokenizer,
        check_same_tokenizer,
        check_seq_len,
        has_tokenizer,
        load_tokenizer,
    )

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
    check_seq_len(model, ctx.data.seq_len, what)


def stage_fingerprint(ctx: RunContext, stage) -> str:
    settings = stage.model_dump(mode="json")
    if ctx.max_steps is not None and "train" in settings:
        settings["train"]["max_steps"] = min(settings["train"]["max_steps"], ctx.max_steps)
    upstream = [ref_fingerprint(ctx, stage.model)]
    teacher = getattr(stage, "teacher", None)
    if teacher is not None:
        upstream.append(ref_fingerprint(ctx, teacher.model))
    return ctx.recipe.fingerprint(
        settings, upstream, ctx.data_fingerprint, ctx.recipe.seed, ctx.recipe.eval.model_dump()
    )


def run_stage(ctx: RunContext, stage) -> dict:
    from distill import stages

    fp = stage_fingerprint(ctx, stage)
    ctx.fingerprints[stage.name] = fp
    done = stage_dir(ctx, stage.name) / STAGE_DONE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("fingerprint") == fp:
            ctx.log(f"stage {stage.name!r} already finished with these settings; skipping")
            return record["entry"]
        previous = stage_dir(ctx, stage.name).with_name(
            f"{stage.name}.previous-{record.get('fingerprint')}"
        )
        ctx.log(
            f"stage {stage.name!r} has output from other settings; running it again (the "
            f"finished output moves to {previous})"
        )
        if ctx.is_main:
            # A finished stage's checkpoints belong to its old settings: kept aside, not resumed
            # from, so nothing is lost and nothing is mistaken for progress of the new settings.
            if previous.exists():
                shutil.rmtree(previous)
            stage_dir(ctx, stage.name).rename(previous)
        ctx.accelerator.wait_for_everyone()
    ctx.log(f"stage {stage.name!r} ({stage.kind}) starting")
    if ctx.is_main:
        stage_dir(ctx, stage.name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runner = stages.RUNNERS[stage.kind]
    entry = runner(ctx, stage, fp)
    if "wall_s" in entry:  # the training loop's own time; the stage's includes load/eval/export
        entry["train_wall_s"] = entry["wall_s"]
    entry["wall_s"] = time.perf_counter() - t0
    entry = {"name": stage.name, "kind": stage.kind, **entry}
    if stage.compare_to:
        entry["compare_to"] = stage.compare_to
    if ctx.is_main:
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "entry": entry}, indent=2))
        tmp.replace(done)
        ppl = (entry.get("eval") or {}).get("perplexity")
        ctx.log(
            f"stage {stage.name!r} done in {entry['wall_s']:.1f} s"
            + (f": held-out perplexity {ppl:.2f}" if ppl else "")
        )
    ctx.accelerator.wait_for_everyone()
    return entry
