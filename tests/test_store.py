"""The token store: the blocks it yields are exactly those of packing the documents in memory
(across shard boundaries, for any number of tokenizer processes, streamed or not); it is rebuilt
when an input changes and only then; an interrupted build never looks complete; several
processes share one store; a copied store is used as it is; training resumes bitwise on it."""

import itertools
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from distill.data.blocks import pack_documents
from distill.data.documents import is_heldout
from distill.data.prepare import prepare_data
from distill.data.store import TokenStore
from distill.errors import RecipeError
from distill.recipe_file import load_recipe

from conftest import ROOT, cli_here, losses_by_step, run_cli, start_cli, tiny_recipe

TRAIN = [{"name": "student", "kind": "train", "model": "student", "train": {"max_steps": 8}}]


def corpus(root, n=60):
    """Text files of varied length (two of them empty), as a user's corpus would be."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n):
        text = "" if i in (7, 30) else f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 9)
        path = root / f"doc{i:03d}.txt"
        path.write_text(text)
        docs.append((str(path), text))
    return docs


def recipe_at(tmp_path, name="recipe.yaml", output_dir=None, **data):
    """A one-stage recipe on the corpus; `data` overrides its data section."""
    spec = {"files": [str(tmp_path / "corpus" / "*.txt")], "seq_len": 16, "eval_max_blocks": 6}
    spec.update(data)
    top = {"output_dir": output_dir} if output_dir else {}
    path = tiny_recipe(tmp_path / name, TRAIN, data=spec, **top)
    return path, load_recipe(path)


def prepare(recipe, out=None, logs=None):
    out = out or recipe.resolved_output_dir
    log = logs.append if logs is not None else (lambda message: None)
    return prepare_data(recipe, out, is_main=True, wait_for_everyone=lambda: None, log=log)


def reference_blocks(docs, tokenizer, spec):
    """What the in-memory packing always gave: split by hash, the last training document held
    out when none is, each split packed on its own, the first eval_max_blocks held-out blocks."""
    docs = [(doc_id, text) for doc_id, text in docs if text.strip()]
    train = [t for i, t in docs if not is_heldout(i, spec.eval_fraction)]
    held = [t for i, t in docs if is_heldout(i, spec.eval_fraction)]
    if not held:
        held.append(train.pop())
    return (
        pack_documents(train, tokenizer, spec.seq_len, "training"),
        pack_documents(held, tokenizer, spec.seq_len, "held-out")[: spec.eval_max_blocks],
    )


@pytest.mark.parametrize("eval_fraction", [0.2, 1e-6])  # 1e-6: no document hashes into held-out
def test_blocks_equal_in_memory_packing_across_shard_boundaries(tmp_path, eval_fraction):
    docs = corpus(tmp_path / "corpus")
    _, recipe = recipe_at(tmp_path, shard_tokens=50, eval_fraction=eval_fraction, num_proc=1)
    prepared = prepare(recipe)
    train, held = reference_blocks(docs, prepared.tokenizer, recipe.data)
    blocks = prepared.data.train
    assert len(blocks) == len(train) and torch.equal(blocks[:], train)
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:20]
    assert torch.equal(blocks[picks], train[picks]) and blocks[picks].dtype == torch.long
    assert torch.equal(blocks[3], train[3]) and torch.equal(blocks[-1], train[-1])
    assert torch.equal(blocks[2:9:3], train[2:9:3])
    assert torch.equal(prepared.data.eval, held)
    store = TokenStore(prepared.store_dir)
    assert len(store.manifest["splits"]["train"]["shards"]) > 10  # blocks do cross shards
    assert store.manifest["dtype"] == "uint16"
    offsets = store.document_offsets("train")
    assert offsets[0] == 0 and (offsets[1:] > offsets[:-1]).all()
    stats = json.loads((prepared.store_dir / "stats.json").read_text())
    assert stats["documents"] == 58 and stats["train_tokens"] + stats["heldout_tokens"] > 0
    assert 2.0 < stats["bytes_per_token"] < 2.2 and stats["peak_rss_bytes"] > 0  # ids + offsets


def test_any_num_proc_and_streaming_give_the_same_store(tmp_path, monkeypatch):
    from distill.data import tokenize

    monkeypatch.setattr(tokenize, "BATCH_DOCUMENTS", 4)  # many tasks for the workers
    corpus(tmp_path / "corpus")
    records = tmp_path / "records"
    records.mkdir()
    texts = [f"record {i}: " + "word " * (i % 13) for i in range(80)]
    for part in range(2):
        lines = [json.dumps({"text": t}) for t in texts[part * 40 : (part + 1) * 40]]
        (records / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")

    runs = itertools.count()

    def shard_hashes(**data):
        _, recipe = recipe_at(tmp_path, output_dir=str(tmp_path / f"run-{next(runs)}"), **data)
        manifest = TokenStore(prepare(recipe).store_dir).manifest
        return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]

    assert shard_hashes(num_proc=1, shard_tokens=64) == shard_hashes(num_proc=2, shard_tokens=64)
    jsonl = [str(records / "*.jsonl")]
    direct = shard_hashes(files=jsonl, num_proc=1)
    assert shard_hashes(files=jsonl, streaming=True, num_proc=1) == direct


def test_editing_an_input_rebuilds_the_store_and_only_then(tmp_path):
    docs = corpus(tmp_path / "corpus")
    _, recipe = recipe_at(tmp_path)
    first = prepare(recipe).fingerprint
    logs: list[str] = []
    assert prepare(recipe, logs=logs).fingerprint == first  # stages include this fingerprint
    assert any("up to date" in line for line in logs)
    with open(docs[5][0], "a") as f:
        f.write("x = 1\n")
    logs.clear()
    assert prepare(recipe, logs=logs).fingerprint != first
    assert any("training and" in line for line in logs)  # built again


def test_an_interrupted_build_never_looks_complete(tmp_path):
    corpus(tmp_path / "corpus")
    path, recipe = recipe_at(tmp_path, shard_tokens=50, num_proc=1)
    out = recipe.resolved_output_dir
    killed = run_cli("data", path, env={"DISTILL_FAULT": "kill_after_store_shard=3"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "data").exists() and (out / "data.partial").exists()
    stopped = run_cli("data", path, env={"DISTILL_FAULT": "term_after_store_shard=3"}, check=False)
    assert stopped.returncode == 75 and "Traceback" not in stopped.stderr
    assert not (out / "data").exists() and not (out / "data.partial").exists()  # cleaned up
    assert "token store" in cli_here("data", path).stdout
    _, whole = recipe_at(tmp_path, "b.yaml", str(tmp_path / "b"), shard_tokens=50)
    expected = TokenStore(prepare(whole).store_dir).manifest["splits"]
    assert TokenStore(out / "data").manifest["splits"] == expected


READER = """
import hashlib, sys
from pathlib import Path
from distill.data.store import TokenStore
shards = TokenStore(Path(sys.argv[1])).shards("train")
print(hashlib.sha256(b"".join(s.ids.tobytes() for s in shards)).hexdigest(), sum(len(s.ids) for s in shards))
"""


def test_two_processes_share_one_store(tmp_path):
    corpus(tmp_path / "corpus")
    shared = tmp_path / "shared-store"
    paths = [
        recipe_at(tmp_path, f"r{i}.yaml", store=str(shared), output_dir=str(tmp_path / f"o{i}"))[0]
        for i in range(2)
    ]
    procs = [start_cli("data", p, text=True) for p in paths]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    logs = "".join(err for _, err in results)
    assert logs.count("training and") == 1 and logs.count("up to date; reusing it") == 1
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(shared)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = {r.communicate(timeout=120)[0] for r in readers}
    assert len(outputs) == 1 and int(outputs.pop().split()[1]) > 0


def test_another_tokenizer_is_refused_and_a_copied_store_is_used_as_it_is(tmp_path):
    corpus(tmp_path / "corpus")
    shared = tmp_path / "store"
    _, recipe = recipe_at(tmp_path, store=str(shared))
    built = prepare(recipe)
    other = load_recipe(
        recipe_at(tmp_path, "other.yaml", store=str(shared), output_dir=str(tmp_path / "o"))[0],
        ["tokenizer.train.vocab_size=300"],
    )
    with pytest.raises(RecipeError, match="built with another tokenizer"):
        prepare(other)
    # prepared once, copied to a machine without the inputs: `data.store` alone, its tokenizer
    copy = tmp_path / "node" / "store"
    shutil.copytree(shared, copy)
    shutil.rmtree(tmp_path / "corpus")
    raw = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    raw["data"] = {"store": str(copy), "seq_len": 16, "eval_max_blocks": 6}
    raw["tokenizer"] = {"source": "path", "path": str(copy / "tokenizer")}
    raw["output_dir"] = str(tmp_path / "node" / "run")
    used = prepare(load_recipe(None, raw=raw))
    assert torch.equal(used.data.train[:], built.data.train[:])
    assert torch.equal(used.data.eval, built.data.eval) and used.fingerprint == built.fingerprint


def test_training_resumes_bitwise_on_a_sharded_store(tmp_path):
    """Killed mid-epoch (6 steps of 4 blocks over ~85 blocks) on a store of 100-token shards."""
    corpus(tmp_path / "corpus", n=120)
    data = {"shard_tokens": 100}
    stages = [
        {
            "name": "student",
            "kind": "train",
            "model": "student",
            "train": {"max_steps": 10, "save_every": 2},
        }
    ]

    def recipe(name):
        raw = {
            "files": [str(tmp_path / "corpus" / "*.txt")],
            "seq_len": 16,
            "eval_max_blocks": 6,
            **data,
        }
        return tiny_recipe(
            tmp_path / f"{name}.yaml", stages, data=raw, output_dir=str(tmp_path / name)
        )

    cli_here("run", recipe("whole"))
    interrupted = recipe("resumed")
    killed = run_cli("run", interrupted, env={"DISTILL_FAULT": "kill_at_micro=5.0"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert "resumed from" in cli_here("run", interrupted).stderr
    expected = losses_by_step(tmp_path / "whole" / "student" / "metrics.jsonl")
    assert losses_by_step(tmp_path / "resumed" / "student" / "metrics.jsonl") == expected


@pytest.mark.slow
def test_the_quickstart_store_equals_in_memory_packing(tmp_path):
    """The quickstart's own data (the whole stdlib, 3 M tokens): same tokenizer sample, same
    blocks, so its perplexities and batch order are what they were."""
    from distill.data.documents import BadInput, iter_documents

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"output_dir={tmp_path}"])
    prepared = prepare(recipe)
    docs = list(iter_documents(recipe.data, BadInput()))
    train, held = reference_blocks(docs, prepared.tokenizer, recipe.data)
    assert torch.equal(prepared.data.train[:], train) and torch.equal(prepared.data.eval, held)
