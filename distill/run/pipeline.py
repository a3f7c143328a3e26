"""Running a recipe: tokenizer and data once, then each stage in order, each reading the previous
stage's model directory and writing its own:

    <output_dir>/tokenizer/, data/, <stage>/{model/, checkpoints/, metrics.jsonl, stage.json},
    summary.json, report.md, report.png

A stage whose `stage.json` records the same fingerprint (its resolved settings and those of
everything upstream) is finished and skipped, so re-running a recipe continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time

from distill.config import TRAINING_KINDS, Recipe
from distill.errors import RecipeError, StopRequested
from distill.files import atomic_write
from distill.manifest import path_identity
from distill.recipe_file import recipe_to_yaml
from distill.run.cache_source import cache_fingerprint
from distill.run.cache_stage import run_cache_stage
from distill.run.context import (
    STAGE_DONE,
    RunContext,
    read_stage_record,
    ref_fingerprint,
    result_of_record,
    stage_dir,
    stage_record,
    summary_entry,
)
from distill.run.eval_sets import set_identity
from distill.run.evaluate_stage import run_evaluate_stage, stage_metrics
from distill.run.export_stage import run_export_stage
from distill.run.gates import check_gates
from distill.run.lock import hold_output_lock
from distill.run.prepare import prepare_tokenizer_and_data
from distill.run.prune_stage import keeps_sparsity, run_prune_stage
from distill.run.quant_stages import run_ptq_stage
from distill.run.report import write_report, write_summary
from distill.run.results import StageResult
from distill.run.stage_output import _eval_spec
from distill.run.train_stage import run_training_stage
from distill.runtime import distributed, signals
from distill.runtime.checkpoint import list_checkpoints
from distill.runtime.distributed import check_launch, check_same_recipe


def run_recipe(
    recipe: Recipe,
    max_steps: int | None = None,
    force_resume: bool = False,
    until: str | None = None,
) -> list[StageResult]:
    """Run every stage of `recipe` (or those up to and including the stage `until`); returns
    what each produced."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard save/load bars drown the training log
    ctx = RunContext(recipe, recipe.resolved_output_dir, max_steps, force_resume)
    ctx.accelerator = distributed.make_accelerator(1)

    # several processes must agree on the recipe, and the launch must suit every stage of it
    check_same_recipe(ctx.accelerator, f"{_recipe_yaml(recipe)}\nmax_steps={max_steps}")
    check_launch(ctx.accelerator, recipe, lambda stage: keeps_sparsity(recipe, stage))
    # one watch for every phase, and one run per output folder, until the last line
    with signals.watch(), hold_output_lock(ctx.out_dir, ctx.accelerator, ctx.log):
        return _run_stages(ctx, until)


def _run_stages(ctx: RunContext, until: str | None) -> list[StageResult]:
    recipe = ctx.recipe
    signals.enter_phase("data")
    if ctx.is_main:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(ctx.out_dir / "recipe.yaml", _recipe_yaml(recipe))
    prepare_tokenizer_and_data(ctx)
    signals.stop_point(ctx.accelerator)
    names = [stage.name for stage in recipe.stages]
    if until is not None and until not in names:
        raise RecipeError(f"stage {until!r} is not in the recipe (stages: {', '.join(names)})")
    stages = recipe.stages[: names.index(until) + 1] if until else recipe.stages
    for stage in stages:
        ctx.results.append(run_stage(ctx, stage))
        if ctx.is_main:
            write_summary(
                ctx.out_dir / "summary.json", [summary_entry(ctx, r) for r in ctx.results]
            )
    signals.enter_phase("report")  # cheap, and every stage is done: finished even when stopped
    if ctx.is_main:
        entries = [summary_entry(ctx, r) for r in ctx.results]
        report = write_report(ctx.out_dir, recipe.name, entries, recipe.tracking.wandb)
        ctx.log(f"report: {report}")
    ctx.accelerator.wait_for_everyone()
    check_gates(recipe.eval.gates, ctx.results)  # on every rank: each exits with the gate's code
    return ctx.results


def _recipe_yaml(recipe: Recipe) -> str:

    return recipe_to_yaml(recipe)


# ----------------------------------------------------------------------------------------------
# Tokenizer and data


# ----------------------------------------------------------------------------------------------
# Stages


