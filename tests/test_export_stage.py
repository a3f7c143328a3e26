"""`qat` on a target's grid, then an `export` stage: each exported file, measured through its
runtime, keeps the perplexity its qat stage measured with fake quantization (the export rounds
on the same grid), and the file exported onto the other grid is recorded beside it. Schemes a
target cannot hold fail `distill check` with the supported choice named."""

import importlib.util
import json

import pytest

from conftest import cli_here, tiny_recipe

STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 12}},
    {
        "name": "qat-q4_0",
        "kind": "qat",
        "model": "teacher",
        "quant": {"target": "gguf-q4_0"},
        "train": {"max_steps": 4, "lr": 1e-3},
    },
    {
        "name": "ship-q4_0",
        "kind": "export",
        "model": "qat-q4_0",
        "formats": ["gguf-q4_0", "ct-w4a16"],
        "embeddings": "f16",
    },
    {
        "name": "qat-ct",
        "kind": "qat",
        "model": "teacher",
        "quant": {"target": "compressed-tensors", "group_size": 32},
        "train": {"max_steps": 4, "lr": 1e-3},
    },
    {"name": "ship-ct", "kind": "export", "model": "qat-ct", "formats": ["ct-w4a16"]},
]


def test_exports_keep_the_qat_perplexity_through_each_runtime(tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", STAGES, eval={"latency": True, "latency_tokens": 4})
    cli_here("run", recipe)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    by_name = {e["name"]: e for e in summary}
    assert by_name["qat-q4_0"]["scheme"] == "gguf-q4_0"
    assert by_name["qat-ct"]["scheme"] == "ct-int4-g32"

    q4, ct_from_q4 = by_name["ship-q4_0"]["exports"]
    assert q4["grid"] == q4["trained_grid"] == "gguf-q4_0"
    assert ct_from_q4["grid"] == "ct-int4-g32" and ct_from_q4["trained_grid"] == "gguf-q4_0"
    qat_ppl = by_name["qat-q4_0"]["eval"]["perplexity"]
    for runtime in q4["runtimes"].values():
        assert runtime["perplexity"] == pytest.approx(qat_ppl, rel=3e-3)
    assert q4["linear_bytes_ratio"] <= 0.3 and ct_from_q4["linear_bytes_ratio"] <= 0.3

    (ct,) = by_name["ship-ct"]["exports"]
    assert ct["grid"] == ct["trained_grid"] == "ct-int4-g32"
    ct_ppl = ct["runtimes"]["transformers"]["perplexity"]
    assert ct_ppl == pytest.approx(by_name["qat-ct"]["eval"]["perplexity"], rel=3e-3)

    # a GGUF file's speed is llama.cpp's, where it is installed; everything else's is torch's
    speed = by_name["ship-q4_0"]["metrics"]["speed"]
    assert speed["tokens_per_s"] > 0 and speed["time_to_first_token_s"] > 0
    assert speed.get("runtime") == ("llama.cpp" if importlib.util.find_spec("llama_cpp") else None)
    assert "runtime" not in by_name["ship-ct"]["metrics"]["speed"]

    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        "ship-q4_0: ct-w4a16 on grid ct-int4-g32 (trained on gguf-q4_0) through transformers"
        in report
    )


@pytest.mark.parametrize(
    "quant, message",
    [
        ({"target": "gguf-q4_0", "group_size": 64}, "use group_size 32"),
        ({"target": "gguf-q4_0", "bits": 3}, r"use gguf-q4_0 \(4 bits\)"),
        ({"target": "compressed-tensors", "symmetric": False}, "symmetric only"),
        ({"target": "compressed-tensors", "group_size": 256}, "nearest: 128"),
        ({"target": "gguf-q8_0", "activations": "int8_dynamic"}, "remove `activations`"),
    ],
)
def test_schemes_a_target_cannot_hold_fail_the_check(tmp_path, quant, message):
    import re

    stages = [{"name": "ptq", "kind": "ptq", "model": "student", "quant": quant}]
    proc = cli_here("check", tiny_recipe(tmp_path / "r.yaml", stages), check=False)
    assert proc.returncode == 2
    assert re.search(message, proc.stderr), proc.stderr


def test_export_stage_formats_are_checked_at_load(tmp_path):
    stages = [
        {"name": "teacher", "kind": "train", "model": "teacher"},
        {"name": "ship", "kind": "export", "model": "teacher", "formats": ["gguf-q5_k"]},
        {"name": "again", "kind": "train", "model": "ship"},
    ]
    proc = cli_here("check", tiny_recipe(tmp_path / "r.yaml", stages), check=False)
    assert proc.returncode == 2 and "unknown formats ['gguf-q5_k']" in proc.stderr
    stages[1]["formats"] = ["gguf-q4_0"]
    proc = cli_here("check", tiny_recipe(tmp_path / "r.yaml", stages), check=False)
    assert proc.returncode == 2 and "'ship' is an `export` stage" in proc.stderr
