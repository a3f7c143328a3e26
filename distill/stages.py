"""One function per stage kind. Each loads the model it starts from, does its work (train, prune,
quantize), writes `<stage>/model/` and returns its summary entry. Training kinds all go through the
one loop in trainer.py."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from distill import distributed
from distill.config import QuantSpec, RecipeError, TeacherRef
from distill.models import count_params, dir_size_bytes, freeze, load_pretrained
from distill.pipeline import (
    RunContext,
    check_model_against_tokenizer,
    load_ref,
    model_dir,
    ref_config,
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
        "from": stage.model,
        "params": count_params(model),
        "size_bytes": dir_size_bytes(out),
        "eval": {"perplexity": metrics["perplexity"], "loss": metrics["loss"]},
        # a float stage's scheme is the dtype of its stored weights ("fp32", "bf16")
        "scheme": extra.pop("scheme", None) or _float_scheme(model),
        **{k: v for k, v in extra.items() if v is not None},
    }


def _float_scheme(model) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )


# ----------------------------------------------------------------------------------------------
# Training kinds: train, distill (also pruning recovery), qat


def run_training_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    from distill import losses
    from distill.models import add_lora, hidden_width, unwrap_lora
    from distill.pipeline import make_accelerator
    from distill.tracking import Tracker
    from distill.trainer import DistillModule, TrainHooks, TrainJob, train

    spec = _capped(ctx, stage.train)
    acc = make_accelerator(spec.grad_accum)
    ctx.accelerator = acc
    # Under DeepSpeed: batch sizes, accumulation, clipping and precision come from the recipe
    # (the launch was checked against every stage up front), see distributed.py.
    zero3 = distributed.is_zero3(acc)
    if distributed.deepspeed_plugin(acc) is not None:
        distributed.configure_deepspeed(acc, spec, ref_config(ctx, stage.model).hidden_size)
    seed = spec.seed if spec.seed is not None else ctx.recipe.seed
    with _whole_if_fresh(ctx, stage.model):
        student = load_ref(ctx, stage.model, "student")
    check_model_against_tokenizer(ctx, stage.model, student, f"model {stage.model!r}")
    model_spec = ref_spec(ctx, stage.model)
    teacher = teacher_in_loop = None
    teacher_ref = getattr(stage, "teacher", None)
    if stage.kind == "qat" and teacher_ref is None:
        teacher_ref_name = stage.model
    else:
        teacher_ref_name = teacher_ref.model if teacher_ref is not None else None
    if teacher_ref_name is not None:
        placement, teacher_ds = _teacher_placement(ctx, acc, spec, teacher_ref, teacher_ref_name)
        with (
            distributed.building_teacher(placement, teacher_ds),
            _whole_if_fresh(ctx, teacher_ref_name),
        ):
            teacher = load_ref(ctx, teacher_ref_name, "teacher", dtype=_teacher_dtype(spec))
        check_model_against_tokenizer(
            ctx, teacher_ref_name, teacher, f"teacher {teacher_ref_name!r}"
        )
        freeze(teacher)
        teacher_in_loop = teacher
        if placement == "zero3":
            teacher_in_loop = distributed.partition_teacher(teacher, teacher_ds)
        if acc.num_processes > 1 or placement == "zero3":
            ctx.log(f"teacher {teacher_ref_name!r}: placement {placement}")

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

        if model_spec is not None and model_spec.lora is not None:
            raise RecipeError(
                f"stage {stage.name!r}: `qat` trains all weights of the fake-quantized student; "
                f"remove `lora` from models.{stage.model} (LoRA deltas would not be quantized)"
            )
        quant = stage.quant
        _prepare_fake_quant(stage, student, _scheme(quant))
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
        try:
            layer_map = hidden_layer_map(ctx, stage, student, teacher)
            projections = losses.HiddenProjections(
                layer_map, hidden_width(student), hidden_width(teacher), objective.hidden.projection
            )
        except ValueError as err:
            raise RecipeError(f"stage {stage.name!r} objective.hidden: {err}") from err
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
        teacher=teacher_in_loop,
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
    if zero3:
        # the student is partitioned over the ranks: a plain copy on the main process is exported
        # (None elsewhere), and every rank reloads the export for the measurements below
        trained = _gathered_student(acc, trained, model_spec)
    out = model_dir(ctx, stage.name)
    if quant is not None:
        from distill import quantize

        # The stage's metric: fake quantization on (what the converted model computes), in fp32
        # like the ptq and convert stages, so the rounding is the only difference they measure.
        quantize.set_fake_quant_enabled(trained, True)
        metrics = _heldout(ctx, trained, stage)
        quantize.remove_fake_quant(trained)
        extra.update(_qat_extra(ctx, stage, _scheme(quant).name(), metrics["perplexity"]))
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
    if zero3:
        acc.free_memory()  # the student's engine and optimizer state
        with distributed.hf_zero3_disabled():
            export = load_pretrained(str(out), what=f"stage {stage.name!r} export")
        export.to(acc.device)
    if teacher is not None and stage.kind == "distill":
        from distill.evaluate import teacher_agreement

        extra["teacher"] = teacher_ref_name
        extra["teacher_agreement"] = teacher_agreement(
            export, teacher, ctx.data.eval, 16, len(ctx.tokenizer)
        )
    if stage.kind == "distill":
        extra.update(_recovery_extra(ctx, stage, metrics["perplexity"]))
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


def _teacher_placement(ctx: RunContext, acc, spec, ref: TeacherRef | None, name: str):
    """`replicate` or `zero3` for this launch, and the teacher's inference ZeRO-3 config."""
    ref = ref or TeacherRef(model=name)
    bytes_per_param = 2 if spec.precision == "bf16" else 4
    placement = distributed.teacher_placement(
        acc,
        ref.placement,
        ref.max_memory_fraction,
        lambda: distributed.param_count_of_config(ref_config(ctx, name)) * bytes_per_param,
    )
    if placement != "zero3":
        return placement, None
    hidden = ref_config(ctx, name).hidden_size
    return placement, distributed.teacher_deepspeed_config(acc, spec, hidden)


