"""The `ptq` stage kind, and what a `qat` stage records about its scheme."""

from __future__ import annotations

import json

from distill.compress.fake_quant import (
    prepare_qat,
    remove_fake_quant,
    set_fake_quant_enabled,
)
from distill.errors import RecipeError
from distill.run.context import RunContext, check_model_against_tokenizer, load_ref, model_dir
from distill.run.report import recovered_fraction
from distill.run.results import StageResult
from distill.run.stage_output import _entry, _export, _heldout
from distill.runtime import signals

QUANT_FILE = "distill_quant.json"


def _prepare_fake_quant(stage, model, scheme) -> None:
    """prepare_qat, with a scheme that does not fit the model reported as a recipe error."""

    try:
        prepare_qat(model, scheme)
    except ValueError as err:
        raise RecipeError(f"stage {stage.name!r} (quant): {err}") from None


def _qat_extra(ctx: RunContext, stage, scheme_name: str, perplexity: float) -> StageResult:
    """Scheme, start of fake quantization, and what QAT won back over the `ptq` stage of the same
    scheme and starting model, when the recipe has one."""

    extra = {"scheme": scheme_name, "fake_quant_after": stage.fake_quant_after}
    for result in reversed(ctx.results):
        if result.kind == "ptq" and result.scheme == scheme_name and result.source == stage.model:
            extra["compare_to"] = result.name
            extra["recovered_fraction"] = recovered_fraction(
                result.perplexity_before, result.perplexity, perplexity
            )
            break
    return extra


def run_ptq_stage(ctx: RunContext, stage, fingerprint: str) -> StageResult:
    """Fake-quantize the model and evaluate it (fp32, no training): the baseline QAT must beat.
    Writes the float weights and the scheme, which an `export` stage writes in a server's format."""

    model = load_ref(ctx, stage.model, "model to quantize")
    check_model_against_tokenizer(ctx, stage.model, model, f"model {stage.model!r}")
    scheme = stage.quant
    before = _heldout(ctx, model, stage)  # full precision, measured the same way
    signals.stop_point(ctx.accelerator)
    _prepare_fake_quant(stage, model, scheme)
    set_fake_quant_enabled(model, True)
    metrics = _heldout(ctx, model, stage)
    remove_fake_quant(model)
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
