"""Scaled RoPE in GGUF exports, as llama.cpp's convert_hf_to_gguf.py writes it: Llama 3's
``llama3`` as a ``rope_freqs`` tensor of per-frequency factors, ``linear`` as scaling metadata.
llama.cpp (with llama-cpp-python installed) then computes transformers' logits on a sequence past
the original context, and clearly not the unscaled model's; other scalings are refused by name."""

import importlib.util

import numpy as np
import pytest
import torch

from distill.compress.export import export_model, load_exported
from distill.compress.gguf_export import gguf_architecture
from distill.errors import RecipeError

from conftest import SHIP_TEXT, run_cli, tiny_causal_lm

# head_dim 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, 199, ... against bands at 64/4 = 16 and
# 64/1 = 64, so one frequency is kept, two are smoothed and five divided by 8. (2*pi is the
# shortest wavelength there is: an original context of 16 would leave the first band empty.)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
SEQ = 96  # past the original 64 positions; the models' context is 128
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'distill[gguf]')",
)


def scaled_and_plain(tmp_path, tokenizer, model_type, rope):
    """A tiny model with ``rope`` saved to disk, and the same weights with unscaled RoPE."""
    model = tiny_causal_lm(model_type, tokenizer, seed=2, rope_parameters=rope)
    plain = tiny_causal_lm(model_type, tokenizer, seed=2)
    plain.load_state_dict(model.state_dict())
    path = tmp_path / f"tiny-{model_type}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, plain, path


@pytest.fixture
def ids(ship_tokenizer):
    ids = ship_tokenizer(SHIP_TEXT)["input_ids"][:SEQ]
    assert len(ids) == SEQ
    return ids


def fields_and_tensors(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if ".rope." in k}
    return fields, {t.name: t for t in reader.tensors}, [t.name for t in reader.tensors]


def test_llama3_writes_rope_freqs_as_transformers_scales(tmp_path, ship_tokenizer):
    model, plain, path = scaled_and_plain(tmp_path, ship_tokenizer, "llama", LLAMA3)
    result = export_model(path, tmp_path / "gguf", "gguf-f16")
    fields, tensors, order = fields_and_tensors(result.path)
    # The converter writes no scaling keys for llama3, and the factors tensor first, in F32.
    assert fields == {"llama.rope.freq_base": 10000.0, "llama.rope.dimension_count": 16}
    assert order[0] == "rope_freqs.weight"
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32" and list(freqs.shape) == [8]
    implied = plain.model.rotary_emb.inv_freq / model.model.rotary_emb.inv_freq
    stored = torch.from_numpy(freqs.data.copy())
    assert torch.allclose(stored, implied, rtol=1e-6, atol=0)
    assert stored[0] == 1 and 1 < stored[1] < stored[2] < 8 and set(stored[3:].tolist()) == {8.0}


def test_linear_writes_scaling_type_and_factor(tmp_path, ship_tokenizer):
    _, _, path = scaled_and_plain(tmp_path, ship_tokenizer, "llama", LINEAR)
    fields, tensors, _ = fields_and_tensors(export_model(path, tmp_path / "g", "gguf-f32").path)
    assert fields["llama.rope.scaling.type"] == "linear"
    assert fields["llama.rope.scaling.factor"] == 4.0
    assert "rope_freqs.weight" not in tensors


@needs_llama_cpp
@pytest.mark.parametrize(
    "model_type, rope",
    [
        ("llama", LLAMA3),
        ("mistral", LLAMA3),
        ("llama", LINEAR),
        ("qwen2", LINEAR),
        ("qwen3", LINEAR),
    ],
)
def test_llama_cpp_computes_the_scaled_rope(tmp_path, ship_tokenizer, ids, model_type, rope):
    from llama_cpp import GGML_TYPE_F32, Llama

    model, plain, path = scaled_and_plain(tmp_path, ship_tokenizer, model_type, rope)
    result = export_model(path, tmp_path / "gguf", "gguf-f32")
    # An F32 KV cache (llama.cpp's default is F16): both sides then compute in float32 throughout.
    llm = Llama(
        model_path=result.path,
        n_ctx=0,
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    try:
        llm.eval(ids)
        cpp = torch.from_numpy(np.asarray(llm.scores[:SEQ], dtype=np.float32))
    finally:
        llm.close()
    x = torch.tensor([ids])
    with torch.no_grad():
        scaled, unscaled = model(x).logits[0], plain(x).logits[0]
        loaded = load_exported(result)[0](x).logits[0]
    # Float32 rounding differs by ~2e-7 on logits under 1 (measured); ignoring the scaling
    # moves them by 4e-3 or more here (measured 4e-3 to 0.57).
    assert (cpp - scaled).abs().max() < 1e-5
    assert (cpp - unscaled).abs().max() > 1e-3
    assert (loaded - scaled).abs().max() < 1e-5  # transformers' GGUF loader, with the file's RoPE


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_llama3_is_refused_where_llama_cpp_does_not_apply_it(ship_tokenizer, model_type):
    model = tiny_causal_lm(model_type, ship_tokenizer, rope_parameters=LLAMA3)
    config = model.config
    config.architectures = [type(model).__name__]  # as save_pretrained records it
    with pytest.raises(
        RecipeError,
        match=f"llama3' in a {model_type} model: llama.cpp's {model_type} graph takes no",
    ):
        gguf_architecture(config)


def test_other_rope_types_exit_2_naming_the_supported(tmp_path, ship_tokenizer):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    _, _, path = scaled_and_plain(tmp_path, ship_tokenizer, "llama", {**yarn, "rope_theta": 1e4})
    proc = run_cli("export", path, "--format", "gguf-f16", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("distill: error: ")
    assert "rope_type 'yarn'" in proc.stderr
    assert "llama3 (Llama, Mistral) and linear (Llama, Mistral, Qwen2, Qwen3)" in proc.stderr
    assert not (tmp_path / "out").exists()
