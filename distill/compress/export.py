"""Export a saved model to the formats servers load, and load an export back through its runtime.

``export_model(model_dir, out_dir, format)`` checks everything it can before loading weights
(format options, architecture, the scheme a `ptq`/`qat` stage trained with), then writes:

- ``safetensors-bf16`` / ``safetensors-fp16``: a plain transformers directory, for servers that
  quantize themselves;
- ``gguf-{f32,f16,bf16,q8_0,q4_0}``: one ``model-<TYPE>.gguf`` file for llama.cpp;
- ``ct-w4a16`` / ``ct-w8a16``: a compressed-tensors ``pack-quantized`` directory for vLLM and
  transformers (``--group-size`` 32/64/128, or 0 for one scale per output channel).

2:4-sparse models export dense: vLLM removed its sparse 2:4 path, and GGUF has none.

Verification loaders: ``load_exported`` (transformers, for every format; GGUF dequantized to float)
and ``llama_cpp_nll`` (llama-cpp-python, the optional ``gguf`` extra).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distill.compress.ct_export import (
    export_compressed_tensors,
    linear_bytes_ratio,
    unpack_on_load,
)
from distill.compress.gguf_export import (
    EMBEDDING_KINDS,
    export_gguf,
    gguf_architecture,
    quantized_bytes_ratio,
)
from distill.compress.gguf_rope import apply_file_rope
from distill.compress.grids import Grid, target_grid
from distill.errors import RecipeError
from distill.files import atomic_dir, atomic_file
from distill.models import dir_size_bytes, load_pretrained, load_tokenizer
from distill.targets import EXPORT_FORMATS

QUANT_FILE = "distill_quant.json"
"""Written by `ptq`/`qat` stages beside the float weights: the scheme they fake-quantize with."""


@dataclass(frozen=True)
class ExportPlan:
    """A format with its options, validated before any model is loaded."""

    format: str
    grid: Grid | None = None
    """The weight grid of a quantized format (None: float formats)."""
    embeddings: str | None = None
    """GGUF: the type of token embeddings and output head."""
    dtype: str = "bfloat16"
    """compressed-tensors and safetensors: the dtype of the float tensors."""

    @property
    def gguf_kind(self) -> str | None:
        return self.format.removeprefix("gguf-") if self.format.startswith("gguf-") else None


@dataclass
class ExportResult:
    """What an export wrote: the path servers load, its size, and the grid it rounded onto."""

    format: str
    source: str
    """The directory of the source model's tokenizer (what the export must tokenize like)."""
    path: str
    size_bytes: int
    grid: str | None = None
    trained_grid: str | None = None
    """The grid the model was fake-quantized on (`ptq`/`qat`), if any: equal to ``grid`` means
    the export rounds exactly as training did."""
    linear_bytes_ratio: float | None = None
    """Quantized linears' bytes on disk over their bf16 bytes."""

    def to_dict(self) -> dict:
        return asdict(self)


def plan_export(
    format: str,
    group_size: int | None = -1,
    embeddings: str | None = None,
    dtype: str | None = None,
) -> ExportPlan:
    """Validate a format and its options; RecipeError naming the nearest supported choice.
    ``group_size``: -1 = the format's default, None or 0 = per output channel."""
    if format not in EXPORT_FORMATS:
        raise RecipeError(f"export format {format!r}: supported are {', '.join(EXPORT_FORMATS)}")
    group_size = None if group_size == 0 else group_size
    if embeddings is not None and not format.startswith("gguf-"):
        raise RecipeError(f"--embeddings applies to GGUF formats only, not {format}")
    if embeddings is not None and embeddings not in EMBEDDING_KINDS:
        raise RecipeError(f"embeddings {embeddings!r}: supported are {', '.join(EMBEDDING_KINDS)}")
    if format.startswith("safetensors-") or format in ("gguf-f32", "gguf-f16", "gguf-bf16"):
        if group_size != -1:
            raise RecipeError(f"--group-size applies to quantized formats, not {format}")
        dtype = {"safetensors-bf16": "bfloat16", "safetensors-fp16": "float16"}.get(format)
        return ExportPlan(format, embeddings=embeddings, dtype=dtype or "float32")
    if format.startswith("gguf-"):
        return ExportPlan(format, target_grid(format, group_size=group_size), embeddings)
    bits = 4 if format == "ct-w4a16" else 8
    dtype = dtype or "bfloat16"
    scale_dtype = "float16" if dtype == "float16" else "bfloat16"
    grid = target_grid("compressed-tensors", bits, group_size, scale_dtype=scale_dtype)
    return ExportPlan(format, grid, dtype=dtype)


