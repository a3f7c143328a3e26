"""`distill bench` of an on-policy stage: the time of an on-policy step split into the student's
generation and the rest (the teacher scoring prompt + completion, forward, backward, AdamW), and
what share of the stage's training time generation takes at its fraction lambda."""

from __future__ import annotations

import statistics
import time

from distill.bench.flops import _sync
from distill.bench.step import build_train_step
from distill.runtime.loop import lr_at, train_step


def bench_on_policy(recipe, stage, device, steps: int, warmup: int, notes, acc, results) -> dict:
    """`{"on_policy": the on-policy step's time split}` (empty for a stage without
    `objective.on_policy`); `results` are the measured paths (the chunked one is the off-policy
    step)."""
    objective = getattr(stage, "objective", None)
    if objective is None or objective.on_policy is None or device.type == "meta":
        return {}
    off_ms = (results.get("chunked") or next(iter(results.values()))).ms_per_step
    step = build_train_step(recipe, stage, "chunked", device, notes)
    on_policy = step.run.on_policy
    gen, rest, tokens = [], [], []
    for index in range(warmup + steps):
        _sync(device)
        t0, gen_before = time.perf_counter(), on_policy.totals["gen_s"]
        tokens_before = on_policy.totals["gen_tokens"]
        batches = on_policy.batches(acc, step.teacher, index, step.spec, recipe.seed, step.autocast)
        train_step(
            acc,
            step.module,
            step.optimizer,
            step.teacher,
            batches,
            step.spec,
            lr_at(0, step.spec),
            step.autocast,
        )
        _sync(device)
        if index >= warmup:
            g = on_policy.totals["gen_s"] - gen_before
            gen.append(g)
            rest.append(time.perf_counter() - t0 - g)
            tokens.append(on_policy.totals["gen_tokens"] - tokens_before)
    del step
    gen_ms, rest_ms = statistics.median(gen) * 1e3, statistics.median(rest) * 1e3
    return {"on_policy": _split(objective.on_policy, gen_ms, rest_ms, off_ms, tokens)}


def _split(spec, gen_ms: float, rest_ms: float, off_ms: float, tokens: list) -> dict:
    fraction = spec.fraction
    stage_ms = fraction * (gen_ms + rest_ms) + (1 - fraction) * off_ms
    return {
        "fraction": fraction,
        "max_new_tokens": spec.max_new_tokens,
        "generation_ms": gen_ms,
        "scoring_and_training_ms": rest_ms,
        "on_policy_step_ms": gen_ms + rest_ms,
        "off_policy_step_ms": off_ms,
        "generated_tokens_per_step": statistics.median(tokens),
        "generation_tokens_per_s": statistics.median(tokens) / max(gen_ms / 1e3, 1e-9),
        "generation_share_of_on_policy_step": gen_ms / (gen_ms + rest_ms),
        "generation_share_of_stage": fraction * gen_ms / stage_ms if stage_ms else 0.0,
    }


def format_on_policy(result: dict) -> list[str]:
    """The table lines of `bench_on_policy`'s result."""
    r = result
    return [
        f"\non-policy step (lambda {r['fraction']}, up to {r['max_new_tokens']} new tokens): "
        f"generation {r['generation_ms']:.1f} ms ({r['generated_tokens_per_step']:.0f} tokens, "
        f"{r['generation_tokens_per_s']:,.0f} tokens/s) + scoring and training "
        f"{r['scoring_and_training_ms']:.1f} ms; generation is "
        f"{r['generation_share_of_on_policy_step'] * 100:.0f} % of an on-policy step and "
        f"{r['generation_share_of_stage'] * 100:.0f} % of the stage's training time"
    ]
