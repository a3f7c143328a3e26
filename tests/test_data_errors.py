"""Every bad input to `distill data`, through the real CLI: exit code 2, a message naming the
file (and line or row) and the fix, no traceback, and no store or partial store left behind;
`data.on_error: skip` skips the bad documents and counts them instead."""

import gzip
import json

import pytest
import yaml

from conftest import cli_here

GOOD = [f"def good_{i}(a):\n    return a + {i}\n" * 8 for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from distill.config import TokenizerTrainSpec
    from distill.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(GOOD, TokenizerTrainSpec(vocab_size=300, min_frequency=1)).save_pretrained(path)
    return path


def text_corpus(root, extra: dict[str, bytes]):
    root.mkdir()
    for i, text in enumerate(GOOD):
        (root / f"good{i}.txt").write_text(text)
    for name, raw in extra.items():
        (root / name).write_bytes(raw)
    return [str(root / "*")]


def jsonl(root, lines: list[str]):
    root.mkdir()
    good = [json.dumps({"text": t}) for t in GOOD]
    (root / "a.jsonl").write_text("\n".join(good[:2] + lines + good[2:]) + "\n")
    return [str(root / "a.jsonl")]


def parquet_with_null(root):
    import datasets

    root.mkdir()
    datasets.Dataset.from_dict({"text": [GOOD[0], None, GOOD[1]]}).to_parquet(
        str(root / "d.parquet")
    )
    return [str(root / "d.parquet")]


def truncated_gz(root):
    root.mkdir()
    raw = gzip.compress("\n".join(json.dumps({"text": t}) for t in GOOD).encode())
    (root / "a.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    return [str(root / "a.jsonl.gz")]


def empty_corpus(root):
    root.mkdir()
    (root / "blank.txt").write_text(" \n\n")
    (root / "empty.txt").write_text("")
    return [str(root / "*.txt")]


CASES = {
    "binary": (
        lambda r: text_corpus(r, {"image.bin": bytes(range(256)) * 4}),
        ["image.bin", "is a binary file", "remove it"],
    ),
    "latin-1": (
        lambda r: text_corpus(r, {"old.txt": "caf\xe9\nna\xefve\n".encode("latin-1")}),
        ["old.txt", "is not valid UTF-8 (byte 0xe9 on line 1)", "iconv -f latin1"],
    ),
    "utf-16": (
        lambda r: text_corpus(r, {"wide.txt": "hello\n".encode("utf-16")}),
        ["wide.txt", "is UTF-16 text", "convert it to UTF-8"],
    ),
    "not-json": (
        lambda r: jsonl(r, ['{"text": "ok"', "[1, 2]"]),
        ["a.jsonl line 3", "is not JSON", "fix or remove that line"],
    ),
    "no-text-field": (
        lambda r: jsonl(r, ['{"body": "x"}']),
        ["a.jsonl line 3", "column 'text' is not in", "data.text_field"],
    ),
    "null-text": (parquet_with_null, ["d.parquet row 1", "'text' is null", "fill or remove"]),
    "truncated-gz": (truncated_gz, ["a.jsonl.gz", "cannot be read", "truncated"]),
    "empty-corpus": (empty_corpus, ["no non-empty text", "data.files"]),
    "glob-matches-nothing": (lambda r: [str(r / "nothing" / "*.txt")], ["matches no file"]),
}


def recipe(tmp_path, tokenizer_dir, files, **data):
    raw = {
        "name": "bad-data",
        "output_dir": str(tmp_path / "out"),
        "data": {"files": files, "seq_len": 16, "eval_fraction": 0.2, **data},
        "tokenizer": {"source": "path", "path": str(tokenizer_dir)},
        "models": {
            "m": {"config": {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2}}
        },
        "stages": [{"name": "s", "kind": "train", "model": "m"}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error_and_leaves_nothing(tmp_path, tokenizer_dir, case):
    make, expected = CASES[case]
    files = make(tmp_path / "corpus")
    proc = cli_here("data", recipe(tmp_path, tokenizer_dir, files), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "\ndistill: error: " in "\n" + proc.stderr
    for part in expected:
        assert part in proc.stderr, proc.stderr
    out = tmp_path / "out"
    assert not (out / "data").exists() and not (out / "data.partial").exists()


def test_on_error_skip_skips_and_counts(tmp_path, tokenizer_dir):
    bad = {
        "image.bin": bytes(range(256)),
        "old.txt": "caf\xe9\n".encode("latin-1"),
        "wide.txt": "hi\n".encode("utf-16"),
    }
    files = text_corpus(tmp_path / "corpus", bad)
    proc = cli_here("data", recipe(tmp_path, tokenizer_dir, files, on_error="skip"))
    assert "3 bad ones skipped" in proc.stdout and "skipped 3 bad documents" in proc.stderr
    stats = json.loads((tmp_path / "out" / "data" / "stats.json").read_text())
    assert stats["skipped_documents"] == 3 and stats["documents"] == len(GOOD)