def trained_grid_name(model_dir: str | Path) -> str | None:
    """The grid a `ptq`/`qat` model dir was fake-quantized on, as recorded beside its weights."""
    path = Path(model_dir) / QUANT_FILE
    if not path.is_file():
        return None
    scheme = json.loads(path.read_text())
    if scheme.get("target"):
        return target_grid(
            scheme["target"],
            scheme.get("bits"),
            scheme.get("group_size"),
            scheme.get("symmetric", True),
            scheme.get("scale_dtype", "bfloat16"),
        ).name()
    granularity = "pc" if scheme.get("group_size") is None else f"g{scheme['group_size']}"
    symmetry = "sym" if scheme.get("symmetric", True) else "asym"
    return f"int{scheme.get('bits')}-{granularity}-{symmetry}"


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    format: str,
    group_size: int | None = -1,
    embeddings: str | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
) -> ExportResult:
    """Export the transformers model saved in ``model_dir`` to ``format`` under ``out_dir``, with
    the tokenizer of ``tokenizer_dir`` (default: ``model_dir``)."""
    from transformers import AutoConfig

    plan = plan_export(format, group_size, embeddings, dtype)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise RecipeError(
            f"export: {model_dir} has no config.json (not a saved transformers model)"
        )
    if plan.gguf_kind:
        gguf_architecture(AutoConfig.from_pretrained(model_dir))
    trained = trained_grid_name(model_dir)
    # GGUF tensors are upcast one at a time (exactly); compressed-tensors compresses in float32.
    load_dtype = "auto" if plan.gguf_kind else "float32"
    model = load_pretrained(str(model_dir), what="model to export", dtype=load_dtype)
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    tokenizer = load_tokenizer(str(tokenizer_dir), what="model to export")
    grid = plan.grid.name() if plan.grid else None
    result = ExportResult(format, str(tokenizer_dir), str(out_dir), 0, grid, trained)
    what = f"exporting {model_dir} as {format} to"
    if plan.gguf_kind:
        path = out_dir / f"model-{plan.gguf_kind.upper()}.gguf"
        with atomic_file(path, f"{what} {path}") as tmp:  # export_gguf makes out_dir after checks
            export_gguf(model, tokenizer_dir, tmp, plan.gguf_kind, plan.embeddings, model_dir)
        result.path, result.size_bytes = str(path), path.stat().st_size
        if plan.grid is not None:
            result.linear_bytes_ratio = quantized_bytes_ratio(path, plan.gguf_kind)
        return result
    # written whole beside `out_dir`, then moved in: other files a user keeps there stay
    with atomic_dir(out_dir, f"{what} {out_dir}", merge=True) as tmp:
        if plan.grid is not None:
            export_compressed_tensors(model, tokenizer, tmp, plan.grid, plan.dtype)
        else:
            _export_safetensors(model, tokenizer, tmp, plan.dtype)
    if plan.grid is not None:
        result.linear_bytes_ratio = linear_bytes_ratio(out_dir)
    result.size_bytes = dir_size_bytes(out_dir)
    return result


def _export_safetensors(model, tokenizer, out_dir: Path, dtype: str) -> None:
    if dtype == "float16":
        largest = max(p.detach().abs().max().item() for p in model.parameters())
        if largest > torch.finfo(torch.float16).max:
            raise RecipeError(
                f"safetensors-fp16: a weight of magnitude {largest:.3g} overflows float16; "
                "export safetensors-bf16"
            )
    model.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --- verification: load an export back through its runtime ---------------------------------------