def stage_fingerprint(ctx: RunContext, stage) -> str:
    settings = stage.model_dump(mode="json")
    if ctx.max_steps is not None and "train" in settings:
        settings["train"]["max_steps"] = min(settings["train"]["max_steps"], ctx.max_steps)
    if getattr(getattr(stage, "objective", None), "on_policy", None) is not None:
        settings["prompts"] = ctx.recipe.data.model_dump(mode="json")["prompts"]  # what it samples
    upstream = [ref_fingerprint(ctx, stage.model)]
    teacher = getattr(stage, "teacher", None)
    if teacher is not None and teacher.model is not None:
        upstream.append(ref_fingerprint(ctx, teacher.model))
    eval_teacher = ctx.recipe.eval.teacher
    if eval_teacher in ctx.fingerprints or eval_teacher in ctx.recipe.models:
        upstream.append(ref_fingerprint(ctx, eval_teacher))  # agreement is measured against it
    ev = _eval_spec(ctx, stage)
    if stage.teacher_cache is not None:  # what the cache holds, not only its name
        upstream.append(cache_fingerprint(ctx, stage.teacher_cache))
    return ctx.recipe.fingerprint(
        settings,
        upstream,
        ctx.data_fingerprint,
        ctx.recipe.seed,
        # gates judge results and change none: editing one must not rerun a stage
        ctx.recipe.eval.model_dump(exclude={"gates"}),
        # what the eval sets and local lm-eval tasks read, not only their names
        [set_identity(source) for source in ev.sets.values()],
        [path_identity(path) for path in ev.lm_eval.include_path] if ev.lm_eval else None,
    )


def run_stage(ctx: RunContext, stage) -> StageResult:
    fp = stage_fingerprint(ctx, stage)
    ctx.fingerprints[stage.name] = fp
    record = read_stage_record(ctx, stage.name)
    if record is not None:
        if record.get("fingerprint") == fp:
            ctx.log(f"stage {stage.name!r} already finished with these settings; skipping")
            return result_of_record(ctx, stage.name, record)
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
    signals.stop_point(ctx.accelerator, f"stage {stage.name!r}, before it started")
    ctx.log(f"stage {stage.name!r} ({stage.kind}) starting")
    signals.enter_phase(stage.kind if stage.kind not in TRAINING_KINDS else "setup", stage.name)
    if ctx.is_main:
        stage_dir(ctx, stage.name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runner = RUNNERS[stage.kind]
    result = runner(ctx, stage, fp)
    if result.kind in TRAINING_KINDS:  # the loop's own time; the stage's includes load/eval/export
        result.train_wall_s = result.wall_s
    result.wall_s = time.perf_counter() - t0
    # every model a stage writes, measured as served (`evaluate` measures itself; a teacher cache
    # holds no model)
    if result.metrics is None and stage.kind != "cache-teacher":
        _abandon_if_stopped(ctx, stage)  # the eval can be long: the rerun redoes the stage's end
        signals.enter_phase("measure", stage.name)
        result.metrics = stage_metrics(ctx, stage, result)
    if stage.compare_to:
        result.compare_to = stage.compare_to
    if ctx.is_main:
        done = stage_dir(ctx, stage.name) / STAGE_DONE
        record = json.dumps(stage_record(ctx, fp, result), indent=2)
        atomic_write(done, record, f"recording that stage {stage.name!r} is done ({done})")
        ctx.log(
            f"stage {stage.name!r} done in {result.wall_s:.1f} s: held-out perplexity "
            f"{result.perplexity:.2f}"
        )
    ctx.accelerator.wait_for_everyone()
    return result


def _abandon_if_stopped(ctx: RunContext, stage) -> None:
    """A safe point inside a stage: stopped here, it is not marked done; a training stage resumes
    from its last checkpoint (saved before its final eval), the others run again."""
    if signals.stop_agreed(ctx.accelerator):
        saved = list_checkpoints(stage_dir(ctx, stage.name) / "checkpoints")
        where = f"stage {stage.name!r} (not marked done)"
        raise StopRequested(saved[-1] if saved else None, where)


RUNNERS = {
    "train": run_training_stage,
    "distill": run_training_stage,
    "cache-teacher": run_cache_stage,
    "qat": run_training_stage,
    "prune": run_prune_stage,
    "ptq": run_ptq_stage,
    "export": run_export_stage,
    "evaluate": run_evaluate_stage,
}
