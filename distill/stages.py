"""One function per stage kind. Each loads the model it starts from, does its work (train, prune,
quantize), writes `<stage>/model/` and returns its summary entry. Training kinds all go through the
one loop in trainer.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.config import QuantSpec
from distill.models import count_params, dir_size_bytes, freeze
from distill.pipeline import (
    RunContext,
    check_model_against_tokenizer,
    load_ref,
    model_dir,
    ref_spec,
    stage_dir,
)

QUANT_FILE = "distill_quant.json"


def _eval_spec(ctx: RunContext, stage):
    return stage.eval or ctx.recipe.eval


def _capped(ctx: RunContext, spec):
    if ctx.max_steps is not None and spec.max_steps > ctx.max_steps:
        return spec.model_copy(update={"max_steps": ctx.max_steps})
    return spec


def _export(ctx: RunContext, model, out: Path, extra_files: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then rename: a model dir is whole or absent."""
    import shutil

    if not ctx.is_main:
        return
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    ctx.tokenizer.save_pretrained(tmp)
    for name, content in (extra_files or {}).items():
        (tmp / name).write_text(content)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _heldout(ctx: RunContext, model, stage, autocast=None) -> dict:
    from distill.evaluate import heldout_metrics

    ev = _eval_spec(ctx, stage)
    return heldout_metrics(model, ctx.data.eval, ev.batch_size, len(ctx.tokenizer), autocast)


def _latency(ctx: RunContext, model, stage) -> float | None:
    from distill.evaluate import generate_latency_s

    ev = _eval_spec(ctx, stage)
    if not ev.latency:
        return None
    return generate_latency_s(model, ctx.data.eval[:1, :16], ev.latency_tokens)


def _entry(ctx: RunContext, stage, model, out: Path, metrics: dict, **extra) -> dict:
    return {
        "model_dir": str(out),
        "params": count_params(model),
        "size_bytes": dir_size_bytes(out),
        "eval": {"perplexity": metrics["perplexity"], "loss": metrics["loss"]},
        **{k: v for k, v in extra.items() if v is not None},
    }


# ----------------------------------------------------------------------------------------------
# Training kinds: train, distill (also pruning recovery), qat