def load_exported(result: ExportResult, dtype: torch.dtype = torch.float32):
    """The export as transformers loads it (GGUF: dequantized to float), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(result.path)
    if result.format.startswith("gguf-"):
        kwargs = {"gguf_file": path.name}
        path = path.parent
    else:
        kwargs = {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    if kwargs:  # transformers' GGUF loader leaves RoPE unscaled: the file's frequencies, as served
        model = apply_file_rope(model, result.path)
    return unpack_on_load(model), AutoTokenizer.from_pretrained(path, **kwargs)


def llama_cpp_model(gguf_path: str | Path, n_ctx: int = 0, n_threads: int | None = None):
    """A llama-cpp-python ``Llama`` on ``gguf_path`` keeping every position's logits
    (``n_ctx=0``: the model's own context length)."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise RecipeError(
            "llama.cpp verification needs llama-cpp-python: pip install 'distill[gguf]' "
            "(it compiles llama.cpp; a few minutes)"
        ) from err
    # n_threads_batch too: llama-cpp-python otherwise prefills with every core, whatever n_threads.
    return Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        logits_all=True,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
    )


def llama_cpp_nll(llm, blocks: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``blocks`` ([n, seq] ids) and the count of
    predicted tokens, as llama.cpp computes the logits."""
    import numpy as np

    total, count = 0.0, 0
    for block in blocks.tolist():
        llm.reset()
        llm.eval(block)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(block) - 1], dtype=np.float32))
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(block[1:])
        total -= logprobs.gather(-1, targets[:, None]).sum().item()
        count += len(block) - 1
    return total, count


def llama_cpp_generation(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the other ``new_tokens - 1``) of greedy
    generation in llama.cpp from ``prompt`` (token ids), prefill included in the first."""
    # reset() empties the KV cache first: generate() would otherwise reuse the cached prompt of
    # the previous run and skip the prefill that the first token's time measures.
    llm.reset()
    start = time.perf_counter()
    steps = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    next(steps)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(steps)
    rest_s = time.perf_counter() - start
    steps.close()
    return first_s, rest_s


def llama_cpp_speed(gguf_path: str | Path, prompt: list[int], new_tokens: int) -> dict:
    """Generation speed of a GGUF file as llama.cpp serves it, with the keys of
    :func:`distill.runtime.evaluate.generation_speed` (after a warm-up run)."""
    llm = llama_cpp_model(gguf_path, n_ctx=len(prompt) + new_tokens + 8)
    try:
        llama_cpp_generation(llm, prompt, min(8, new_tokens))
        first_s, rest_s = llama_cpp_generation(llm, prompt, new_tokens)
    finally:
        llm.close()
    return {
        "tokens_per_s": new_tokens / (first_s + rest_s),
        "time_to_first_token_s": first_s,
        "new_tokens": new_tokens,
        "peak_mem_bytes": None,  # llama.cpp allocates outside torch, in this process
        "peak_mem_kind": None,
        "device": "cpu",
        "runtime": "llama.cpp",
    }


VERIFY_TEXT = "def f(x):\n    return x  # ünïcode 🚀\n\n\t  spaces   and\ttabs\n"
"""Code, unicode and whitespace runs: where tokenizers written into another format diverge."""


def verify_export(result: ExportResult, new_tokens: int = 16) -> dict:
    """Load the export through its runtime(s), compare tokenization with the source model's
    tokenizer on ``VERIFY_TEXT`` and generate greedily; a RecipeError if the tokens differ."""
    from transformers import AutoTokenizer

    source_ids = AutoTokenizer.from_pretrained(result.source)(VERIFY_TEXT)["input_ids"]
    model, tokenizer = load_exported(result)
    ids = tokenizer(VERIFY_TEXT)["input_ids"]
    if ids != source_ids:
        raise RecipeError(f"{result.path}: transformers tokenizes differently from {result.source}")
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    report = {"transformers": {"generated": tokenizer.decode(out[0, len(ids) :])}}
    if result.format.startswith("gguf-"):
        try:
            llm = llama_cpp_model(result.path)
        except RecipeError as err:
            report["llama_cpp"] = {"skipped": str(err)}
            return report
        try:
            cpp_ids = llm.tokenize(VERIFY_TEXT.encode(), add_bos=False, special=False)
            if cpp_ids != source_ids:
                raise RecipeError(
                    f"{result.path}: llama.cpp tokenizes differently from {result.source}"
                )
            cpp_out = llm(VERIFY_TEXT, max_tokens=new_tokens, temperature=0.0)
        finally:
            llm.close()
        report["llama_cpp"] = {"generated": cpp_out["choices"][0]["text"]}
    return report