def _whole_if_fresh(ctx: RunContext, ref: str):
    """Under ZeRO-3, weights read from a checkpoint go straight into partitions (zero.Init), but a
    model initialised from a `config` is built whole and partitioned by DeepSpeed afterwards:
    zero.Init draws the random weights in another order, and every launch must start from the
    same weights as a single process."""
    spec = ref_spec(ctx, ref)
    fresh = spec is not None and spec.config is not None
    return distributed.hf_zero3_disabled() if fresh else nullcontext()


def _gathered_student(acc, trained, model_spec):
    """A plain copy of a ZeRO-3-partitioned student on the main process (None elsewhere)."""
    from transformers import AutoModelForCausalLM

    from distill.models import add_lora
    from distill.trainer import causal_lm_of

    state = distributed.gathered_state_dict(acc, trained)
    if state is None:
        return None
    with distributed.hf_zero3_disabled():
        plain = AutoModelForCausalLM.from_config(causal_lm_of(trained).config, dtype=torch.float32)
    if model_spec is not None and model_spec.lora is not None:
        plain = add_lora(plain, model_spec.lora)
    plain.load_state_dict(state)
    return plain


def _keeps_sparsity(ctx: RunContext, stage) -> bool:
    if stage.keep_sparsity != "auto":
        return bool(stage.keep_sparsity)
    for entry in ctx.entries:
        if entry["name"] == stage.model:
            return entry["kind"] == "prune" and entry.get("method") in ("magnitude", "wanda", "nm")
    # a model of `models` saved by `distill prune` carries its prune record
    record = _prune_record(ctx, stage.model)
    return record is not None and record.get("method") in ("magnitude", "wanda", "nm")


def _previous_run_id(sdir: Path) -> str | None:
    """The W&B run id of an interrupted attempt of this stage, so the resumed run continues it."""
    from distill import checkpoint as ckpt

    latest = ckpt.find_latest_valid(sdir / "checkpoints")
    return ckpt.read_state(latest).get("tracker_run_id") if latest else None


# ----------------------------------------------------------------------------------------------
# Prune


def run_prune_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    """Prune the model, measure it before and after, save it with its prune record."""
    from distill.prune import RECORD_FILE, prune_model

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


# prune_model's argument names -> the keys of a prune stage's `prune` section
_PRUNE_KEYS = {
    "width_heads_fraction": "heads_fraction",
    "width_mlp_fraction": "mlp_fraction",
    "width_head_unit": "head_unit",
    "depth_layers": "layers",
}


def _calibration_batches(ctx: RunContext, num_batches: int) -> list[torch.Tensor]:
    """`num_batches` batches of training blocks, drawn with the recipe's seed (same every run)."""
    from distill.prune import CALIBRATION_BATCH_SIZE

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
    from distill.config import TrainSpec
    from distill.trainer import autocast_for

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
    from distill.evaluate import recovered_fraction

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
    from distill import losses
    from distill.models import num_layers

    spec = stage.objective.hidden.layer_map
    student_layers, teacher_layers = num_layers(student), num_layers(teacher)
    if spec == "uniform":
        kept = _layers_kept_by_depth_prune(ctx, stage.model, teacher_layers)
        if kept is not None and len(kept) == student_layers:
            pairs = list(enumerate(kept))
            ctx.log(f"hidden-state layer map follows the depth prune of {stage.model!r}: {pairs}")
            return losses.resolve_layer_map(pairs, student_layers, teacher_layers)
    return losses.resolve_layer_map(spec, student_layers, teacher_layers)


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
    from distill.config import looks_local
    from distill.prune import RECORD_FILE

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
        scale_dtype=quant.scale_dtype,
    )


