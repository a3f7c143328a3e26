"""On-policy distillation as a stage sees it: the run's prompts (tokenized once, kept on the run
context), the checks that fail before training (no live teacher, prompts that do not fit the
context), and the `OnPolicy` the loop calls; and the on-policy evaluation of a stage's model."""

from __future__ import annotations

from distill.data.prompts import BlockPrompts, PromptSets, build_prompt_sets
from distill.errors import RecipeError
from distill.prompts_spec import PromptsSpec
from distill.run.context import RunContext
from distill.runtime.generate import HFGenerator
from distill.runtime.on_policy import OnPolicy, completion_nll
from distill.teacher_cache.store import CachedTeacher


def prompt_sets(ctx: RunContext) -> PromptSets:
    """The run's prompts (`data.prompts`, default: the first tokens of the blocks), once."""
    if ctx.prompts is None:
        spec = ctx.recipe.data.prompts or PromptsSpec()
        ctx.prompts = build_prompt_sets(spec, ctx.recipe.data, ctx.data, ctx.tokenizer)
    return ctx.prompts


def build_on_policy(ctx: RunContext, stage, module, teacher, prompts=None) -> OnPolicy | None:
    """The stage's `OnPolicy` when its objective has `on_policy`, after the checks; `prompts`
    replaces the run's (the benchmark's random blocks)."""
    objective = getattr(stage, "objective", None)
    spec = objective.on_policy if objective is not None else None
    if spec is None:
        return None
    where = f"stage {stage.name!r} objective.on_policy"
    if isinstance(teacher, CachedTeacher) or stage.teacher_cache is not None:
        raise RecipeError(
            f"{where}: on-policy distillation scores the student's fresh samples, which no "
            f"offline teacher cache holds ({stage.teacher_cache}); give the live teacher "
            "(`teacher: <stage or model>`) or remove `objective.on_policy`"
        )
    if teacher is None:
        raise RecipeError(f"{where}: needs a teacher to score the student's samples")
    if not objective.terms:
        raise RecipeError(
            f"{where}: on-policy steps train on logit terms only (CE on the student's own "
            "samples would teach it its own text); add `objective.terms`, e.g. reverse_kl"
        )
    if prompts is None:
        sets = prompt_sets(ctx)
        prompts, length, source = sets.train, sets.length, sets.where
    else:
        length, source = prompts.length, "the benchmark's blocks"
    _check_length(ctx, where, length, spec.max_new_tokens, source, module.student, teacher)
    vocab = len(ctx.tokenizer)
    eos = getattr(ctx.tokenizer, "eos_token_id", None)
    pad = getattr(ctx.tokenizer, "pad_token_id", None)
    generator = HFGenerator(module.student, eos, pad, vocab)
    return OnPolicy(spec, prompts, generator, eos, vocab, bool(objective.hidden))


def bench_prompts(blocks, length: int) -> BlockPrompts:
    """The benchmark's random blocks as prompts of `length` tokens."""
    return BlockPrompts(blocks, length)


def _check_length(ctx, where: str, prompt: int, new: int, source: str, student, teacher) -> None:
    seq_len = ctx.recipe.data.seq_len
    total = prompt + new
    if total > seq_len:
        raise RecipeError(
            f"{where}: prompts of {prompt} tokens ({source}) plus max_new_tokens={new} make "
            f"{total} tokens, longer than data.seq_len={seq_len} (the context the stage is "
            "sized for); lower `max_new_tokens` or `data.prompts.prompt_tokens`"
        )
    _check_positions(where, total, student, teacher)


def _check_positions(where: str, total: int, student, teacher) -> None:
    for what, model in (("student", student), ("teacher", teacher)):
        config = getattr(getattr(model, "lm", model), "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and total > limit:
            raise RecipeError(
                f"{where}: prompt + completion is {total} tokens, beyond the {what}'s "
                f"max_position_embeddings={limit}; lower `max_new_tokens` or the prompt length"
            )


def on_policy_metrics(ctx: RunContext, model, teacher, spec) -> dict:
    """`metrics.on_policy` of a stage: the teacher's NLL of the model's own held-out completions."""
    tok = ctx.tokenizer
    sets = prompt_sets(ctx)
    where = f"eval.on_policy ({sets.where})"
    _check_positions(where, sets.length + spec.max_new_tokens, model, teacher)
    return completion_nll(
        model,
        teacher,
        prompt_sets(ctx).heldout,
        spec,
        len(tok),
        tok.eos_token_id,
        tok.pad_token_id,
    )
