"""One training stage's step, built for measuring."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from distill.bench.flops import ModelShape, matmul_params, model_shape
from distill.bench.memory import PeakMemory
from distill.config import TRAINING_KINDS, CacheSpec, Recipe, TeacherRef, TrainSpec, TrainStage
from distill.errors import RecipeError
from distill.models import (
    backbone_of,
    causal_lm_of,
    has_tokenizer,
    load_tokenizer,
    num_layers,
)
from distill.objective.module import teacher_forward
from distill.prompts_spec import PromptsSpec
from distill.run.assemble import TrainingRun, assemble_training_run, frozen_teacher
from distill.run.cache_stage import teacher_outputs
from distill.run.context import (
    RunContext,
    read_stage_record,
    ref_config,
    result_of_record,
    root_model_key,
)
from distill.run.on_policy_stage import bench_prompts
from distill.runtime.loop import autocast_for, lr_at, param_groups, train_step
from distill.teacher_cache.store import CachedTeacher, cache_in_memory

LOSS_PATHS = ("chunked", "naive")
"""The same step by each loss path of the objective."""
TEACHER_PATHS = ("cache", "online", "ce_only")
"""A stage that reads a teacher cache: from the cache, with its teacher run online instead, and
the student alone with cross-entropy (the floor a cache can reach)."""


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
            ctx.results.append(result_of_record(ctx, earlier.name, record))
    finished = {result.name for result in ctx.results}
    for ref in (
        {stage.model, stage.teacher_model, _cache_teacher(recipe, stage)} - {None} - finished
    ):
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
    def teacher(self) -> nn.Module | CachedTeacher | None:
        return self.run.teacher

    def blocks(self) -> list[torch.Tensor]:
        """The micro-batches' block indices: an in-memory cache holds the batches as blocks 0..n."""
        size = self.spec.batch_size
        return [torch.arange(a * size, (a + 1) * size) for a in range(len(self.batches))]


def build_train_step(
    recipe: Recipe, stage, path: str, device: torch.device, notes: list[str]
) -> TrainStep:
    """The stage's models, objective module, hooks and AdamW, from `assemble_training_run` (what
    `distill run` trains), built on `device` (on "meta" it costs nothing: the FLOP model only
    needs the shapes). `path` is a loss path (LOSS_PATHS) or, for a stage reading a teacher
    cache, a teacher path (TEACHER_PATHS)."""
    spec = stage.train
    ctx = bench_context(recipe, stage, notes)
    vocab = len(ctx.tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    shape = (spec.batch_size, recipe.data.seq_len)
    batches = [
        torch.randint(0, vocab, shape, generator=gen, device="cpu").to(device)
        for _ in range(spec.grad_accum)
    ]
    autocast = autocast_for(spec, device) if device.type != "meta" else nullcontext()
    measured, cache = stage, None
    if stage.teacher_cache is not None and _cache_teacher(recipe, stage) is None:
        raise RecipeError(
            f"stage {stage.name!r} reads the cache directory {stage.teacher_cache!r}; distill bench "
            "writes its cache from the teacher of a `cache-teacher` stage of the recipe: name "
            "that stage in `teacher.cache`"
        )
    if path == "ce_only":
        measured = TrainStage(name=stage.name, kind="train", model=stage.model, train=spec)
    elif stage.teacher_cache is None and path in TEACHER_PATHS:
        raise RecipeError(
            f"--paths {path}: stage {stage.name!r} reads no teacher cache; measure it with "
            f"--paths {','.join(LOSS_PATHS)}, or pick a stage with "
            "`teacher: {cache: <cache-teacher stage>}`"
        )
    elif path == "online":
        teacher = TeacherRef(model=_cache_teacher(recipe, stage))
        measured = stage.model_copy(update={"teacher": teacher})
    elif stage.teacher_cache is not None:  # the cache path, and the loss paths of such a stage
        cache = _cache_of_batches(ctx, recipe.stage(stage.teacher_cache), spec, batches)
    loss_path = path if path in LOSS_PATHS else None
    prompts = _on_policy_prompts(recipe, measured, batches)
    run = assemble_training_run(
        ctx, measured, spec, objective_path=loss_path, device=device, cache=cache, prompts=prompts
    )
    run.module.train()
    if isinstance(run.teacher, nn.Module):
        run.teacher.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(run.module, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas)
    )
    return TrainStep(run, optimizer, batches, spec, autocast, vocab)


def _on_policy_prompts(recipe: Recipe, stage, batches):
    """An on-policy stage's prompts: the first `data.prompts.prompt_tokens` of the random blocks."""
    objective = getattr(stage, "objective", None)
    if objective is None or objective.on_policy is None:
        return None
    length = (recipe.data.prompts or PromptsSpec()).prompt_tokens
    return bench_prompts(torch.cat(batches), length)


def _cache_teacher(recipe: Recipe, stage) -> str | None:
    """The teacher of the `cache-teacher` stage that `stage` reads, or None."""
    names = {s.name for s in recipe.stages}
    if stage.teacher_cache is None or stage.teacher_cache not in names:
        return None
    return recipe.stage(stage.teacher_cache).model


def _cache_of_batches(ctx: RunContext, cache_stage, spec: TrainSpec, batches) -> CachedTeacher:
    """The cache the stage would read, of the bench's own batches, written in memory by the cache
    stage's own encoding (the step then reads and decodes it as from disk)."""
    cache_spec: CacheSpec = cache_stage.cache
    device = batches[0].device
    ref = TeacherRef(model=cache_stage.model)
    teacher, in_loop, _ = frozen_teacher(ctx, ref, spec, None, cache_stage.model)
    in_loop.to(device)
    autocast = autocast_for(spec, device)
    topk, hidden = teacher_outputs(
        in_loop, torch.cat(batches), cache_spec, len(ctx.tokenizer), autocast, device
    )
    manifest = {
        "k": cache_spec.k,
        "tail_samples": cache_spec.tail_samples,
        "hidden_layers": sorted(set(cache_spec.hidden_layers)),
        "teacher_layers": num_layers(teacher),
        "hidden_size": teacher.config.hidden_size,
    }
    return cache_in_memory(manifest, topk, hidden)


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
        teacher=model_shape(step.teacher) if isinstance(step.teacher, nn.Module) else None,
        vocab_size=step.vocab_size,
    )


def run_train_step(step: TrainStep, acc) -> torch.Tensor:
    """One optimizer step, by the loop's own `train_step` and the stage's hooks; the mean loss."""
    run = step.run
    if run.hooks.before_step:
        run.hooks.before_step(0, step.module)
    lr = lr_at(0, step.spec)
    out = train_step(
        acc,
        step.module,
        step.optimizer,
        step.teacher,
        step.batches,
        step.spec,
        lr,
        step.autocast,
        blocks=step.blocks(),
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
    teacher_hidden = teacher_head = teacher_topk = None
    if isinstance(step.teacher, CachedTeacher):
        topk = step.teacher.read(step.blocks()[0], device, False).topk
        teacher_topk = tuple(t.flatten(0, 1) for t in topk)
    elif step.teacher is not None:
        out = teacher_forward(step.teacher, ids, False, step.autocast)
        teacher_hidden = out.hidden[:, :-1].reshape(-1, out.hidden.shape[-1])
        teacher_head = out.head_weight
    del last
    module.zero_grad(set_to_none=True)
    with PeakMemory(device) as peak:
        with step.autocast:
            result = module.logit_objective(
                hidden, head, labels, teacher_hidden, teacher_head, teacher_topk=teacher_topk
            )
        result.total.backward()
        del result
    module.zero_grad(set_to_none=True)
    return peak.added_bytes
