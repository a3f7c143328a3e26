"""The `stdlib_docstrings` task: its YAML, and the builder of its items (lm-eval loads build.py by
path through the YAML's `custom_dataset`; `build_docs` gives the same items in Python)."""

from distill.tasks.stdlib_docstrings.build import build_docs

__all__ = ["build_docs"]
