"""lm-eval task folders shipped with distill (pass this package's directory as `include_path`)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""The folder lm-eval's TaskManager searches for the local task YAMLs."""
