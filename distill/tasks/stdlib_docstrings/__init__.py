"""The `stdlib_docstrings` task: its YAML and the builder of its items (build.py)."""
