"""One training stage's step, built for measuring."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from distill.bench.flops import ModelShape, matmul_params, model_shape
from distill.bench.memory import PeakMemory
from distill.config import TRAINING_KINDS, Recipe, TrainSpec
from distill.errors import RecipeError
from distill.models import (
    backbone_of,
    causal_lm_of,
    has_tokenizer,
    load_tokenizer,
)
from distill.objective.module import teacher_forward
from distill.run.assemble import TrainingRun, assemble_training_run
from distill.run.context import RunContext, read_stage_record, ref_config, root_model_key
from distill.run.results import StageResult
from distill.runtime.loop import autocast_for, lr_at, param_groups, train_step


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


def bench_context(recipe: Recipe, stage, notes: list[str]) -> RunContext:
    """A run context for measuring `stage`: the stages before it that finished in the recipe's
    output dir are used as they are (their models, prune records, tokenizer), the others are
    built fresh from the `models` they start from (an unpruned architecture, noted)."""
    out = recipe.resolved_output_dir
    tokenizer = None
    if has_tokenizer(str(out / "tokenizer")):
        tokenizer = load_tokenizer(str(out / "tokenizer"), "the run's tokenizer")
    ctx = RunContext(recipe, out, tokenizer=tokenizer)
    for earlier in recipe.stages[: recipe.stages.index(stage)]:
        record = read_stage_record(ctx, earlier.name)
        if record is not None:
            ctx.results.append(StageResult.from_json(record["entry"]))
    finished = {result.name for result in ctx.results}
    for ref in {stage.model, stage.teacher_model} - {None} - finished:
        for pruned in root_model_key(recipe, ref)[1]:
            if pruned.prune.method in ("width", "depth") and pruned.name not in finished:
                notes.append(
                    f"stage {pruned.name!r} prunes {pruned.prune.method} and has not run: the "
                    "bench measures the unpruned architecture"
                )
    if ctx.tokenizer is None:
        ctx.tokenizer = _VocabOnly(
            recipe.tokenizer.train.vocab_size if recipe.tokenizer.source == "train" else None
        )
        if ctx.tokenizer.size is None:  # the smallest head of the step's models
            refs = {stage.model, stage.teacher_model} - {None}
            ctx.tokenizer.size = min(ref_config(ctx, ref).vocab_size for ref in refs)
    return ctx


@dataclass
class TrainStep:
    """Everything one training step of a stage touches."""

    run: TrainingRun
    optimizer: torch.optim.Optimizer
    batches: list[torch.Tensor]
    spec: TrainSpec
    autocast: object
    vocab_size: int

    @property
    def module(self) -> nn.Module:
        return self.run.module

    @property
    def teacher(self) -> nn.Module | None:
        return self.run.teacher


def build_train_step(
    recipe: Recipe, stage, path: str, device: torch.device, notes: list[str]
) -> TrainStep:
    """The stage's models, objective module, hooks and AdamW, from `assemble_training_run` (what
    `distill run` trains), built on `device` (on "meta" it costs nothing: the FLOP model only
    needs the shapes)."""
    spec = stage.train
    ctx = bench_context(recipe, stage, notes)
    run = assemble_training_run(ctx, stage, spec, objective_path=path, device=device)
    run.module.train()
    if run.teacher is not None:
        run.teacher.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(run.module, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas)
    )
    vocab = len(ctx.tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    shape = (spec.batch_size, recipe.data.seq_len)
    batches = [
        torch.randint(0, vocab, shape, generator=gen, device="cpu").to(device)
        for _ in range(spec.grad_accum)
    ]
    autocast = autocast_for(spec, device) if device.type != "meta" else nullcontext()
    return TrainStep(run, optimizer, batches, spec, autocast, vocab)


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


def run_train_step(step: TrainStep, acc) -> torch.Tensor:
    """One optimizer step, by the loop's own `train_step` and the stage's hooks; the mean loss."""
    run = step.run
    if run.hooks.before_step:
        run.hooks.before_step(0, step.module)
    lr = lr_at(0, step.spec)
    out = train_step(
        acc, step.module, step.optimizer, step.teacher, step.batches, step.spec, lr, step.autocast
    )
    if run.hooks.after_optimizer_step:
        run.hooks.after_optimizer_step(step.module)
    return out.loss


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