def _prepare_fake_quant(stage, model, scheme) -> None:
    """prepare_qat, with a scheme that does not fit the model reported as a recipe error."""
    from distill import quantize

    try:
        quantize.prepare_qat(model, scheme)
    except ValueError as err:
        raise RecipeError(f"stage {stage.name!r} (quant): {err}") from None


def _qat_extra(ctx: RunContext, stage, scheme_name: str, perplexity: float) -> dict:
    """Scheme, start of fake quantization, and what QAT won back over the `ptq` stage of the same
    scheme and starting model, when the recipe has one."""
    from distill.evaluate import recovered_fraction

    extra = {"scheme": scheme_name, "fake_quant_after": stage.fake_quant_after}
    for entry in reversed(ctx.entries):
        if (
            entry["kind"] == "ptq"
            and entry.get("scheme") == scheme_name
            and entry.get("from") == stage.model
        ):
            extra["compare_to"] = entry["name"]
            extra["recovered_fraction"] = recovered_fraction(
                entry["perplexity_before"], entry["eval"]["perplexity"], perplexity
            )
            break
    return extra


def _stage_quant(ctx: RunContext, ref: str) -> QuantSpec | None:
    for entry in ctx.entries:
        if entry["name"] == ref:
            path = Path(entry["model_dir"]) / QUANT_FILE
            if path.is_file():
                return QuantSpec.model_validate_json(path.read_text())
    return None


def run_ptq_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    """Fake-quantize the model and evaluate it (fp32, no training): the baseline QAT must beat.
    Writes the float weights and the scheme, which a `convert` stage can turn into packed ones."""
    from distill import quantize

    model = load_ref(ctx, stage.model, "model to quantize")
    check_model_against_tokenizer(ctx, stage.model, model, f"model {stage.model!r}")
    scheme = _scheme(stage.quant)
    before = _heldout(ctx, model, stage)  # full precision, measured the same way
    _prepare_fake_quant(stage, model, scheme)
    quantize.set_fake_quant_enabled(model, True)
    metrics = _heldout(ctx, model, stage)
    quantize.remove_fake_quant(model)
    out = model_dir(ctx, stage.name)
    _export(ctx, model, out, {QUANT_FILE: json.dumps(stage.quant.model_dump(mode="json"))})
    ctx.accelerator.wait_for_everyone()
    increase = (metrics["perplexity"] / before["perplexity"] - 1) * 100
    ctx.log(
        f"{scheme.name()} without training: perplexity {before['perplexity']:.2f} -> "
        f"{metrics['perplexity']:.2f} ({increase:+.2f} %)"
    )
    return _entry(
        ctx,
        stage,
        model,
        out,
        metrics,
        scheme=scheme.name(),
        perplexity_before=before["perplexity"],
        steps=0,
    )


def run_convert_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    from distill import quantize

    quant = stage.quant or _stage_quant(ctx, stage.model)
    if quant is None:
        raise RecipeError(
            f"stage {stage.name!r}: `convert` needs a scheme: set `quant` on the stage, or convert "
            "the output of a `qat` or `ptq` stage"
        )
    scheme = _scheme(quant)
    model = load_ref(ctx, stage.model, "model to convert")
    params = count_params(model)  # weights, whatever their bits (the packed codes are buffers)
    float_latency_s = _latency(ctx, model, stage)  # the same generation, before conversion
    try:
        quantize.convert_model(model, scheme)
    except ValueError as err:
        raise RecipeError(f"stage {stage.name!r} (quant): {err}") from None
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
    # Measured on the model as a user gets it: reloaded from disk, CPU kernels where they exist.
    loaded = quantize.load_quantized(out)
    metrics = _heldout(ctx, loaded, stage)
    # CPU latency as deployed: bf16 activations, the int4/int8 kernels' fast path (float32 ones
    # take a slow generic path), against the float model as it was trained.
    latency_s = None
    if float_latency_s is not None:
        latency_s = _latency(ctx, quantize.load_quantized(out, dtype=torch.bfloat16), stage)
    entry = {
        "model_dir": str(out),
        "from": stage.model,
        "params": params,
        "size_bytes": quantize.quantized_size_bytes(out),
        "eval": {"perplexity": metrics["perplexity"], "loss": metrics["loss"]},
        "scheme": scheme.name(),
        "compare_to": stage.model,
        "steps": 0,
        "latency_s": latency_s,
        "latency_dtype": "bfloat16" if latency_s is not None else None,
        "float_latency_s": float_latency_s,
    }
    return {k: v for k, v in entry.items() if v is not None}


RUNNERS = {
    "train": run_training_stage,
    "distill": run_training_stage,
    "qat": run_training_stage,
    "prune": run_prune_stage,
    "ptq": run_ptq_stage,
    "convert": run_convert_stage,
}
