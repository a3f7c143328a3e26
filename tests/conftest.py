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
