"""One function per stage kind. Each loads the model it starts from, does its work (train, prune,
quantize), writes `<stage>/model/` and returns its summary entry. Training kinds all go through the
one loop in trainer.py."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from distill.compress.fake_quant import remove_fake_quant, set_fake_quant_enabled
from distill.compress.prune import apply_masks, masks_from_zeros, sparsity_of
from distill.config import QuantSpec, TeacherRef
from distill.errors import RecipeError
from distill.models import (
    add_lora,
    causal_lm_of,
    freeze,
    hidden_width,
    load_pretrained,
    unwrap_lora,
)
from distill.objective.hidden import HiddenProjections
from distill.objective.module import DistillModule
from distill.run.context import (
    RunContext,
    check_model_against_tokenizer,
    load_ref,
    model_dir,
    ref_config,
    ref_spec,
    stage_dir,
)
from distill.run.prune_stage import _keeps_sparsity, _recovery_extra, hidden_layer_map
from distill.run.quant_stages import QUANT_FILE, _prepare_fake_quant, _qat_extra, _scheme
from distill.run.stage_output import _capped, _entry, _eval_spec, _export, _heldout, _latency
from distill.runtime import distributed
from distill.runtime.checkpoint import find_latest_valid, read_state
from distill.runtime.distributed import make_accelerator
from distill.runtime.evaluate import teacher_agreement
from distill.runtime.loop import TrainHooks, TrainJob, train
from distill.tracking import Tracker

# ----------------------------------------------------------------------------------------------
# Training kinds: train, distill (also pruning recovery), qat


def run_training_stage(ctx: RunContext, stage, fingerprint: str) -> dict:

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
        masks = masks_from_zeros(student)
        hooks.after_optimizer_step = lambda m: apply_masks(m.student, masks)
        extra["keep_sparsity"] = True
    quant: QuantSpec | None = None
    if stage.kind == "qat":
        if model_spec is not None and model_spec.lora is not None:
            raise RecipeError(
                f"stage {stage.name!r}: `qat` trains all weights of the fake-quantized student; "
                f"remove `lora` from models.{stage.model} (LoRA deltas would not be quantized)"
            )
        quant = stage.quant
        _prepare_fake_quant(stage, student, _scheme(quant))
        start = stage.fake_quant_after
        set_fake_quant_enabled(student, start == 0)
        if start:
            hooks.before_step = lambda step, m: set_fake_quant_enabled(m.student, step >= start)
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
            projections = HiddenProjections(
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
        # The stage's metric: fake quantization on (what the converted model computes), in fp32
        # like the ptq and convert stages, so the rounding is the only difference they measure.
        set_fake_quant_enabled(trained, True)
        metrics = _heldout(ctx, trained, stage)
        remove_fake_quant(trained)
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


# ----------------------------------------------------------------------------------------------
# Prune


# prune_model's argument names -> the keys of a prune stage's `prune` section


# ----------------------------------------------------------------------------------------------
# Quantization: ptq, convert
