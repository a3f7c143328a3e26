"""One function builds what a training stage trains with: the student (with fake quantization,
gradient checkpointing, LoRA), the frozen teacher and where it lives, the objective module (with the
hidden-state layer map and projections), and the hooks (sparsity masks, the start of fake
quantization). `distill run` trains what it returns; `distill bench` times one step of it, so the
benchmark measures exactly the stage's step."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from distill.compress.fake_quant import set_fake_quant_enabled
from distill.compress.prune import apply_masks, masks_from_zeros
from distill.config import ModelSpec, TeacherRef, TrainSpec
from distill.errors import RecipeError
from distill.models import add_lora, freeze, hidden_width, num_layers
from distill.objective.hidden import HiddenProjections
from distill.objective.losses import check_logit_terms
from distill.objective.module import DistillModule
from distill.run.cache_source import open_stage_cache
from distill.run.context import (
    RunContext,
    check_model_against_tokenizer,
    load_ref,
    ref_config,
    ref_spec,
)
from distill.run.on_policy_stage import build_on_policy
from distill.run.prune_stage import hidden_layer_map, keeps_sparsity
from distill.run.quant_stages import _prepare_fake_quant
from distill.runtime import distributed
from distill.runtime.loop import TrainHooks
from distill.runtime.on_policy import OnPolicy
from distill.specs import ObjectiveSpec, QuantSpec
from distill.teacher_cache.store import CachedTeacher


@dataclass
class TrainingRun:
    """A training stage, assembled."""

    module: DistillModule
    """Student + hidden-loss projections + objective: what the optimizer trains."""
    teacher: nn.Module | CachedTeacher | None
    """The frozen teacher as the loop calls it (an inference ZeRO-3 trunk when partitioned), or
    the offline teacher cache it reads."""
    teacher_model: nn.Module | None
    """The frozen teacher as a plain causal LM (for teacher agreement), or None."""
    teacher_name: str | None
    placement: str | None
    hooks: TrainHooks
    model_spec: ModelSpec | None
    """The student's `models` entry when it starts from one (LoRA, gradient checkpointing)."""
    quant: QuantSpec | None
    """The fake-quantization scheme of a `qat` stage."""
    keeps_sparsity: bool
    on_policy: OnPolicy | None = None
    """The stage's on-policy steps (objective.on_policy), or None."""


def assemble_training_run(
    ctx: RunContext,
    stage,
    spec: TrainSpec,
    acc=None,
    objective_path: str | None = None,
    device: torch.device | None = None,
    cache: CachedTeacher | None = None,
    prompts=None,
) -> TrainingRun:
    """Build a training stage. `acc` is the stage's Accelerator (None: one process, no DeepSpeed);
    `objective_path` replaces the objective's loss path (the benchmark compares them); `device`
    builds the models directly there (the benchmark; a run leaves placement to the loop);
    `cache` replaces the teacher cache the stage names (the benchmark's, written in memory);
    `prompts` replaces the run's on-policy prompts (the benchmark's blocks)."""
    where = torch.device(device) if device is not None else nullcontext()
    with where, _whole_if_fresh(ctx, stage.model):
        student = load_ref(ctx, stage.model, "student")
    check_model_against_tokenizer(ctx, stage.model, student, f"model {stage.model!r}")
    model_spec = ref_spec(ctx, stage.model)
    teacher_name = stage.teacher_model
    teacher = teacher_in_loop = placement = None
    if teacher_name is not None:
        with where:
            ref = getattr(stage, "teacher", None)
            teacher, teacher_in_loop, placement = frozen_teacher(ctx, ref, spec, acc, teacher_name)
    elif stage.teacher_cache is not None:
        world = acc.num_processes if acc is not None else 1
        teacher_in_loop = cache or open_stage_cache(ctx, stage, spec, world)
        teacher_name, placement = stage.teacher_cache, "cache"
    hooks = TrainHooks()
    sparse = stage.kind == "distill" and keeps_sparsity(ctx.recipe, stage)
    if sparse:
        masks = masks_from_zeros(student)
        hooks.after_optimizer_step = lambda m: apply_masks(m.student, masks)
    quant = stage.quant if stage.kind == "qat" else None
    if quant is not None:
        _fake_quantize(stage, student, model_spec, hooks)
    if model_spec is not None and model_spec.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if model_spec is not None and model_spec.lora is not None:
        student = add_lora(student, model_spec.lora)
    module = _objective_module(ctx, stage, student, teacher or teacher_in_loop, objective_path)
    if device is not None:
        module.to(device)
    run = TrainingRun(
        module, teacher_in_loop, teacher, teacher_name, placement, hooks, model_spec, quant, sparse
    )
    run.on_policy = build_on_policy(ctx, stage, module, teacher or teacher_in_loop, prompts)
    return run


