"""The training stage kinds: `train`, `distill` (also pruning recovery) and `qat`. Each is the one
loop of runtime/loop.py around what run/assemble.py builds; this module adds the stage's own
accelerator and tracker, then exports and measures the trained student."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.compress.fake_quant import remove_fake_quant, set_fake_quant_enabled
from distill.compress.prune import sparsity_of
from distill.models import add_lora, causal_lm_of, load_pretrained, unwrap_lora
from distill.run.assemble import TrainingRun, assemble_training_run
from distill.run.context import RunContext, model_dir, ref_config, stage_dir
from distill.run.prune_stage import _recovery_extra
from distill.run.quant_stages import QUANT_FILE, _qat_extra
from distill.run.results import StageResult
from distill.run.stage_output import _capped, _entry, _eval_spec, _export, _heldout, _latency
from distill.runtime import distributed, signals
from distill.runtime.checkpoint import find_latest_valid, read_state
from distill.runtime.distributed import make_accelerator
from distill.runtime.evaluate import teacher_agreement
from distill.runtime.loop import TrainJob, TrainResult, train
from distill.tracking import Tracker


def run_training_stage(ctx: RunContext, stage, fingerprint: str) -> StageResult:
    """Assemble the stage, train it, export the student, measure it."""
    spec = _capped(ctx, stage.train)
    # the stage's own accelerator (its grad accumulation); never stored where later stages see it
    acc = make_accelerator(spec.grad_accum)
    # Under DeepSpeed: batch sizes, accumulation, clipping and precision come from the recipe
    # (the launch was checked against every stage up front), see distributed.py.
    if distributed.deepspeed_plugin(acc) is not None:
        distributed.configure_deepspeed(acc, spec, ref_config(ctx, stage.model).hidden_size)
    run = assemble_training_run(ctx, stage, spec, acc)
    result = _train(ctx, stage, run, acc, spec, fingerprint)
    signals.enter_phase("export", stage.name)
    export, out, fake_quant_metrics = _export_student(ctx, stage, run, acc)
    metrics, extra = _measure(ctx, stage, run, export, result, fake_quant_metrics)
    return _entry(
        ctx,
        stage,
        export,
        out,
        metrics,
        steps=result.steps,
        wall_s=result.wall_s,
        tokens=result.tokens,
        tokens_per_s=result.tokens_per_s,
        skipped_steps=result.skipped_steps or None,
        latency_s=_latency(ctx, export, stage),
        **extra,
    )


def _train(ctx: RunContext, stage, run: TrainingRun, acc, spec, fingerprint: str) -> TrainResult:
    sdir = stage_dir(ctx, stage.name)
    tracker = Tracker(
        sdir / "metrics.jsonl" if acc.is_main_process else None,
        ctx.recipe.tracking.wandb,
        run_name=f"{ctx.recipe.name}/{stage.name}",
        config={"recipe": ctx.recipe.name, "stage": stage.model_dump(mode="json")},
        group=ctx.recipe.name,
        run_id=_previous_run_id(sdir),
    )
    job = TrainJob(
        accelerator=acc,
        module=run.module,
        teacher=run.teacher,
        train_blocks=ctx.data.train,
        eval_blocks=ctx.data.eval,
        spec=spec,
        seed=spec.seed if spec.seed is not None else ctx.recipe.seed,
        stage_dir=sdir,
        tracker=tracker,
        fingerprint=fingerprint,
        hooks=run.hooks,
        eval_batch_size=_eval_spec(ctx, stage).batch_size,
        log=ctx.log,
        force_resume=ctx.force_resume,
        on_policy=run.on_policy,
    )
    try:
        return train(job)
    finally:
        tracker.close()


def _export_student(ctx: RunContext, stage, run: TrainingRun, acc):
    """Write the trained student's model dir; return the model to measure, the dir, and for a
    `qat` stage its held-out metrics with fake quantization on."""
    trained = acc.unwrap_model(run.module).student
    zero3 = distributed.is_zero3(acc)
    if zero3:
        # the student is partitioned over the ranks: a plain copy on the main process is exported
        # (None elsewhere), and every rank reloads the export for the measurements below
        trained = _gathered_student(acc, trained, run.model_spec)
    out = model_dir(ctx, stage.name)
    fake_quant_metrics = None
    if run.quant is not None:
        # The stage's metric: fake quantization on (what the converted model computes), in fp32
        # like the ptq and convert stages, so the rounding is the only difference they measure.
        set_fake_quant_enabled(trained, True)
        fake_quant_metrics = _heldout(ctx, trained, stage)
        remove_fake_quant(trained)
    lora = run.model_spec.lora if run.model_spec is not None else None
    export = unwrap_lora(trained, merge=lora.merge_on_save) if lora is not None else trained
    quant_json = {QUANT_FILE: json.dumps(run.quant.model_dump(mode="json"))} if run.quant else None
    _export(ctx, export, out, quant_json)
    acc.wait_for_everyone()
    if zero3:
        acc.free_memory()  # the student's engine and optimizer state
        with distributed.hf_zero3_disabled():
            export = load_pretrained(str(out), what=f"stage {stage.name!r} export")
        export.to(acc.device)
    return export, out, fake_quant_metrics


def _measure(ctx: RunContext, stage, run: TrainingRun, export, result: TrainResult, fake_quant):
    """The stage's held-out metrics and what else its summary entry records."""
    extra: dict = {}
    metrics = result.eval
    if run.quant is not None:
        metrics = fake_quant
        extra.update(_qat_extra(ctx, stage, run.quant.name(), metrics["perplexity"]))
    if stage.kind == "distill":
        extra["teacher"] = run.teacher_name
        if run.teacher_model is not None:  # a cache holds no teacher to compare with
            extra["teacher_agreement"] = teacher_agreement(
                export, run.teacher_model, ctx.data.eval, 16, len(ctx.tokenizer)
            )
        extra.update(_recovery_extra(ctx, stage, metrics["perplexity"]))
    if result.on_policy is not None:
        extra["on_policy"] = result.on_policy
    if stage.teacher_cache is not None:
        extra["teacher_cache"] = stage.teacher_cache
    if run.keeps_sparsity:
        extra["keep_sparsity"] = True
        extra["sparsity"] = sparsity_of(export)
    return metrics, extra


def _gathered_student(acc, trained, model_spec):
    """A plain copy of a ZeRO-3-partitioned student on the main process (None elsewhere)."""
    from transformers import AutoModelForCausalLM

    state = distributed.gathered_state_dict(acc, trained)
    if state is None:
        return None
    with distributed.hf_zero3_disabled():
        plain = AutoModelForCausalLM.from_config(causal_lm_of(trained).config, dtype=torch.float32)
    if model_spec is not None and model_spec.lora is not None:
        plain = add_lora(plain, model_spec.lora)
    plain.load_state_dict(state)
    return plain


def _previous_run_id(sdir: Path) -> str | None:
    """The W&B run id of an interrupted attempt of this stage, so the resumed run continues it."""
    latest = find_latest_valid(sdir / "checkpoints")
    return read_state(latest).get("tracker_run_id") if latest else None
