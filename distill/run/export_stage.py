"""The `export` stage kind: write a model in the formats servers load, load each file back through
its runtime and measure it there (held-out perplexity through transformers' loader, and through
llama.cpp for GGUF when llama-cpp-python is installed; size on disk; generation speed with
`eval.latency`)."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from transformers import AutoConfig

from distill.compress.export import (
    ExportResult,
    export_model,
    llama_cpp_model,
    llama_cpp_nll,
    load_exported,
    plan_export,
)
from distill.compress.gguf_export import gguf_architecture
from distill.config import QuantSpec
from distill.errors import RecipeError
from distill.files import atomic_write
from distill.models import count_params
from distill.run.context import RunContext, earlier_stage, stage_dir
from distill.run.quant_stages import QUANT_FILE
from distill.run.results import StageResult
from distill.run.stage_output import _eval_spec, _heldout, _latency
from distill.runtime import signals
from distill.targets import CT_GROUP_SIZES

RESULT_FILE = "exports.json"


def _group_size(stage, source_dir: Path) -> int | None:
    """`auto`: the group of the symmetric scheme the model was fake-quantized with (`ptq`/`qat`),
    else the format's default (32). 0 means one scale per output channel."""
    if stage.group_size != "auto":
        return 0 if stage.group_size is None else stage.group_size
    path = source_dir / QUANT_FILE
    if path.is_file():
        quant = QuantSpec.model_validate_json(path.read_text())
        if quant.symmetric and quant.group_size in (*CT_GROUP_SIZES, None):
            return 0 if quant.group_size is None else quant.group_size
    return -1


def _check_before_work(ctx: RunContext, stage) -> tuple[Path, int | None]:
    """Every format, option and the architecture checked before the first file is written."""
    entry = earlier_stage(ctx, stage.model)
    if entry is None:
        raise RecipeError(
            f"stage {stage.name!r}: `export` writes an earlier stage's model; {stage.model!r} "
            "is not one"
        )
    source = Path(entry.model_dir)
    group_size = _group_size(stage, source)
    for fmt in stage.formats:
        ct_group = group_size if fmt.startswith("ct-") else -1
        try:
            plan_export(fmt, ct_group, stage.embeddings if fmt.startswith("gguf-") else None)
        except RecipeError as err:
            raise RecipeError(f"stage {stage.name!r} ({fmt}): {err}") from None
    if any(fmt.startswith("gguf-") for fmt in stage.formats):
        gguf_architecture(AutoConfig.from_pretrained(source))
    return source, group_size


def _llama_cpp_perplexity(ctx: RunContext, stage, path: str) -> dict:
    """Held-out perplexity (and generation tokens/s with eval.latency) as llama.cpp computes."""
    llm = llama_cpp_model(path)
    try:
        nll, count = llama_cpp_nll(llm, ctx.data.eval)
        out = {"perplexity": math.exp(nll / count), "loss": nll / count}
        ev = _eval_spec(ctx, stage)
        if ev.latency:
            prompt = ctx.data.eval[0, :16].tolist()
            llm.reset()  # an empty KV cache: generate() would reuse a cached prefix
            start = time.perf_counter()
            steps = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
            for _ in range(ev.latency_tokens):
                next(steps)
            out["latency_s"] = time.perf_counter() - start
    finally:
        llm.close()
    return out


def _measure(ctx: RunContext, stage, result: ExportResult) -> dict:
    model, _ = load_exported(result)
    metrics = _heldout(ctx, model, stage)
    runtimes = {"transformers": {"perplexity": metrics["perplexity"], "loss": metrics["loss"]}}
    latency_s = _latency(ctx, model, stage)
    if latency_s is not None:
        runtimes["transformers"]["latency_s"] = latency_s
    if result.format.startswith("gguf-") and importlib.util.find_spec("llama_cpp") is not None:
        runtimes["llama.cpp"] = _llama_cpp_perplexity(ctx, stage, result.path)
    return {**result.to_dict(), "params": _model_params(model), "runtimes": runtimes}


def _model_params(model) -> int:
    """The model's parameters, without what compressed-tensors leaves registered on unpacked
    linears (their scales and shapes): the count of the model that was exported."""
    leftovers = {"weight_scale", "weight_shape", "weight_zero_point", "weight_packed"}
    return count_params(model) - sum(
        p.numel() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in leftovers
    )


def run_export_stage(ctx: RunContext, stage, fingerprint: str) -> StageResult:
    """Export the model of ``stage.model`` to every format and measure each in its runtime."""
    source, group_size = _check_before_work(ctx, stage)
    out = stage_dir(ctx, stage.name)
    if ctx.is_main:
        exports = []
        for fmt in stage.formats:
            if signals.requested():  # the formats written so far are redone by the rerun
                break
            result = export_model(
                source,
                out / "export" / fmt,
                fmt,
                group_size if fmt.startswith("ct-") else -1,
                stage.embeddings if fmt.startswith("gguf-") else None,
                tokenizer_dir=ctx.out_dir / "tokenizer",
            )
            exports.append(_measure(ctx, stage, result))
            ppl = {name: r["perplexity"] for name, r in exports[-1]["runtimes"].items()}
            ctx.log(f"{fmt}: {result.size_bytes / 2**20:.2f} MiB, perplexity {ppl}")
        else:
            atomic_write(out / RESULT_FILE, json.dumps(exports, indent=2))
    ctx.accelerator.wait_for_everyone()
    signals.stop_point(ctx.accelerator)
    exports = json.loads((out / RESULT_FILE).read_text())
    first = exports[0]
    measured = first["runtimes"]["transformers"]
    return StageResult(
        name=stage.name,
        kind=stage.kind,
        model_dir=first["path"],
        source=stage.model,
        params=first["params"],
        size_bytes=first["size_bytes"],
        perplexity=measured["perplexity"],
        loss=measured["loss"],
        scheme=first["grid"] or first["format"],
        compare_to=stage.compare_to or stage.model,
        latency_s=measured.get("latency_s"),
        exports=exports,
    )
