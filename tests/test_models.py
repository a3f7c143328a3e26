"""Model loading and the teacher/student compatibility checks."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.config import ModelSpec, TokenizerTrainSpec
from distill.data.tokenizer import train_tokenizer
from distill.errors import RecipeError
from distill.models import (
    build_model,
    check_head_covers_tokenizer,
    check_same_tokenizer,
    check_seq_len,
    count_params,
    load_pretrained,
)

TEXTS = [f"for i in range({i}):\n    print(i, 'x{i}')\n" * 10 for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, TokenizerTrainSpec(vocab_size=300, min_frequency=1))


def tiny(vocab, **kw):
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def test_build_from_config_is_seeded_and_sized(tok):
    spec = ModelSpec(
        config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        }
    )
    a = build_model(spec, tok, seed=1, what="student")
    b = build_model(spec, tok, seed=1, what="student")
    assert a.config.vocab_size == len(tok)
    assert a.config.eos_token_id == tok.eos_token_id
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_bad_config_field_is_clear(tok):
    spec = ModelSpec(config={"model_type": "no-such-arch"})
    with pytest.raises(RecipeError, match="models.student.config"):
        build_model(spec, tok, seed=0, what="student")


def test_load_local_dir_and_dtype(tmp_path, tok):
    model = tiny(len(tok))
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(str(tmp_path / "m"), "teacher", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert count_params(loaded) == count_params(model)


def test_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(RecipeError, match="no config.json"):
        load_pretrained(str(tmp_path / "m"), "teacher")


def test_corrupt_weights_are_clear(tmp_path, tok):
    model = tiny(len(tok))
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RecipeError, match="missing or corrupt"):
        load_pretrained(str(tmp_path / "m"), "teacher")


def test_same_tokenizer_passes(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    check_same_tokenizer(tok, AutoTokenizer.from_pretrained(tmp_path), "a", "b")


def test_different_tokenizer_is_refused(tok):
    other = train_tokenizer(
        ["completely different text " * 50] * 10,
        TokenizerTrainSpec(vocab_size=280, min_frequency=1),
    )
    with pytest.raises(RecipeError, match="tokenizer mismatch.*shared tokenizer"):
        check_same_tokenizer(tok, other, "teacher", "student")


def test_padded_head_is_fine_but_short_head_is_not(tok):
    check_head_covers_tokenizer(tiny(len(tok) + 64), tok, "teacher")  # Qwen-style padding
    with pytest.raises(RecipeError, match="lm_head has .* rows but the tokenizer has"):
        check_head_covers_tokenizer(tiny(len(tok) - 10), tok, "student")


def test_sequence_longer_than_model():
    with pytest.raises(RecipeError, match="max_position_embeddings=64"):
        check_seq_len(tiny(300), 128, "student")
