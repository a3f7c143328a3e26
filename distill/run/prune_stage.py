"""The `prune` stage kind, and what later stages learn from a pruned model (masks, layer map)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.compress.prune import CALIBRATION_BATCH_SIZE, RECORD_FILE, SPARSE_METHODS, prune_model
from distill.config import Recipe, TrainSpec
from distill.errors import RecipeError, SettingError
from distill.models import num_layers
from distill.objective.hidden import resolve_layer_map
from distill.recipe_file import looks_local
from distill.run.context import (
    RunContext,
    check_model_against_tokenizer,
    earlier_stage,
    load_ref,
    model_dir,
)
from distill.run.report import recovered_fraction
from distill.run.results import StageResult
from distill.run.stage_output import _entry, _export, _heldout, _latency
from distill.runtime import signals
from distill.runtime.loop import autocast_for


def run_prune_stage(ctx: RunContext, stage, fingerprint: str) -> StageResult:
    """Prune the model, measure it before and after, save it with its prune record."""

    p = stage.prune
    model = load_ref(ctx, stage.model, "model to prune")
    check_model_against_tokenizer(ctx, stage.model, model, f"model {stage.model!r}")
    model.to(ctx.accelerator.device)
    autocast = _upstream_autocast(ctx, stage.model)
    before = _heldout(ctx, model, stage, autocast)
    signals.stop_point(ctx.accelerator)
    try:
        result = prune_model(model, p, _calibration_batches(ctx, p.calibration_batches))
    except SettingError as err:  # sizes only known once the model is loaded (heads, layers, m)
        raise err.named(lambda key: f"prune.{key}", f"stage {stage.name!r}: ") from None
    except ValueError as err:
        raise RecipeError(f"stage {stage.name!r}: {err}") from None
    signals.stop_point(ctx.accelerator)
    metrics = _heldout(ctx, model, stage, autocast)
    out = model_dir(ctx, stage.name)
    record = result.record(source=stage.model)
    _export(ctx, model, out, {RECORD_FILE: json.dumps(record, indent=2)})
    ctx.accelerator.wait_for_everyone()
    ctx.log(
        f"pruned {stage.model!r} with {p.method}: sparsity {result.sparsity:.3f}, parameters "
        f"{result.params_before:,} -> {result.params_after:,}, perplexity "
        f"{before['perplexity']:.2f} -> {metrics['perplexity']:.2f}"
    )
    return _entry(
        ctx,
        stage,
        model,
        out,
        metrics,
        method=p.method,
        sparsity=result.sparsity,
        params_before=result.params_before,
        perplexity_before=before["perplexity"],
        steps=0,
        details=record["details"],
        latency_s=_latency(ctx, model, stage),
    )


def _calibration_batches(ctx: RunContext, num_batches: int) -> list[torch.Tensor]:
    """`num_batches` batches of training blocks, drawn with the recipe's seed (same every run)."""

    gen = torch.Generator().manual_seed(ctx.recipe.seed)
    count = num_batches * CALIBRATION_BATCH_SIZE
    picks = torch.randperm(len(ctx.data.train), generator=gen)[:count]
    return list(ctx.data.train[picks].split(CALIBRATION_BATCH_SIZE))


def _upstream_autocast(ctx: RunContext, ref: str):
    """The autocast of the nearest training stage upstream of `ref`; for a model of `models`, that
    of the recipe's training defaults (what a recovery stage will use).

    A prune stage measures perplexity before and after pruning the way the stages around it do,
    so its "before" equals the source stage's own number and the loss recovery later wins back is
    not mixed with the bf16-vs-fp32 difference.
    """

    earlier = {result.name for result in ctx.results}
    while ref in earlier:
        source = ctx.recipe.stage(ref)
        if hasattr(source, "train"):
            return autocast_for(source.train, ctx.accelerator.device)
        ref = source.model
    return autocast_for(TrainSpec(**ctx.recipe.train), ctx.accelerator.device)


def _recovery_extra(ctx: RunContext, stage, perplexity: float) -> dict:
    """For a `distill` stage whose student is a prune stage's output (pruning recovery): the prune
    stage to compare with, and the share of the perplexity it lost that training won back."""

    pruned = earlier_stage(ctx, stage.model)
    if pruned is None or pruned.kind != "prune":
        return {}
    return {
        "compare_to": pruned.name,
        "recovered_fraction": recovered_fraction(
            pruned.perplexity_before, pruned.perplexity, perplexity
        ),
    }


def hidden_layer_map(ctx: RunContext, stage, student, teacher_layers: int) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs of a stage's hidden-state loss.

    `uniform` spreads the student's layers evenly over the teacher's; but a student made by
    removing layers from a model shaped like its teacher keeps each layer's counterpart: its
    surviving layers map to their original indices, read from the prune record in its model dir.
    """

    spec = stage.objective.hidden.layer_map
    student_layers = num_layers(student)
    if spec == "uniform":
        kept = _layers_kept_by_depth_prune(ctx, stage.model, teacher_layers)
        if kept is not None and len(kept) == student_layers:
            pairs = list(enumerate(kept))
            ctx.log(f"hidden-state layer map follows the depth prune of {stage.model!r}: {pairs}")
            return resolve_layer_map(pairs, student_layers, teacher_layers)
    return resolve_layer_map(spec, student_layers, teacher_layers)


def _layers_kept_by_depth_prune(ctx: RunContext, ref: str, teacher_layers: int) -> list | None:
    """Original indices of the layers a depth prune of a `teacher_layers`-layer model kept, when
    the model `ref` names was made that way (its dir holds a depth prune record); else None."""
    record = _prune_record(ctx, ref)
    if record is None or record.get("method") != "depth":
        return None
    removed = record["details"]["removed_layers"]
    original = record["details"]["num_hidden_layers"] + len(removed)
    if original != teacher_layers:
        return None
    return [i for i in range(original) if i not in removed]


def _prune_record(ctx: RunContext, ref: str) -> dict | None:
    """The prune record saved in the model dir of `ref` (an earlier stage, or a local path of
    `models`), or None when that model was not made by pruning."""
    entry = earlier_stage(ctx, ref)
    if entry is None:
        return _models_prune_record(ctx.recipe, ref)
    return _read_record(Path(entry.model_dir))


def _models_prune_record(recipe: Recipe, ref: str) -> dict | None:
    """The prune record of a local model directory named by `models.<ref>.path`, if any."""
    spec = recipe.models.get(ref)
    if spec is None or not spec.path or not looks_local(spec.path):
        return None
    return _read_record(Path(spec.path).expanduser())


def _read_record(model_dir: Path) -> dict | None:
    path = model_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def keeps_sparsity(recipe: Recipe, stage) -> bool:
    """Whether a `distill` stage keeps its student's zeros (pruning recovery): `keep_sparsity`, or
    with `auto` when the student is the output of an unstructured or N:M prune stage, or a model of
    `models` saved by `distill prune` with such a method. Stages and the launch check both ask."""
    if stage.kind != "distill":
        return False
    if stage.keep_sparsity != "auto":
        return bool(stage.keep_sparsity)
    position = [s.name for s in recipe.stages].index(stage.name)  # a copy of the stage too (bench)
    earlier = [s for s in recipe.stages[:position] if s.name == stage.model]
    if earlier:
        upstream = earlier[-1]
        return upstream.kind == "prune" and upstream.prune.method in SPARSE_METHODS
    record = _models_prune_record(recipe, stage.model)
    return record is not None and record.get("method") in SPARSE_METHODS
