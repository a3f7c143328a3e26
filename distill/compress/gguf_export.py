"""GGUF files for llama.cpp (and what builds on it: Ollama, LM Studio), written with the ``gguf``
package as llama.cpp's own ``convert_hf_to_gguf.py`` writes them.

Tensor names come from ``gguf.get_tensor_name_map``, metadata keys from ``GGUFWriter``'s helpers,
quantization from ``gguf.quants`` (whose Q4_0/Q8_0 are bit-exact with llama.cpp's reference
quantizer, and which ``distill.compress.grids`` reproduces for training). Types follow the
converter: 1-d tensors and norms in F32, the other matrices in the file's type, the token
embeddings and output head in ``embeddings`` (Q8_0 by default for Q4_0/Q8_0 files). Scaled RoPE
(``llama3``, ``linear``) is written as the converter writes it (``distill.compress.gguf_rope``).

The tokenizer goes into the file: byte-level BPE with GPT-2's pre-tokenization, named ``gpt-2``
(the name llama.cpp knows it by; its converter recognises tokenizers by the hash of a test string's
ids, which a tokenizer trained here never matches), tokens, token types, merges and special ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.compress.gguf_rope import check_rope, write_rope
from distill.errors import RecipeError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp runs Mistral as llama, as its converter writes it
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
KINDS = ("f32", "f16", "bf16", "q8_0", "q4_0")
EMBEDDING_KINDS = ("q8_0", "f16")
BLOCK = 32


def gguf_architecture(config) -> str:
    """llama.cpp's architecture name for a transformers config, or a RecipeError (no work done)."""
    names = list(getattr(config, "architectures", None) or [])
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise RecipeError(
            f"GGUF export: architecture {', '.join(names) or config.model_type} is not written "
            f"here; supported: {', '.join(sorted(ARCHITECTURES))}. Export it as safetensors and "
            "use llama.cpp's convert_hf_to_gguf.py, or export compressed-tensors for vLLM"
        )
    check_rope(config, arch)
    return arch


def check_gguf_shapes(model, kind: str, embeddings: str) -> None:
    """Q4_0/Q8_0 rows are cut in blocks of 32: name the tensors whose width is not a multiple."""
    quantized = {kind} | {embeddings}
    if not quantized & {"q8_0", "q4_0"}:
        return
    bad = [
        (name, t.shape[-1])
        for name, t in model.state_dict().items()
        if t.dim() == 2 and t.shape[-1] % BLOCK
    ]
    if bad:
        name, width = bad[0]
        raise RecipeError(
            f"GGUF {kind}: {name} has rows of {width}, not a multiple of the {BLOCK}-weight blocks "
            f"of Q4_0/Q8_0 ({len(bad)} tensors); prune to a multiple of {BLOCK} "
            f"(prune.multiple_of: {BLOCK}) or export gguf-f16"
        )


