import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
# One intra-op thread per process: the tests start many small processes on 2 cores, where
# oversubscribed thread pools cost more than they give (about 3x on the multi-process tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A scaled-down quickstart: same stages and models shape, a fraction of the data and steps.
TINY = [
    "data.max_documents=120",
    "data.seq_len=64",
    "data.eval_max_blocks=48",
    "tokenizer.train.vocab_size=512",
    "models.teacher.config.max_position_embeddings=64",
    "models.student.config.max_position_embeddings=64",
    "train.batch_size=16",
    "train.log_every=10",
    "train.save_every=0",
    "train.precision=fp32",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"output_dir={tmp_path / 'run'}"]


def run_cli(*args, env=None, check=True, timeout=900, cwd=None):
    """Run the real `distill` command in a fresh process."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "distill", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"distill {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


def cli_here(*args, env=None, check=True):
    """`distill *args` in this process (a fresh process costs ~3 s of imports), with `run_cli`'s
    result: `returncode`, `stdout`, `stderr`. For tests about what a command does, not about the
    process (signals, kills, launchers keep `run_cli`/`start_cli`). `env` holds for this call."""
    import contextlib
    import io
    import subprocess

    from distill.cli import main

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        patch.chdir(ROOT)  # as run_cli: relative paths in a recipe are from the repo root
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code if isinstance(stop.code, int) else 1
    proc = subprocess.CompletedProcess(["distill", *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(
            f"distill {' '.join(argv)} exited {code}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


def start_cli(*args, env=None, text=False):
    """Start the real `distill` command in the background (to signal or kill it mid-run)."""
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "distill", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
    )


def tiny_recipe(path: Path, stages: list[dict] | None = None, **top) -> Path:
    """A recipe small enough for a test to run many times: 2-layer models, vocab 320, 32 tokens."""
    import yaml

    recipe = {
        "name": "tiny",
        "output_dir": str(path.parent / "run"),
        "seed": 0,
        "data": {"stdlib": True, "max_documents": 12, "seq_len": 32, "eval_max_blocks": 8},
        "tokenizer": {"source": "train", "train": {"vocab_size": 320}},
        "models": {
            "teacher": {
                "config": {
                    "model_type": "llama",
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "intermediate_size": 128,
                    "max_position_embeddings": 32,
                }
            },
            "student": {
                "config": {
                    "model_type": "llama",
                    "hidden_size": 32,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "intermediate_size": 64,
                    "max_position_embeddings": 32,
                }
            },
        },
        "train": {
            "batch_size": 4,
            "lr": 3e-3,
            "log_every": 1,
            "save_every": 0,
            "precision": "fp32",
        },
        "eval": {"batch_size": 8},
        "stages": stages
        or [
            {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 12}},
            {
                "name": "distilled",
                "kind": "distill",
                "model": "student",
                "teacher": "teacher",
                "train": {"max_steps": 12},
            },
        ],
    }
    recipe.update(top)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def losses_by_step(metrics_path: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run logs recomputed steps again)."""
    import json

    out = {}
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def all_rows(metrics_path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


def same_weights(dir_a: Path, dir_b: Path) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# --- tiny models with the quickstart's byte-level BPE, for the export tests ----------------------

# Code, unicode and whitespace runs: what a tokenizer written into another format must keep.
SHIP_TEXT = (
    'def área(r: float) -> float:\n    """Zone 🚀 日本語 — naïve café."""\n'
    "\treturn  3.14159 * r ** 2   # two  spaces,\ttab\n\n\n    \n"
    "x = [1, 22, 333, 4444]; y = {'k': \"v\"}  \r\n  émoji: 😶‍🌫️ ✅ 🦙🦙  Ελληνικά  нещо\n"
    "I've been 'told he's there, 'RE you sure?   \n\n"
)


@pytest.fixture(scope="session")
def ship_tokenizer():
    """A byte-level BPE trained as the quickstart trains its own (distill.data.train_tokenizer)."""
    from distill.config import DataSpec, TokenizerTrainSpec
    from distill.data.documents import load_documents
    from distill.data.tokenizer import train_tokenizer

    docs = load_documents(DataSpec(stdlib=True, max_documents=40))
    texts = [text for _, text in docs] + [SHIP_TEXT] * 3
    return train_tokenizer(texts, TokenizerTrainSpec(vocab_size=400, min_frequency=2))


def tiny_causal_lm(model_type: str, tokenizer, seed: int = 0, **fields):
    """A 2-layer model of `model_type` (llama, mistral, qwen2, qwen3) with GQA, from a config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    config = AutoConfig.for_model(model_type, **{**shape, **fields})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory, ship_tokenizer):
    """A tiny Llama trained for a few steps on stdlib text (weights shaped by training), saved."""
    import torch

    from distill.config import DataSpec
    from distill.data.blocks import pack_documents
    from distill.data.documents import load_documents

    model = tiny_causal_lm("llama", ship_tokenizer).train()
    docs = load_documents(DataSpec(stdlib=True, max_documents=40))
    blocks = pack_documents([t for _, t in docs], ship_tokenizer, 64, "train")[:64]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        batch = blocks[torch.randint(len(blocks), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("trained") / "model"
    model.eval().save_pretrained(out)
    ship_tokenizer.save_pretrained(out)
    return out
