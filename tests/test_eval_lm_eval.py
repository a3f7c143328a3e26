"""lm-eval through distill equals the `lm_eval` command line on the same model directory and the
shipped local task; and every stage output format is loaded by its row of the artifact table."""

import json
import os
import subprocess
import sys

import pytest
import torch

from distill.config import LmEvalSpec
from distill.models import load_pretrained, load_tokenizer
from distill.run.artifacts import load_artifact
from distill.runtime.lm_eval_tasks import lm_eval_scores
from distill.specs import QuantSpec
from distill.tasks import TASKS_DIR

from conftest import ROOT

LIMIT = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import DataSpec, TokenizerTrainSpec
    from distill.data.documents import load_documents
    from distill.data.tokenizer import train_tokenizer

    texts = [text for _, text in load_documents(DataSpec(stdlib=True, max_documents=20))]
    tokenizer = train_tokenizer(texts, TokenizerTrainSpec(vocab_size=320))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    out = tmp_path_factory.mktemp("lm_eval") / "model"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cli_scores(model_dir, out_dir) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    args = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32,max_length=64",
        "--tasks", "stdlib_docstrings", "--include_path", str(TASKS_DIR),
        "--limit", str(LIMIT), "--batch_size", "4", "--device", "cpu",
        "--output_path", str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results,) = out_dir.rglob("results_*.json")
    return json.loads(results.read_text())["results"]["stdlib_docstrings"]


def test_distill_scores_equal_the_lm_eval_command_line(model_dir, tmp_path):
    cli = _cli_scores(model_dir, tmp_path / "cli")
    ours = lm_eval_scores(
        load_pretrained(str(model_dir), what="model"),
        load_tokenizer(str(model_dir), "tokenizer"),
        LmEvalSpec(tasks=["stdlib_docstrings"], limit=LIMIT, batch_size=4),
        max_length=64,
        device="cpu",
    )
    assert ours == {
        "stdlib_docstrings/acc": cli["acc,none"],
        "stdlib_docstrings/acc_norm": cli["acc_norm,none"],
    }


def test_unknown_task_names_the_folders(model_dir):
    with pytest.raises(Exception, match="not found in lm-eval's tasks nor in"):
        lm_eval_scores(
            load_pretrained(str(model_dir), what="model"),
            load_tokenizer(str(model_dir), "tokenizer"),
            LmEvalSpec(tasks=["no_such_task_anywhere"], limit=1, include_path=[str(model_dir)]),
            max_length=64,
            device="cpu",
        )


def test_artifact_table_loads_each_format(model_dir, tmp_path):
    import shutil

    plain = load_artifact(model_dir)
    assert plain.format == "transformers" and plain.scheme is None
    fake = tmp_path / "fake"
    shutil.copytree(model_dir, fake)
    scheme = QuantSpec(bits=4, group_size=32)
    (fake / "distill_quant.json").write_text(scheme.model_dump_json())
    loaded = load_artifact(fake)
    assert loaded.format == "fake-quant" and loaded.scheme == scheme.name()
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert not torch.equal(loaded.model(ids).logits, plain.model(ids).logits)
    with pytest.raises(Exception, match="not a model directory distill can evaluate"):
        load_artifact(tmp_path)


def test_quantized_artifacts_score_through_lm_eval(model_dir, tmp_path):
    from distill.compress.export import export_model

    tokenizer = load_tokenizer(str(model_dir), "tokenizer")
    export_model(model_dir, tmp_path / "int4", "ct-w4a16", 32)
    packed = load_artifact(tmp_path / "int4")
    assert packed.format == "compressed-tensors"
    spec = LmEvalSpec(tasks=["stdlib_docstrings"], limit=4, batch_size=4)
    scores = lm_eval_scores(packed.model, tokenizer, spec, max_length=64, device="cpu")
    assert 0 <= scores["stdlib_docstrings/acc"] <= 1
