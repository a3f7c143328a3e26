"""`distill export` through the real command: an export that works end to end with --verify, and
every scheme, option or model a format cannot hold stops with exit 2 and a message naming the
supported choice, before anything is written."""

import json

import pytest

from distill.compress.export import trained_grid_name

from conftest import cli_here, run_cli, tiny_causal_lm


@pytest.fixture
def model_dir(tmp_path, ship_tokenizer):
    path = tmp_path / "model"
    tiny_causal_lm("llama", ship_tokenizer).save_pretrained(path)
    ship_tokenizer.save_pretrained(path)
    return path


def test_export_and_verify(tmp_path, model_dir):
    proc = run_cli("export", model_dir, "--format", "gguf-q4_0", "--verify")
    report = json.loads(proc.stdout)
    assert report["path"] == str(tmp_path / "model-gguf-q4_0" / "model-Q4_0.gguf")
    assert report["grid"] == "gguf-q4_0" and report["linear_bytes_ratio"] <= 0.3
    assert report["size_bytes"] > 0 and report["verify"]["transformers"]["generated"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "gguf-q5_k"], "supported are safetensors-bf16"),
        (["--format", "gguf-q4_0", "--group-size", "64"], "use group_size 32"),
        (["--format", "ct-w4a16", "--group-size", "256"], "nearest: 128"),
        (["--format", "ct-w4a16", "--group-size", "128"], r"in_features 64 .* use group_size 32"),
        (["--format", "ct-w4a16", "--embeddings", "f16"], "GGUF formats only"),
        (["--format", "gguf-q8_0", "--embeddings", "q4_0"], "supported are q8_0, f16"),
        (["--format", "safetensors-bf16", "--group-size", "32"], "quantized formats"),
    ],
)
def test_bad_options_exit_2_naming_the_choice(tmp_path, model_dir, args, message):
    import re

    proc = cli_here("export", model_dir, *args, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("distill: error: ")
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_and_unaligned_widths(tmp_path, ship_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(
        gpt2
    )
    ship_tokenizer.save_pretrained(gpt2)
    proc = cli_here("export", gpt2, "--format", "gguf-q8_0", "--out", tmp_path / "o1", check=False)
    assert proc.returncode == 2
    assert "architecture GPT2LMHeadModel is not written here; supported: " in proc.stderr

    pruned = tmp_path / "pruned"  # a 25 % MLP prune of 352 channels leaves 264
    tiny_causal_lm("llama", ship_tokenizer, intermediate_size=264).save_pretrained(pruned)
    ship_tokenizer.save_pretrained(pruned)
    proc = cli_here(
        "export", pruned, "--format", "gguf-q4_0", "--out", tmp_path / "o2", check=False
    )
    assert proc.returncode == 2
    assert "rows of 264" in proc.stderr and "prune.multiple_of: 32" in proc.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_trained_grid_is_read_from_the_stage_scheme(tmp_path):
    (tmp_path / "distill_quant.json").write_text(
        json.dumps({"bits": 4, "group_size": 32, "symmetric": True, "target": "gguf-q4_0"})
    )
    assert trained_grid_name(tmp_path) == "gguf-q4_0"
    (tmp_path / "distill_quant.json").write_text(
        json.dumps({"bits": 4, "group_size": None, "symmetric": False})
    )
    assert trained_grid_name(tmp_path) == "int4-pc-asym"
