"""The `ptq` and `convert` stage kinds, and what a `qat` stage records about its scheme."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.compress.fake_quant import (
    QuantScheme,
    prepare_qat,
    remove_fake_quant,
    set_fake_quant_enabled,
)
from distill.compress.packed import (
    convert_model,
    load_quantized,
    quantized_size_bytes,
    save_quantized,
)
from distill.config import QuantSpec
from distill.errors import RecipeError
from distill.models import count_params
from distill.run.context import RunContext, check_model_against_tokenizer, load_ref, model_dir
from distill.run.report import recovered_fraction
from distill.run.stage_output import _entry, _export, _heldout, _latency

QUANT_FILE = "distill_quant.json"


def _scheme(quant: QuantSpec):

    return QuantScheme(
        bits=quant.bits,
        group_size=quant.group_size,
        symmetric=quant.symmetric,
        activations=quant.activations,
        exclude=tuple(quant.exclude),
        scale_dtype=quant.scale_dtype,
        target=quant.target,
    )


def _prepare_fake_quant(stage, model, scheme) -> None:
    """prepare_qat, with a scheme that does not fit the model reported as a recipe error."""

    try:
        prepare_qat(model, scheme)
    except ValueError as err:
        raise RecipeError(f"stage {stage.name!r} (quant): {err}") from None


def _qat_extra(ctx: RunContext, stage, scheme_name: str, perplexity: float) -> dict:
    """Scheme, start of fake quantization, and what QAT won back over the `ptq` stage of the same
    scheme and starting model, when the recipe has one."""

    extra = {"scheme": scheme_name, "fake_quant_after": stage.fake_quant_after}
    for entry in reversed(ctx.entries):
        if (
            entry["kind"] == "ptq"
            and entry.get("scheme") == scheme_name
            and entry.get("from") == stage.model
        ):
            extra["compare_to"] = entry["name"]
            extra["recovered_fraction"] = recovered_fraction(
                entry["perplexity_before"], entry["eval"]["perplexity"], perplexity
            )
            break
    return extra


def _stage_quant(ctx: RunContext, ref: str) -> QuantSpec | None:
    for entry in ctx.entries:
        if entry["name"] == ref:
            path = Path(entry["model_dir"]) / QUANT_FILE
            if path.is_file():
                return QuantSpec.model_validate_json(path.read_text())
    return None


def run_ptq_stage(ctx: RunContext, stage, fingerprint: str) -> dict:
    """Fake-quantize the model and evaluate it (fp32, no training): the baseline QAT must beat.
    Writes the float weights and the scheme, which a `convert` stage can turn into packed ones."""

    model = load_ref(ctx, stage.model, "model to quantize")
    check_model_against_tokenizer(ctx, stage.model, model, f"model {stage.model!r}")
    scheme = _scheme(stage.quant)
    before = _heldout(ctx, model, stage)  # full precision, measured the same way
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


def run_convert_stage(ctx: RunContext, stage, fingerprint: str) -> dict:

    quant = stage.quant or _stage_quant(ctx, stage.model)
    if quant is None:
        raise RecipeError(
            f"stage {stage.name!r}: `convert` needs a scheme: set `quant` on the stage, or convert "
            "the output of a `qat` or `ptq` stage"
        )
    if quant.target is not None:
        raise RecipeError(
            f"stage {stage.name!r}: the scheme targets {quant.target}: write it with "
            f"`kind: export` (formats: [...]), which rounds on that format's grid; `convert` "
            "writes distill's own packed format"
        )
    scheme = _scheme(quant)
    model = load_ref(ctx, stage.model, "model to convert")
    params = count_params(model)  # weights, whatever their bits (the packed codes are buffers)
    float_latency_s = _latency(ctx, model, stage)  # the same generation, before conversion
    try:
        convert_model(model, scheme)
    except ValueError as err:
        raise RecipeError(f"stage {stage.name!r} (quant): {err}") from None
    out = model_dir(ctx, stage.name)
    if ctx.is_main:
        import shutil

        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_quantized(model, ctx.tokenizer, tmp, scheme)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    ctx.accelerator.wait_for_everyone()
    # Measured on the model as a user gets it: reloaded from disk, CPU kernels where they exist.
    loaded = load_quantized(out)
    metrics = _heldout(ctx, loaded, stage)
    # CPU latency as deployed: bf16 activations, the int4/int8 kernels' fast path (float32 ones
    # take a slow generic path), against the float model as it was trained.
    latency_s = None
    if float_latency_s is not None:
        latency_s = _latency(ctx, load_quantized(out, dtype=torch.bfloat16), stage)
    entry = {
        "model_dir": str(out),
        "from": stage.model,
        "params": params,
        "size_bytes": quantized_size_bytes(out),
        "eval": {"perplexity": metrics["perplexity"], "loss": metrics["loss"]},
        "scheme": scheme.name(),
        "compare_to": stage.model,
        "steps": 0,
        "latency_s": latency_s,
        "latency_dtype": "bfloat16" if latency_s is not None else None,
        "float_latency_s": float_latency_s,
    }
    return {k: v for k, v in entry.items() if v is not None}