def run_training_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    from distill import losses
    from distill.models import add_lora, hidden_width, num_layers, unwrap_lora
    from distill.pipeline import make_accelerator
    from distill.tracking import Tracker
    from distill.trainer import DistillModule, TrainHooks, TrainJob, autocast_for, train

    spec = _capped(ctx, stage.train)
    acc = make_accelerator(spec.grad_accum)
    ctx.accelerator = acc
    seed = spec.seed if spec.seed is not None else ctx.recipe.seed
    student = load_ref(ctx, stage.model, "student")
    check_model_against_tokenizer(ctx, stage.model, student, f"model {stage.model!r}")
    model_spec = ref_spec(ctx, stage.model)
    teacher = None
    teacher_ref = getattr(stage, "teacher", None)
    if stage.kind == "qat" and teacher_ref is None:
        teacher_ref_name = stage.model
    else:
        teacher_ref_name = teacher_ref.model if teacher_ref is not None else None
    if teacher_ref_name is not None:
        teacher = load_ref(ctx, teacher_ref_name, "teacher", dtype=_teacher_dtype(spec))
        check_model_against_tokenizer(
            ctx, teacher_ref_name, teacher, f"teacher {teacher_ref_name!r}"
        )
        freeze(teacher)

    hooks = TrainHooks()
    extra: dict = {}
    if stage.kind == "distill" and _keeps_sparsity(ctx, stage):
        from distill.prune import apply_masks, masks_from_zeros, sparsity_of

        masks = masks_from_zeros(student)
        hooks.after_optimizer_step = lambda m: apply_masks(m.student, masks)
        extra["keep_sparsity"] = True
    quant: QuantSpec | None = None
    if stage.kind == "qat":
        from distill import quantize

        quant = stage.quant
        scheme = _scheme(quant)
        quantize.prepare_qat(student, scheme)
        start = stage.fake_quant_after
        quantize.set_fake_quant_enabled(student, start == 0)
        if start:
            hooks.before_step = lambda step, m: quantize.set_fake_quant_enabled(
                m.student, step >= start
            )
    if model_spec is not None and model_spec.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if model_spec is not None and model_spec.lora is not None:
        student = add_lora(student, model_spec.lora)

    objective = getattr(stage, "objective", None) if teacher is not None else None
    layer_map, projections = None, None
    if objective is not None and objective.hidden is not None:
        layer_map = losses.resolve_layer_map(
            objective.hidden.layer_map, num_layers(student), num_layers(teacher)
        )
        projections = losses.HiddenProjections(
            layer_map, hidden_width(student), hidden_width(teacher), objective.hidden.projection
        )
    module = DistillModule(student, objective, len(ctx.tokenizer), layer_map, projections)
    sdir = stage_dir(ctx, stage.name)
    wandb_spec = ctx.recipe.tracking.wandb
    tracker = Tracker(
        sdir / "metrics.jsonl" if acc.is_main_process else None,
        wandb_spec,
        run_name=f"{ctx.recipe.name}/{stage.name}",
        config={"recipe": ctx.recipe.name, "stage": stage.model_dump(mode="json")},
        group=ctx.recipe.name,
        run_id=_previous_run_id(sdir),
    )
    job = TrainJob(
        accelerator=acc,
        module=module,
        teacher=teacher,
        train_blocks=ctx.data.train,
        eval_blocks=ctx.data.eval,
        spec=spec,
        seed=seed,
        stage_dir=sdir,
        tracker=tracker,
        fingerprint=fingerprint,
        hooks=hooks,
        eval_batch_size=_eval_spec(ctx, stage).batch_size,
        log=ctx.log,
        force_resume=ctx.force_resume,
    )
    try:
        result = train(job)
    finally:
        tracker.close()
    trained = acc.unwrap_model(module).student
    out = model_dir(ctx, stage.name)
    autocast = autocast_for(spec, acc.device)
    if quant is not None:
        from distill import quantize

        # metric of the stage: with fake quantization on (what the converted model will compute)
        quantize.set_fake_quant_enabled(trained, True)
        metrics = _heldout(ctx, trained, stage, autocast)
        quantize.remove_fake_quant(trained)
        extra["scheme"] = _scheme(quant).name()
    else:
        metrics = result.eval
    export = (
        unwrap_lora(trained, merge=model_spec.lora.merge_on_save)
        if (model_spec is not None and model_spec.lora is not None)
        else trained
    )
    quant_json = {QUANT_FILE: json.dumps(quant.model_dump(mode="json"))} if quant else None
    _export(ctx, export, out, quant_json)
    acc.wait_for_everyone()
    if teacher is not None and stage.kind == "distill":
        from distill.evaluate import teacher_agreement

        extra["teacher"] = teacher_ref_name
        extra["teacher_agreement"] = teacher_agreement(
            export, teacher, ctx.data.eval, 16, len(ctx.tokenizer)
        )
    if extra.get("keep_sparsity"):
        extra["sparsity"] = sparsity_of(export)
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


def _teacher_dtype(spec) -> str:
    return "bfloat16" if spec.precision == "bf16" else "float32"


def _keeps_sparsity(ctx: RunContext, stage) -> bool:
    if stage.keep_sparsity != "auto":
        return bool(stage.keep_sparsity)
    for entry in ctx.entries:
        if entry["name"] == stage.model:
            return entry["kind"] == "prune" and entry.get("method") in ("magnitude", "wanda", "nm")
    return False


def _previous_run_id(sdir: Path) -> str | None:
    """The W&B run id of an interrupted attempt of this stage, so the resumed run continues it."""
    from distill import checkpoint as ckpt

    latest = ckpt.find_latest_valid(sdir / "checkpoints")
    return ckpt.read_state(latest).get("tracker_run_id") if latest else None


# ----------------------------------------------------------------------------------------------
# Prune