def export_gguf(
    model,
    tokenizer_dir: str | Path,
    path: str | Path,
    kind: str,
    embeddings: str | None = None,
    model_dir: str | Path | None = None,
) -> Path:
    """Write ``model`` (a Llama/Mistral/Qwen2/Qwen3 causal LM) as one GGUF file of type ``kind``,
    with the tokenizer saved in ``tokenizer_dir``; ``model_dir`` (where the model was saved)
    names it in the file's metadata."""
    import gguf

    if kind not in KINDS:
        raise RecipeError(f"GGUF export: type {kind!r}; supported: {', '.join(KINDS)}")
    embeddings = embeddings or _default_embeddings(kind)
    if embeddings not in (*EMBEDDING_KINDS, kind):
        raise RecipeError(
            f"GGUF export: embeddings {embeddings!r}; supported: {', '.join(EMBEDDING_KINDS)}"
        )
    config = model.config
    arch = gguf_architecture(config)
    check_gguf_shapes(model, kind, embeddings)
    tokenizer, pre = _read_tokenizer(tokenizer_dir, config.vocab_size)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    source = Path(model_dir or tokenizer_dir).resolve()
    # A stage's weights live in <stage>/model: the stage name says more than "model".
    name = source.parent.name if source.name == "model" else source.name
    _write_hparams(writer, config, arch, kind, name)
    _write_tokenizer(writer, tokenizer, pre, tokenizer_dir, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    types = {k: getattr(gguf.GGMLQuantizationType, k.upper()) for k in KINDS}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RecipeError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} ({arch})")
        data = tensor.detach().to(torch.float32)
        if arch == "llama":
            data = _rope_rows_interleaved(data, hf_name, config)
        if data.dim() <= 1 or gguf_name.endswith("_norm.weight"):
            qtype = types["f32"]
        elif gguf_name in ("token_embd.weight", "output.weight"):
            qtype = types[embeddings]
        else:
            qtype = types[kind]
        writer.add_tensor(gguf_name, gguf.quants.quantize(data.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _default_embeddings(kind: str) -> str:
    return "q8_0" if kind in ("q8_0", "q4_0") else kind


def _rope_rows_interleaved(data: torch.Tensor, hf_name: str, config) -> torch.Tensor:
    """llama.cpp's LLAMA graph rotates adjacent pairs (x[2i], x[2i+1]); transformers' Llama rotates
    the two halves of each head (x[i], x[i + d/2]). The converter reorders q/k rows per head so row
    i of each half lands at 2i and 2i+1 (``LlamaModel.permute``); transformers' GGUF loader undoes
    it. Qwen2/Qwen3 run NEOX-style RoPE in llama.cpp, which is the halves layout: no reorder."""
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = config.num_attention_heads
    elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = config.num_key_value_heads
    else:
        return data
    rows = data.shape[0]
    return (
        data.reshape(heads, 2, rows // heads // 2, *data.shape[1:])
        .swapaxes(1, 2)
        .reshape(data.shape)
    )


def _write_hparams(writer, config, arch: str, kind: str, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    write_rope(writer, config, head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- the tokenizer -------------------------------------------------------------------------------


def _read_tokenizer(tokenizer_dir: str | Path, vocab_size: int):
    """The transformers tokenizer in ``tokenizer_dir`` and llama.cpp's name for its
    pre-tokenization, or a RecipeError if llama.cpp would split text differently."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre is None:
        found = f"model {model.get('type')}, pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))}"
        raise RecipeError(
            f"GGUF export: the tokenizer in {tokenizer_dir} ({found[:300]}) is not a byte-level "
            "BPE llama.cpp splits the same way (GPT-2's pre-tokenization, as `tokenizer.source: "
            "train` makes, or Qwen2's or Llama 3's); for another hub tokenizer use llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    if len(tokenizer) > vocab_size:
        raise RecipeError(
            f"GGUF export: the tokenizer has {len(tokenizer)} tokens but the model {vocab_size} "
            "embedding rows"
        )
    return tokenizer, pre


def _pre_tokenizer_name(pre: dict) -> str | None:
    """``gpt-2`` for a plain byte-level split; for a regex split then byte-level (Qwen2, Llama 3),
    the llama.cpp name transformers' GGUF loader maps back to the same regex."""
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True):
        return None
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    regex = (split.get("pattern") or {}).get("Regex")
    # The first name of each regex in that table is the one llama.cpp's converter writes.
    return next((name for name, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)


def _write_tokenizer(writer, tokenizer, pre: str, tokenizer_dir: str | Path, rows: int) -> None:
    """Tokens, types, merges and special ids as the converter's ``_set_vocab_gpt2`` writes them;
    ``rows`` is the model's embedding rows (rows past the tokenizer become unused pad tokens)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)  # "gpt-2", not "gpt2": llama.cpp refuses names it does not know
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=rows)
    # Say whether BOS/EOS are added, as the tokenizer does: llama.cpp otherwise uses its defaults.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token.setdefault("bos", ids[:1] == [tokenizer.bos_token_id])
    special.add_special_token.setdefault("eos", ids[-1:] == [tokenizer.eos_token_id])
    special.add_to_gguf(writer, quiet=True)


def quantized_bytes_ratio(path: str | Path, kind: str) -> float:
    """Bytes on disk of the file's ``kind`` (e.g. Q4_0) tensors over their bf16 bytes, read back
    with ``gguf.GGUFReader``."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    tensors = [t for t in gguf.GGUFReader(path).tensors if t.tensor_type == qtype]
    if not tensors:
        raise RecipeError(f"{path}: no {kind} tensors")
    return sum(int(t.n_bytes) for t in tensors) / sum(2 * int(t.n_elements) for t in tensors)
