"""One training stage's step, built for measuring."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from distill.bench.flops import ModelShape, matmul_params, model_shape
from distill.bench.memory import PeakMemory
from distill.compress.fake_quant import prepare_qat, set_fake_quant_enabled
from distill.config import TRAINING_KINDS, ObjectiveSpec, Recipe
from distill.errors import RecipeError
from distill.models import (
    add_lora,
    backbone_of,
    causal_lm_of,
    check_head_covers_tokenizer,
    freeze,
    hidden_width,
    num_layers,
)
from distill.objective.hidden import HiddenProjections, resolve_layer_map
from distill.objective.module import DistillModule, teacher_forward
from distill.run.context import RunContext, load_ref
from distill.run.quant_stages import _scheme
from distill.run.train_stage import _teacher_dtype
from distill.runtime.loop import autocast_for, param_groups


class _VocabOnly:
    """Stands in for the tokenizer where models are built: only its length is read."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __len__(self) -> int:
        if self.size is None:
            raise RecipeError(
                "distill bench builds models without a tokenizer: give `vocab_size` in each "
                "model's `config`, or use `tokenizer.source: train` with `tokenizer.train.vocab_size`"
            )
        return self.size


def pick_stage(recipe: Recipe, name: str | None):
    """The named training stage, or the first distill stage, or the first training stage."""
    trainable = [s for s in recipe.stages if s.kind in TRAINING_KINDS]
    if name is not None:
        for stage in recipe.stages:
            if stage.name == name:
                if stage.kind not in TRAINING_KINDS:
                    raise RecipeError(
                        f"--stage {name!r} is a {stage.kind} stage; distill bench measures a "
                        f"training step: use one of {', '.join(s.name for s in trainable)}"
                    )
                return stage
        raise RecipeError(
            f"--stage {name!r} is not a stage of the recipe; training stages: "
            f"{', '.join(s.name for s in trainable) or 'none'}"
        )
    for stage in trainable:
        if stage.kind == "distill":
            return stage
    if not trainable:
        raise RecipeError("the recipe has no training stage (train, distill or qat) to measure")
    return trainable[0]


def model_key(recipe: Recipe, stage, ref: str, notes: list[str]) -> str:
    """The `models` key a stage's reference leads to, following earlier stages' `model`.

    The bench builds that model fresh: an earlier training stage keeps the architecture, a width or
    depth prune stage does not (noted).
    """
    index = recipe.stages.index(stage)
    while True:
        earlier = [s for s in recipe.stages[:index] if s.name == ref]
        if not earlier:
            return ref
        upstream = earlier[-1]
        if upstream.kind == "prune" and upstream.prune.method in ("width", "depth"):
            notes.append(
                f"stage {upstream.name!r} prunes {upstream.prune.method}: the bench measures the "
                "unpruned architecture"
            )
        index = recipe.stages.index(upstream)
        ref = upstream.model


@dataclass
class TrainStep:
    """Everything one training step of a stage touches."""

    module: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    batches: list[torch.Tensor]
    spec: object
    autocast: object
    want_states: bool
    vocab_size: int