def run_prune_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    from distill.prune import prune_model

    p = stage.prune
    model = load_ref(ctx, stage.model, "model to prune")
    check_model_against_tokenizer(ctx, stage.model, model, f"model {stage.model!r}")
    before = _heldout(ctx, model, stage)
    gen = torch.Generator().manual_seed(ctx.recipe.seed)
    batch = 8
    picks = torch.randperm(len(ctx.data.train), generator=gen)[: p.calibration_batches * batch]
    calibration = list(ctx.data.train[picks].split(batch))
    result = prune_model(
        model,
        p.method,
        sparsity=p.sparsity,
        n=p.n,
        m=p.m,
        scoring=p.scoring,
        scope=p.scope,
        calibration=calibration,
        width_heads_fraction=p.heads_fraction,
        width_mlp_fraction=p.mlp_fraction,
        depth_layers=p.layers,
    )
    metrics = _heldout(ctx, model, stage)
    out = model_dir(ctx, stage.name)
    _export(ctx, model, out)
    ctx.accelerator.wait_for_everyone()
    ctx.log(
        f"pruned {stage.model!r} with {p.method}: sparsity {result.sparsity:.3f}, perplexity "
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
        details=_jsonable(result.details),
        latency_s=_latency(ctx, model, stage),
    )


def _jsonable(details: dict) -> dict:
    return json.loads(
        json.dumps(details, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


# ----------------------------------------------------------------------------------------------
# Quantization: ptq, convert


def _scheme(quant: QuantSpec):
    from distill.quantize import QuantScheme

    return QuantScheme(
        bits=quant.bits,
        group_size=quant.group_size,
        symmetric=quant.symmetric,
        activations=quant.activations,
        exclude=tuple(quant.exclude),
    )


def _stage_quant(ctx: RunContext, ref: str) -> QuantSpec | None:
    for entry in ctx.entries:
        if entry["name"] == ref:
            path = Path(entry["model_dir"]) / QUANT_FILE
            if path.is_file():
                return QuantSpec.model_validate_json(path.read_text())
    return None


def run_ptq_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    from distill import quantize

    model = load_ref(ctx, stage.model, "model to quantize")
    scheme = _scheme(stage.quant)
    quantize.prepare_qat(model, scheme)
    quantize.set_fake_quant_enabled(model, True)
    metrics = _heldout(ctx, model, stage)
    quantize.remove_fake_quant(model)
    out = model_dir(ctx, stage.name)
    _export(ctx, model, out, {QUANT_FILE: json.dumps(stage.quant.model_dump(mode="json"))})
    ctx.accelerator.wait_for_everyone()
    return _entry(ctx, stage, model, out, metrics, scheme=scheme.name(), steps=0)


def run_convert_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    from distill import quantize

    quant = stage.quant or _stage_quant(ctx, stage.model)
    if quant is None:
        from distill.config import RecipeError

        raise RecipeError(
            f"stage {stage.name!r}: `convert` needs a scheme: set `quant` on the stage, or convert "
            "the output of a `qat` or `ptq` stage"
        )
    scheme = _scheme(quant)
    model = load_ref(ctx, stage.model, "model to convert")
    quantize.convert_model(model, scheme)
    out = model_dir(ctx, stage.name)
    if ctx.is_main:
        import shutil

        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        quantize.save_quantized(model, ctx.tokenizer, tmp, scheme)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    ctx.accelerator.wait_for_everyone()
    loaded = quantize.load_quantized(out)
    metrics = _heldout(ctx, loaded, stage)
    return {
        "model_dir": str(out),
        "params": count_params(loaded),
        "size_bytes": quantize.quantized_size_bytes(out),
        "eval": {"perplexity": metrics["perplexity"], "loss": metrics["loss"]},
        "scheme": scheme.name(),
        "steps": 0,
        **({"latency_s": lat} if (lat := _latency(ctx, loaded, stage)) is not None else {}),
    }


RUNNERS = {
    "train": run_training_stage,
    "distill": run_training_stage,
    "qat": run_training_stage,
    "prune": run_prune_stage,
    "ptq": run_ptq_stage,
    "convert": run_convert_stage,
}