def frozen_teacher(ctx: RunContext, ref: TeacherRef | None, spec: TrainSpec, acc, name: str):
    """(the plain frozen teacher `name`, the teacher the loop calls, its placement): placed as
    `ref` says (a distill stage's `teacher`), in the precision of `spec`."""
    placement, teacher_ds = _teacher_placement(ctx, acc, spec, ref, name)
    with distributed.building_teacher(placement, teacher_ds), _whole_if_fresh(ctx, name):
        teacher = load_ref(ctx, name, "teacher", dtype=_teacher_dtype(spec))
    check_model_against_tokenizer(ctx, name, teacher, f"teacher {name!r}")
    freeze(teacher)
    in_loop = teacher
    if placement == "zero3":
        in_loop = distributed.partition_teacher(teacher, teacher_ds)
    if acc is not None and (acc.num_processes > 1 or placement == "zero3"):
        ctx.log(f"teacher {name!r}: placement {placement}")
    return teacher, in_loop, placement


def _teacher_dtype(spec: TrainSpec) -> str:
    return "bfloat16" if spec.precision == "bf16" else "float32"


def _teacher_placement(ctx: RunContext, acc, spec: TrainSpec, ref: TeacherRef | None, name: str):
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


def _fake_quantize(stage, student: nn.Module, model_spec: ModelSpec | None, hooks: TrainHooks):
    """Fake quantization of a `qat` student, from step `fake_quant_after` on."""
    if model_spec is not None and model_spec.lora is not None:
        raise RecipeError(
            f"stage {stage.name!r}: `qat` trains all weights of the fake-quantized student; "
            f"remove `lora` from models.{stage.model} (LoRA deltas would not be quantized)"
        )
    _prepare_fake_quant(stage, student, stage.quant)
    start = stage.fake_quant_after
    set_fake_quant_enabled(student, start == 0)
    if start:
        hooks.before_step = lambda step, m: set_fake_quant_enabled(m.student, step >= start)


def _objective_module(ctx: RunContext, stage, student, teacher, path: str | None) -> DistillModule:
    """The objective around the student: CE only without a teacher, else the stage's objective
    with its hidden-state layer map and projections (`teacher`: a model or a cache)."""
    objective = getattr(stage, "objective", None) if teacher is not None else None
    if isinstance(teacher, CachedTeacher) and objective is not None:
        _check_cache_objective(stage, objective, teacher)
    if path is not None and objective is not None:
        objective = objective.model_copy(update={"path": path})
    elif path == "naive":  # CE only: the same module, with its naive loss path
        objective = ObjectiveSpec(ce_weight=1.0, terms=[], path="naive")
    layer_map, projections = None, None
    if objective is not None and teacher is not None and objective.hidden is not None:
        try:
            layers, width = _teacher_layers_and_width(teacher)
            layer_map = hidden_layer_map(ctx, stage, student, layers)
            projections = HiddenProjections(
                layer_map, hidden_width(student), width, objective.hidden.projection
            )
        except ValueError as err:
            raise RecipeError(f"stage {stage.name!r} objective.hidden: {err}") from err
        _check_cached_layers(stage, layer_map, teacher)
    return DistillModule(student, objective, len(ctx.tokenizer), layer_map, projections)


def _teacher_layers_and_width(teacher) -> tuple[int, int]:
    if isinstance(teacher, CachedTeacher):
        return teacher.manifest["teacher_layers"], teacher.manifest["hidden_size"]
    return num_layers(teacher), hidden_width(teacher)


def _check_cache_objective(stage, objective: ObjectiveSpec, cache: CachedTeacher) -> None:
    """Terms a top-k cache cannot give (logit_mse needs full logits), named before training."""
    try:
        check_logit_terms(objective.terms, objective.ce_weight, "topk")
    except ValueError as err:
        raise RecipeError(
            f"stage {stage.name!r} reads the teacher cache {cache.root}: {err}"
        ) from None
    if objective.hidden is not None and not cache.hidden_layers:
        raise RecipeError(
            f"stage {stage.name!r}: objective.hidden needs teacher hidden states, but the teacher "
            f"cache {cache.root} holds none; list the layers in the cache stage's "
            "`cache.hidden_layers`, or remove objective.hidden"
        )


def _check_cached_layers(stage, layer_map, teacher) -> None:
    if not isinstance(teacher, CachedTeacher):
        return
    missing = sorted({t for _, t in layer_map} - set(teacher.hidden_layers))
    if missing:
        raise RecipeError(
            f"stage {stage.name!r}: its hidden-state layer map {layer_map} needs teacher layers "
            f"{missing}, but the teacher cache {teacher.root} holds layers "
            f"{teacher.hidden_layers}; set the cache stage's `cache.hidden_layers` to include "
            "them, or give `objective.hidden.layer_map` pairs with cached layers"
        )