def build_train_step(
    recipe: Recipe, stage, path: str, device: torch.device, notes: list[str]
) -> TrainStep:
    """The stage's models, DistillModule and AdamW, built as `distill run` builds them."""

    spec = stage.train
    vocab = _VocabOnly(
        recipe.tokenizer.train.vocab_size if recipe.tokenizer.source == "train" else None
    )
    ctx = RunContext(recipe, recipe.resolved_output_dir, tokenizer=vocab)
    student_key = model_key(recipe, stage, stage.model, notes)
    # Built on the device itself: random init of a large model is fast there, and on "meta" it
    # costs nothing (the FLOP model only needs the shapes).
    with torch.device(device):
        student = load_ref(ctx, student_key, "student")
    teacher_ref = getattr(stage, "teacher", None)
    teacher_name = teacher_ref.model if teacher_ref is not None else None
    if stage.kind == "qat" and teacher_name is None:
        teacher_name = stage.model
    teacher = None
    if teacher_name is not None:
        teacher_key = model_key(recipe, stage, teacher_name, notes)
        with torch.device(device):
            teacher = load_ref(ctx, teacher_key, "teacher", dtype=_teacher_dtype(spec))
        freeze(teacher)
    rows = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher) if m is not None]
    if vocab.size is None:
        vocab.size = min(rows)
    for model, what in ((student, "student"), (teacher, "teacher")):
        if model is not None:
            check_head_covers_tokenizer(model, vocab, what)

    # As stages.run_training_stage: fake quantization, gradient checkpointing, LoRA, projections.
    if stage.kind == "qat":
        prepare_qat(student, _scheme(stage.quant))
        set_fake_quant_enabled(student, True)
    model_spec = recipe.models[student_key]
    if model_spec.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if model_spec.lora is not None:
        student = add_lora(student, model_spec.lora)
    objective = getattr(stage, "objective", None) if teacher is not None else None
    if objective is not None:
        objective = objective.model_copy(update={"path": path})
    elif path == "naive":  # CE only: the same module, with its naive loss path
        objective = ObjectiveSpec(ce_weight=1.0, terms=[], path="naive")
    layer_map, projections = None, None
    if objective is not None and teacher is not None and objective.hidden is not None:
        layer_map = resolve_layer_map(
            objective.hidden.layer_map, num_layers(student), num_layers(teacher)
        )
        projections = HiddenProjections(
            layer_map, hidden_width(student), hidden_width(teacher), objective.hidden.projection
        )
    module = DistillModule(student, objective, len(vocab), layer_map, projections).to(device)
    module.train()
    if teacher is not None:
        teacher.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(module, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas)
    )
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    seq_len = recipe.data.seq_len
    batches = [
        torch.randint(0, len(vocab), (spec.batch_size, seq_len), generator=gen, device="cpu").to(
            device
        )
        for _ in range(spec.grad_accum)
    ]
    want_states = bool(teacher is not None and objective is not None and objective.hidden)
    return TrainStep(
        module=module,
        teacher=teacher,
        optimizer=optimizer,
        batches=batches,
        spec=spec,
        autocast=autocast_for(spec, device) if device.type != "meta" else nullcontext(),
        want_states=want_states,
        vocab_size=len(vocab),
    )


@dataclass
class StepShapes:
    student: ModelShape
    """Its matmul parameters include the hidden-loss projections, trained with it."""
    teacher: ModelShape | None
    vocab_size: int
    """Vocabulary the loss runs over (head rows past it are padding)."""


def step_shapes(step: TrainStep) -> StepShapes:
    projections = step.module.projections
    extra = matmul_params(projections) if projections is not None else 0
    return StepShapes(
        student=model_shape(step.module.student, extra),
        teacher=model_shape(step.teacher) if step.teacher is not None else None,
        vocab_size=step.vocab_size,
    )


def run_train_step(step: TrainStep) -> torch.Tensor:
    """One optimizer step, as trainer.train does it on one process; returns the mean loss."""

    # Every token of the step weighs the same (the trainer's global token count, one process).
    count = sum(int((mb[:, 1:] != -100).sum()) for mb in step.batches)
    loss_sum = torch.zeros((), device=step.batches[0].device)
    for mb in step.batches:
        teacher_out = None
        if step.teacher is not None:
            teacher_out = teacher_forward(step.teacher, mb, step.want_states, step.autocast)
        with step.autocast:
            total, _, _ = step.module(mb, teacher_out)
        (total / max(count, 1)).backward()
        loss_sum += total.detach().float()
    max_norm = step.spec.max_grad_norm
    torch.nn.utils.clip_grad_norm_(step.module.parameters(), max_norm if max_norm > 0 else math.inf)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return loss_sum / max(count, 1)


def loss_only_peak_bytes(step: TrainStep, device: torch.device) -> int:
    """Peak bytes the objective adds, forward and backward, given fixed final hidden states.

    The hidden states are the models' own (one no-grad forward of each), so dtypes and values are
    those of the real step; gradients flow to the hidden states and the student's head.
    """

    module, ids = step.module, step.batches[0]
    with torch.no_grad(), step.autocast:
        last = backbone_of(module.student)(input_ids=ids).last_hidden_state
    hidden = last[:, :-1].reshape(-1, last.shape[-1]).detach().requires_grad_(True)
    labels = ids[:, 1:].reshape(-1)
    head = causal_lm_of(module.student).get_output_embeddings().weight
    teacher_hidden = teacher_head = None
    if step.teacher is not None:
        out = teacher_forward(step.teacher, ids, False, step.autocast)
        teacher_hidden = out.hidden[:, :-1].reshape(-1, out.hidden.shape[-1])
        teacher_head = out.head_weight
    del last
    module.zero_grad(set_to_none=True)
    with PeakMemory(device) as peak:
        with step.autocast:
            result = module.logit_objective(hidden, head, labels, teacher_hidden, teacher_head)
        result.total.backward()
        del result
    module.zero_grad(set_to_none=True)
    return peak.added_bytes
