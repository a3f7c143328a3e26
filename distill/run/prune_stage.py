"""The `prune` stage kind, and what later stages learn from a pruned model (masks, layer map)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.compress.prune import CALIBRATION_BATCH_SIZE, RECORD_FILE, prune_model
from distill.config import TrainSpec
from distill.errors import RecipeError
from distill.models import num_layers
from distill.objective.hidden import resolve_layer_map
from distill.recipe_file import looks_local
from distill.run.context import RunContext, check_model_against_tokenizer, load_ref, model_dir
from distill.run.report import recovered_fraction
from distill.run.stage_output import _entry, _export, _heldout, _latency
from distill.runtime.loop import autocast_for


def run_prune_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    """Prune the model, measure it before and after, save it with its prune record."""

    p = stage.prune
    model = load_ref(ctx, stage.model, "model to prune")
    check_model_against_tokenizer(ctx, stage.model, model, f"model {stage.model!r}")
    model.to(ctx.accelerator.device)
    autocast = _upstream_autocast(ctx, stage.model)
    before = _heldout(ctx, model, stage, autocast)
    try:
        result = prune_model(
            model,
            p.method,
            sparsity=p.sparsity,
            n=p.n,
            m=p.m,
            scoring=p.scoring,
            scope=p.scope,
            calibration=_calibration_batches(ctx, p.calibration_batches),
            width_heads_fraction=p.heads_fraction,
            width_mlp_fraction=p.mlp_fraction,
            width_head_unit=p.head_unit,
            width_multiple_of=p.multiple_of,
            depth_layers=p.layers,
        )
    except ValueError as err:  # sizes only known once the model is loaded (heads, layers, m)
        message = str(err)
        for argument, key in _PRUNE_KEYS.items():
            message = message.replace(argument, f"prune.{key}")
        raise RecipeError(f"stage {stage.name!r}: {message}") from None
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


_PRUNE_KEYS = {
    "width_heads_fraction": "heads_fraction",
    "width_mlp_fraction": "mlp_fraction",
    "width_head_unit": "head_unit",
    "width_multiple_of": "multiple_of",
    "depth_layers": "layers",
}


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

    earlier = {entry["name"] for entry in ctx.entries}
    while ref in earlier:
        source = ctx.recipe.stage(ref)
        if hasattr(source, "train"):
            return autocast_for(source.train, ctx.accelerator.device)
        ref = source.model
    return autocast_for(TrainSpec(**ctx.recipe.train), ctx.accelerator.device)


def _recovery_extra(ctx: RunContext, stage, perplexity: float) -> dict:
    """For a `distill` stage whose student is a prune stage's output (pruning recovery): the prune
    stage to compare with, and the share of the perplexity it lost that training won back."""

    pruned = next((e for e in ctx.entries if e["name"] == stage.model), None)
    if pruned is None or pruned["kind"] != "prune":
        return {}
    return {
        "compare_to": pruned["name"],
        "recovered_fraction": recovered_fraction(
            pruned["perplexity_before"], pruned["eval"]["perplexity"], perplexity
        ),
    }


def hidden_layer_map(ctx: RunContext, stage, student, teacher) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs of a stage's hidden-state loss.

    `uniform` spreads the student's layers evenly over the teacher's; but a student made by
    removing layers from a model shaped like its teacher keeps each layer's counterpart: its
    surviving layers map to their original indices, read from the prune record in its model dir.
    """

    spec = stage.objective.hidden.layer_map
    student_layers, teacher_layers = num_layers(student), num_layers(teacher)
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

    entry = next((e for e in ctx.entries if e["name"] == ref), None)
    spec = ctx.recipe.models.get(ref) if entry is None else None
    if entry is not None:
        path = Path(entry["model_dir"])
    elif spec is not None and spec.path and looks_local(spec.path):
        path = Path(spec.path).expanduser()
    else:
        return None
    if not (path / RECORD_FILE).is_file():
        return None
    return json.loads((path / RECORD_FILE).read_text())


def _keeps_sparsity(ctx: RunContext, stage) -> bool:
    if stage.keep_sparsity != "auto":
        return bool(stage.keep_sparsity)
    for entry in ctx.entries:
        if entry["name"] == stage.model:
            return entry["kind"] == "prune" and entry.get("method") in ("magnitude", "wanda", "nm")
    # a model of `models` saved by `distill prune` carries its prune record
    record = _prune_record(ctx, stage.model)
    return record is not None and record.get("method") in ("magnitude", "wanda", "nm")
