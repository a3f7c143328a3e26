"""Evaluation of every stage's output as it will be served, and the `evaluate` stage kind: quality
on every eval set (perplexity, by position), agreement with the teacher, lm-eval tasks and
generation speed, as the `metrics` of the stage's summary entry."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from distill.compress.export import llama_cpp_speed
from distill.config import EvalSpec
from distill.errors import StopRequested
from distill.models import count_params, dir_size_bytes
from distill.run.artifacts import load_artifact
from distill.run.context import RunContext, earlier_stage, load_ref
from distill.run.eval_sets import HELDOUT, eval_sets
from distill.run.on_policy_stage import on_policy_metrics
from distill.run.results import StageResult
from distill.run.stage_output import _eval_spec, _float_scheme
from distill.runtime import distributed, signals
from distill.runtime.eval_metrics import score_blocks
from distill.runtime.evaluate import generation_speed
from distill.runtime.lm_eval_tasks import lm_eval_scores


def evaluate_model(ctx: RunContext, model, spec: EvalSpec, teacher=None) -> dict:
    """Every metric `spec` asks for, of a loaded model (and its teacher, when given)."""
    device = next(model.parameters()).device
    metrics: dict = {"sets": {}}
    for name, blocks in eval_sets(ctx, spec).items():
        signals.stop_point()  # one process evaluates (see _main_then_broadcast)
        scored = score_blocks(
            model,
            blocks,
            spec.batch_size,
            len(ctx.tokenizer),
            spec.position_buckets,
            teacher=teacher if name == HELDOUT else None,
            teacher_blocks=spec.agreement_blocks,
        )
        if "teacher" in scored:
            metrics["teacher"] = scored.pop("teacher")
        metrics["sets"][name] = scored
    if spec.lm_eval is not None:
        signals.stop_point()
        seq_len = ctx.data.eval.shape[1]
        metrics["lm_eval"] = lm_eval_scores(model, ctx.tokenizer, spec.lm_eval, seq_len, device)
    if spec.on_policy is not None and teacher is not None and hasattr(model, "generate"):
        metrics["on_policy"] = on_policy_metrics(ctx, model, teacher, spec.on_policy)
    if spec.latency:
        metrics["speed"] = generation_speed(model, ctx.data.eval[0, :16], spec.latency_tokens)
    return metrics


def _teacher_ref(ctx: RunContext, stage, spec: EvalSpec) -> str | None:
    """The stage's own teacher, else `eval.teacher`; None for the teacher itself or a teacher
    stage that has not run yet."""
    ref = stage.teacher_model or spec.teacher
    finished = {r.name for r in ctx.results}
    if ref is None or ref == stage.name or (ref not in finished and ref not in ctx.recipe.models):
        return None
    return ref


def _main_then_broadcast(ctx: RunContext, compute: Callable[[], object]):
    """`compute()` on the main process, its value on every rank (one process evaluates)."""
    from accelerate.utils import broadcast_object_list

    several = ctx.accelerator is not None and ctx.accelerator.num_processes > 1
    try:
        value = [compute() if ctx.is_main else None]
    except StopRequested as stop:
        if not several:
            raise
        value = [_Stopped(stop.phase)]  # the others wait in the broadcast: they stop too
    if several:
        broadcast_object_list(value)
    if isinstance(value[0], _Stopped):
        raise StopRequested(None, value[0].phase)
    return value[0]


@dataclass
class _Stopped:
    phase: str | None


def _evaluate_dir(ctx: RunContext, stage, model_dir: str | None, source: str) -> dict:
    spec = _eval_spec(ctx, stage)
    t0 = time.perf_counter()
    device = ctx.accelerator.device
    artifact = None
    with distributed.hf_zero3_disabled():  # one whole copy on the main process, not partitioned
        if model_dir:
            artifact = load_artifact(model_dir)
            model, fmt, scheme = artifact.model, artifact.format, artifact.scheme
        else:  # a model of `models` given by config: built as a stage would build it
            model, fmt, scheme = load_ref(ctx, source, "model to evaluate"), "transformers", None
        teacher_ref = _teacher_ref(ctx, stage, spec)
        teacher = load_ref(ctx, teacher_ref, "teacher to compare with") if teacher_ref else None
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    metrics = evaluate_model(ctx, model, spec, teacher)
    if spec.latency and artifact and artifact.file and importlib.util.find_spec("llama_cpp"):
        # a GGUF file is served by llama.cpp: its speed there, not that of the dequantized copy
        prompt = ctx.data.eval[0, :16].tolist()
        metrics["speed"] = llama_cpp_speed(artifact.file, prompt, spec.latency_tokens)
    if "teacher" in metrics:
        metrics["teacher"]["model"] = teacher_ref
    metrics["format"] = fmt
    metrics["eval_wall_s"] = time.perf_counter() - t0
    return {
        "metrics": metrics,
        "params": count_params(model),
        "scheme": scheme or _float_scheme(model),
    }


def stage_metrics(ctx: RunContext, stage, result: StageResult) -> dict:
    """The metrics of a finished stage's model directory (computed on the main process)."""
    out = _main_then_broadcast(
        ctx, lambda: _evaluate_dir(ctx, stage, result.model_dir, stage.model)
    )
    ctx.log(_describe(stage.name, out["metrics"]))
    return out["metrics"]


def run_evaluate_stage(ctx: RunContext, stage, fingerprint: str) -> StageResult:
    """The `evaluate` kind: an earlier stage's output (its model dir, as served) or a model of
    `models`, measured with this stage's `eval`."""
    earlier = earlier_stage(ctx, stage.model)
    spec = ctx.recipe.models.get(stage.model)
    model_dir = earlier.model_dir if earlier is not None else (spec.path if spec else None)
    out = _main_then_broadcast(ctx, lambda: _evaluate_dir(ctx, stage, model_dir, stage.model))
    heldout = out["metrics"]["sets"][HELDOUT]
    ctx.log(_describe(stage.name, out["metrics"]))
    if earlier is not None:
        size_bytes = earlier.size_bytes
    else:
        size_bytes = (
            dir_size_bytes(model_dir)
            if model_dir and os.path.isdir(os.path.expanduser(model_dir))
            else 0
        )
    return StageResult(
        name=stage.name,
        kind=stage.kind,
        model_dir=model_dir or "",
        source=stage.model,
        params=earlier.params if earlier is not None else out["params"],
        size_bytes=size_bytes,
        perplexity=heldout["perplexity"],
        loss=heldout["loss"],
        scheme=earlier.scheme if earlier is not None else out["scheme"],
        teacher=(out["metrics"].get("teacher") or {}).get("model"),
        metrics=out["metrics"],
    )


def _describe(name: str, metrics: dict) -> str:
    parts = [f"{set_name} ppl {m['perplexity']:.2f}" for set_name, m in metrics["sets"].items()]
    if "teacher" in metrics:
        parts.append(f"top-1 agreement {metrics['teacher']['top1_agreement']:.3f}")
    parts += [f"{key} {value:.3f}" for key, value in (metrics.get("lm_eval") or {}).items()]
    if "on_policy" in metrics:
        parts.append(f"teacher NLL of own samples {_num(metrics['on_policy']['sampled_nll'])}")
    if "speed" in metrics:
        parts.append(f"{metrics['speed']['tokens_per_s']:.1f} tok/s")
    return f"stage {name!r} evaluated in {metrics['eval_wall_s']:.1f} s: " + ", ".join(parts)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"
