"""The `stdlib_docstrings` lm-eval task's data, built from the Python standard library on the
machine that runs it: which function does a docstring describe? The summary line of a function's
docstring is the context (as a comment), the choices are the names of four functions of the same
file. Only text a stdlib-trained model never saw is used: the files of the default held-out split,
and the folders `data.stdlib_exclude` leaves out of training (idlelib, tkinter, lib2to3, ...)."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

from distill.config import DataSpec
from distill.data.documents import is_heldout

CHOICES = 4
HELDOUT_FRACTION = DataSpec.model_fields["eval_fraction"].default
UNTRAINED_FOLDERS = set(DataSpec.model_fields["stdlib_exclude"].default) - {"site-packages"}


def _functions(text: str) -> list[tuple[str, str]]:
    """(name, docstring summary) of the public functions of a file that have a docstring."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name[0] != "_":
            doc = ast.get_docstring(node)
            summary = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if len(summary.split()) >= 4 and node.name not in found:
                found[node.name] = summary
    return sorted(found.items())


def _order(*parts: str) -> str:
    # a stable shuffle (not `random`: the items must be the same on every machine and run)
    return hashlib.md5("/".join(parts).encode()).hexdigest()


def _untrained_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the stdlib files a stdlib-trained model never saw."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    skipped = {"site-packages", "test", "tests"}  # installed packages; the test suite
    tops = [p for p in sorted(root.iterdir()) if p.name not in skipped]
    paths = [p for top in tops for p in ([top] if top.is_file() else sorted(top.rglob("*.py")))]
    for path in paths:
        if path.suffix != ".py":
            continue
        rel = path.relative_to(root)
        if "test" in rel.parts or "tests" in rel.parts or "site-packages" in rel.parts:
            continue
        if rel.parts[0] in UNTRAINED_FOLDERS or is_heldout(rel.as_posix(), HELDOUT_FRACTION):
            found.append((rel.as_posix(), path))
    return found


@lru_cache(maxsize=1)  # lm-eval builds the dataset once per model evaluated; the files don't change
def build_docs() -> tuple[dict, ...]:
    """Every item: `context`, `choices` (names), `label` (index of the right one)."""
    docs = []
    for doc_id, path in _untrained_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        functions = _functions(text)
        if len(functions) < CHOICES:
            continue
        names = [name for name, _ in functions]
        for name, summary in functions:
            others = sorted((n for n in names if n != name), key=lambda n: _order(doc_id, name, n))
            choices = sorted([name, *others[: CHOICES - 1]], key=lambda n: _order(name, n))
            docs.append(
                {
                    "source": doc_id,
                    "context": f"# {summary}\ndef",
                    "choices": [f" {n}(" for n in choices],
                    "label": choices.index(name),
                }
            )
    return tuple(sorted(docs, key=lambda d: _order(d["source"], d["context"])))


def stdlib_docstrings(**_metadata):
    """lm-eval's `custom_dataset` hook: the items as a DatasetDict with one `test` split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(build_docs()))})
