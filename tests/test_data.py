"""Documents, the held-out split, the tokenizer's sample, packing and the deterministic batch
order. The token store itself is tested in test_store.py."""

import json

import pytest
import torch

from distill.config import DataSpec, TokenizerTrainSpec
from distill.data.blocks import pack_documents
from distill.data.documents import is_heldout, load_documents
from distill.data.order import BatchOrder
from distill.data.tokenizer import train_tokenizer, training_sample
from distill.errors import RecipeError


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(50)]
    return train_tokenizer(texts, TokenizerTrainSpec(vocab_size=300, min_frequency=1))


def test_stdlib_documents_are_real_and_exclude_tests():
    docs = load_documents(DataSpec(stdlib=True, max_documents=30))
    assert len(docs) == 30
    assert all(not d.startswith(("test/", "idlelib/")) for d, _ in docs)
    assert any("def " in text for _, text in docs)


def test_heldout_split_is_stable_and_sized():
    ids = [f"pkg/module_{i}.py" for i in range(4000)]
    held = [i for i in ids if is_heldout(i, 0.05)]
    assert held == [i for i in ids if is_heldout(i, 0.05)]  # same answer every time
    assert 150 < len(held) < 250


def test_tokenizer_sample_is_the_training_split_and_leaves_out_a_last_held_back_document():
    ids = [f"m{i}.py" for i in range(200)]
    docs = [(i, f"text of {i}") for i in ids]
    train = [t for i, t in docs if not is_heldout(i, 0.05)]
    assert list(training_sample(docs, 0.05, None)) == train
    assert list(training_sample(docs, 0.05, 7)) == train[:7]
    # nothing held out: the store holds out the last document, so it is not trained on
    assert list(training_sample(docs[:3], 1e-9, None)) == [t for _, t in docs[:2]]


def test_packing_appends_eos_and_cuts_full_blocks(tokenizer):
    blocks = pack_documents(["def a(): pass", "def b(): pass"] * 10, tokenizer, 8, "training")
    assert blocks.shape[1] == 8 and blocks.dtype == torch.long
    flat = blocks.flatten().tolist()
    assert flat.count(tokenizer.eos_token_id) >= len(flat) // 20
    one = tokenizer("def a(): pass", add_special_tokens=False)["input_ids"]
    assert flat[: len(one) + 1] == [*one, tokenizer.eos_token_id]


def test_text_too_short_for_one_block(tokenizer):
    with pytest.raises(RecipeError, match="not one full block"):
        pack_documents(["x"], tokenizer, 512, "held-out")


def test_tokenizer_round_trips(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f3(x):\n    return x * 3\n"
    assert again.decode(again(text)["input_ids"]) == text
    assert again.eos_token_id == tokenizer.eos_token_id


def test_jsonl_with_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    texts = [f"def g{i}(): return {i}\n" * 30 for i in range(40)]
    path.write_text("\n".join(json.dumps({"body": t}) for t in texts))
    docs = load_documents(DataSpec(files=[str(path)], text_field="body"))
    assert docs == [(t, t) for t in texts]  # a record's id is its text


def test_compressed_inputs_are_read_decompressed(tmp_path):
    import gzip

    import zstandard

    lines = "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(5)).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"plain\r\ntext\n"))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        docs = load_documents(DataSpec(files=[str(tmp_path / name)]))
        assert [t for _, t in docs] == [f"record {i}" for i in range(5)]
    assert load_documents(DataSpec(files=[str(tmp_path / "c.txt.gz")]))[0][1] == "plain\ntext\n"


def test_missing_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(RecipeError, match="line 1: column 'text' is not in .*data.text_field"):
        load_documents(DataSpec(files=[str(path)]))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(RecipeError, match="no non-empty text"):
        load_documents(DataSpec(files=[str(tmp_path / "*.txt")]))


def test_save_to_disk_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b c", "d e f"]}).save_to_disk(tmp_path / "ds")
    docs = load_documents(DataSpec(files=[str(tmp_path / "ds")]))
    assert [t for _, t in docs] == ["a b c", "d e f"]


def test_parquet_and_csv(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one two", "three four"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"))
    for name in ("d.parquet", "d.csv"):
        docs = load_documents(DataSpec(files=[str(tmp_path / name)]))
        assert [t for _, t in docs] == ["one two", "three four"]


def test_batch_order_is_deterministic_and_covers_epoch():
    order = BatchOrder(num_blocks=64, batch_size=4, grad_accum=2, world_size=1, seed=3)
    seen = torch.cat([order.indices(s, a, 0) for s in range(8) for a in range(2)])
    assert sorted(seen.tolist()) == list(range(64))  # one epoch, every block once
    again = BatchOrder(64, 4, 2, 1, seed=3)
    assert torch.equal(again.indices(5, 1, 0), order.indices(5, 1, 0))
    assert not torch.equal(BatchOrder(64, 4, 2, 1, seed=4).indices(0, 0, 0), order.indices(0, 0, 0))


def test_batch_order_same_global_batch_for_any_world_size():
    one = BatchOrder(100, batch_size=3, grad_accum=4, world_size=1, seed=0)
    two = BatchOrder(100, batch_size=3, grad_accum=2, world_size=2, seed=0)
    for step in range(12):  # crosses epoch boundaries
        a = sorted(torch.cat([one.indices(step, m, 0) for m in range(4)]).tolist())
        b = sorted(
            torch.cat([two.indices(step, m, r) for m in range(2) for r in range(2)]).tolist()
        )
        assert a == b
