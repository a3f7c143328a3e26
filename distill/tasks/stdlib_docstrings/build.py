"""The `stdlib_docstrings` lm-eval task's data, built from the Python standard library on the
machine that runs it: which function does a docstring describe? The summary line of a function's
docstring is the context (as a comment), the choices are the names of four functions of the same
file. Only text a stdlib-trained model never saw is used: the files of the default held-out split,
and the folders `data.stdlib_exclude` leaves out of training (idlelib, tkinter, lib2to3, ...)."""

from __future__ import annotations

import ast
import hashlib

from distill.config import DataSpec
from distill.data import is_heldout, load_documents

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


def build_docs() -> list[dict]:
    """Every item: `context`, `choices` (names), `label` (index of the right one)."""
    docs = []
    for doc_id, text in load_documents(DataSpec(stdlib=True, stdlib_exclude=["site-packages"])):
        untrained = doc_id.split("/")[0] in UNTRAINED_FOLDERS
        if not (untrained or is_heldout(doc_id, HELDOUT_FRACTION)):
            continue
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
    return sorted(docs, key=lambda d: _order(d["source"], d["context"]))


def stdlib_docstrings(**_metadata):
    """lm-eval's `custom_dataset` hook: the items as a DatasetDict with one `test` split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(build_docs())})
