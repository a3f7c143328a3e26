"""What every stage kind does at its end: export its model directory atomically, measure it, and
say what it is in the summary."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.models import count_params, dir_size_bytes, save_model_dir
from distill.run.context import RunContext
from distill.run.results import StageResult
from distill.runtime.evaluate import generate_latency_s, heldout_metrics


def _eval_spec(ctx: RunContext, stage):
    """The recipe's `eval`, with the keys the stage's own `eval` sets replacing it."""
    if stage.eval is None:
        return ctx.recipe.eval
    own = {key: getattr(stage.eval, key) for key in stage.eval.model_fields_set}
    return ctx.recipe.eval.model_copy(update=own)


def _capped(ctx: RunContext, spec):
    if ctx.max_steps is not None and spec.max_steps > ctx.max_steps:
        return spec.model_copy(update={"max_steps": ctx.max_steps})
    return spec


def _export(ctx: RunContext, model, out: Path, extra_files: dict | None = None) -> None:
    """The stage's model dir (with the run's tokenizer), written by the main process."""
    if ctx.is_main:
        save_model_dir(model, ctx.tokenizer, out, extra_files)


def _heldout(ctx: RunContext, model, stage, autocast=None) -> dict:

    ev = _eval_spec(ctx, stage)
    return heldout_metrics(model, ctx.data.eval, ev.batch_size, len(ctx.tokenizer), autocast)


def _latency(ctx: RunContext, model, stage) -> float | None:

    ev = _eval_spec(ctx, stage)
    if not ev.latency:
        return None
    return generate_latency_s(model, ctx.data.eval[:1, :16], ev.latency_tokens)


def _entry(ctx: RunContext, stage, model, out: Path, metrics: dict, **extra) -> StageResult:
    """The stage's result: its model dir, size, held-out metrics, and `extra` (StageResult
    fields)."""
    return StageResult(
        name=stage.name,
        kind=stage.kind,
        model_dir=str(out),
        source=stage.model,
        params=extra.pop("params", None) or count_params(model),
        size_bytes=extra.pop("size_bytes", None) or dir_size_bytes(out),
        perplexity=metrics["perplexity"],
        loss=metrics["loss"],
        # a float stage's scheme is the dtype of its stored weights ("fp32", "bf16")
        scheme=extra.pop("scheme", None) or _float_scheme(model),
        **extra,
    )


def _float_scheme(model) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )
