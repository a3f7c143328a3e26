"""GGUF exports: gguf's reader sees llama.cpp's tensor names, types and metadata (the Llama q/k rows
interleaved as its converter writes them); transformers' GGUF loader computes exactly what the
model fake-quantized on the same grid computes and tokenizes as the source model; llama.cpp (with
llama-cpp-python installed) tokenizes identically and its logits and perplexity match."""

import copy
import importlib.util
import json

import pytest
import torch

from distill.compress.export import (
    VERIFY_TEXT,
    export_model,
    llama_cpp_model,
    llama_cpp_nll,
    load_exported,
)
from distill.compress.grids import target_grid

from conftest import SHIP_TEXT, tiny_causal_lm

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
KINDS = ["f32", "f16", "bf16", "q8_0", "q4_0"]
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'distill[gguf]')",
)


def saved(tmp_path, tokenizer, model_type, **fields):
    model = tiny_causal_lm(model_type, tokenizer, seed=2, **fields)
    path = tmp_path / f"tiny-{model_type}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


def as_served(model, kind: str, embeddings: str):
    """``model`` with every matrix rounded as the GGUF file stores it (norms stay float32)."""
    grids = {k: target_grid(f"gguf-{k}") for k in ("q8_0", "q4_0")}
    casts = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    model = copy.deepcopy(model)
    seen = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2 or id(weight) in seen:
                continue
            seen.add(id(weight))  # a tied lm_head is the embedding, rounded once
            target = embeddings if name in ("lm_head", "model.embed_tokens") else kind
            if target in grids:
                weight.copy_(grids[target].fake_quantize(weight))
            else:
                weight.copy_(weight.to(casts[target]).float())
    return model


@pytest.fixture
def ids(ship_tokenizer):
    return torch.tensor([ship_tokenizer(SHIP_TEXT)["input_ids"][:96]])


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loader_computes_the_grid(tmp_path, ship_tokenizer, ids, model_type, kind):
    model, path = saved(tmp_path, ship_tokenizer, model_type)
    result = export_model(path, tmp_path / "gguf", f"gguf-{kind}")
    loaded, _ = load_exported(result)
    embeddings = "q8_0" if kind in ("q8_0", "q4_0") else kind
    with torch.no_grad():
        expected = as_served(model, kind, embeddings)(ids).logits
        got = loaded(ids).logits
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
        generated = loaded.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 16)


def test_reader_sees_llama_cpp_names_types_and_metadata(tmp_path, ship_tokenizer):
    import gguf

    model, path = saved(tmp_path, ship_tokenizer, "llama")
    result = export_model(path, tmp_path / "gguf", "gguf-q4_0")
    reader = gguf.GGUFReader(result.path)

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field("llama.block_count") == 2
    assert field("llama.attention.head_count") == 4
    assert field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 16
    assert field("llama.context_length") == 128
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == len(ship_tokenizer) and tokens[0] == "<|endoftext|>"
    assert field("tokenizer.ggml.token_type")[:2] == [gguf.TokenType.CONTROL] * 2
    merges = json.loads(ship_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert field("tokenizer.ggml.bos_token_id") == ship_tokenizer.bos_token_id
    assert field("tokenizer.ggml.eos_token_id") == ship_tokenizer.eos_token_id
    assert field("tokenizer.ggml.padding_token_id") == ship_tokenizer.pad_token_id
    assert field("tokenizer.ggml.add_bos_token") is False

    types = {t.name: t.tensor_type.name for t in reader.tensors}
    blocks = {
        f"blk.{i}.{n}.weight"
        for i in range(2)
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    }
    norms = {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "ffn_norm")}
    assert set(types) == blocks | norms | {
        "token_embd.weight",
        "output.weight",
        "output_norm.weight",
    }
    assert {types[n] for n in blocks} == {"Q4_0"}
    assert {types[n] for n in norms | {"output_norm.weight"}} == {"F32"}
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert result.linear_bytes_ratio <= 0.3


def test_llama_q_k_rows_are_interleaved_per_head(tmp_path, ship_tokenizer):
    """llama.cpp's Llama rotates adjacent pairs: within a head, row i of each half of HF's layout
    lands at 2i and 2i + 1 (k uses the KV head count)."""
    import gguf

    model, path = saved(tmp_path, ship_tokenizer, "llama")
    result = export_model(path, tmp_path / "gguf", "gguf-f32")
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(result.path).tensors}
    attn = model.model.layers[0].self_attn
    for gguf_name, weight, heads in [
        ("blk.0.attn_q.weight", attn.q_proj.weight, 4),
        ("blk.0.attn_k.weight", attn.k_proj.weight, 2),
    ]:
        rows = weight.detach().reshape(heads, 2, 8, 64)
        interleaved = torch.stack([rows[:, 0], rows[:, 1]], dim=2).reshape(-1, 64)
        assert torch.equal(stored[gguf_name], interleaved)
    assert torch.equal(stored["blk.0.attn_v.weight"], attn.v_proj.weight.detach())


def test_tied_embeddings_write_no_output_tensor(tmp_path, ship_tokenizer, ids):
    import gguf

    model, path = saved(tmp_path, ship_tokenizer, "qwen2", tie_word_embeddings=True)
    result = export_model(path, tmp_path / "gguf", "gguf-q4_0", embeddings="f16")
    names = {t.name for t in gguf.GGUFReader(result.path).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    loaded, _ = load_exported(result)
    assert loaded.config.tie_word_embeddings
    with torch.no_grad():
        expected = as_served(model, "q4_0", "f16")(ids).logits
        assert torch.allclose(loaded(ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_tokenizer_in_the_gguf_tokenizes_as_the_source(tmp_path, ship_tokenizer, model_type):
    from transformers import AutoTokenizer

    _, path = saved(tmp_path, ship_tokenizer, model_type)
    result = export_model(path, tmp_path / "gguf", "gguf-q8_0")
    source = AutoTokenizer.from_pretrained(path)
    _, from_gguf = load_exported(result)
    for text in (SHIP_TEXT, VERIFY_TEXT, "  leading spaces\n\n\n\ttabs\t\t", "<|endoftext|>x"):
        assert from_gguf(text)["input_ids"] == source(text)["input_ids"]
        assert from_gguf.decode(from_gguf(text)["input_ids"]) == text


@needs_llama_cpp
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind", ["f32", "q4_0"])
def test_llama_cpp_tokenizes_and_computes_as_transformers(
    tmp_path, ship_tokenizer, model_type, kind
):
    from transformers import AutoTokenizer

    _, path = saved(tmp_path, ship_tokenizer, model_type)
    result = export_model(path, tmp_path / "gguf", f"gguf-{kind}")
    source = AutoTokenizer.from_pretrained(path)
    llm = llama_cpp_model(result.path, n_threads=1)
    try:
        for text in (SHIP_TEXT, VERIFY_TEXT, "  leading spaces\n\n\n\ttabs\t\t"):
            tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert tokens == source(text)["input_ids"]
            assert llm.detokenize(tokens).decode() == text
        blocks = torch.tensor([source(SHIP_TEXT)["input_ids"][:96]])
        nll, count = llama_cpp_nll(llm, blocks)
    finally:
        llm.close()
    loaded, _ = load_exported(result)
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded(blocks).logits[0, :-1].double(), dim=-1)
    reference = -logprobs.gather(-1, blocks[0, 1:, None]).sum().item()
    # llama.cpp computes Q4_0 matmuls with activations rounded to 8 bits: close, not equal.
    assert nll / count == pytest.approx(reference / count, rel=1e-5 if kind == "f32" else 1e-3)
