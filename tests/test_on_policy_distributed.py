"""On-policy distillation under 2 DDP processes (real `accelerate launch`): each rank samples its
own prompts with its own seeded generator, and a run killed mid-stage resumes bitwise."""

import shutil

import pytest
import yaml
from test_distributed import CONFIGS, launch

from conftest import all_rows, losses_by_step, tiny_recipe

pytestmark = pytest.mark.distributed

STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 2}},
    {
        "name": "onpol",
        "kind": "distill",
        "model": "student",
        "teacher": "teacher",
        "objective": {
            "terms": [{"kind": "reverse_kl"}],
            "on_policy": {"fraction": 0.5, "max_new_tokens": 8},
        },
        "train": {"max_steps": 6, "save_every": 2},
    },
]


def on_policy_recipe(path):
    recipe = tiny_recipe(path, STAGES)
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["prompts"] = {"prompt_tokens": 12}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipe


def test_two_process_on_policy_run_resumes_bitwise(tmp_path):
    recipe = on_policy_recipe(tmp_path / "recipe.yaml")
    done = tmp_path / "straight"
    launch(CONFIGS["ddp"], recipe, f"output_dir={done}")
    out = tmp_path / "killed"
    out.mkdir()
    for part in ("tokenizer", "data", "teacher"):
        shutil.copytree(done / part, out / part)
    killed = launch(
        CONFIGS["ddp"],
        recipe,
        f"output_dir={out}",
        env={"DISTILL_FAULT": "kill_at_micro=3.0"},  # in on-policy step 3, after step 2's save
        check=False,
    )
    assert killed.returncode != 0
    resumed = launch(CONFIGS["ddp"], recipe, f"output_dir={out}")
    assert "at step 2" in resumed.stderr
    want = losses_by_step(done / "onpol" / "metrics.jsonl")
    assert losses_by_step(out / "onpol" / "metrics.jsonl") == want  # == on floats: bitwise
    rows = [r for r in all_rows(done / "onpol" / "metrics.jsonl") if "teacher_logp" in r]
    # 2 ranks x batch 4 prompts x 8 new tokens, in on-policy steps 1, 3, 5
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["gen_tokens"] <= 64 and r["mean_completion_len"] <= 8 for r in rows)


@pytest.mark.slow  # ~200 s on 2 shared cores (DeepSpeed on CPU); run with -m slow
def test_zero3_student_generates_what_ddp_generates(tmp_path):
    """Under ZeRO-3 the student's partitions are gathered for generation: the same samples, so
    the same losses as DDP (to DeepSpeed's reduction order)."""
    recipe = on_policy_recipe(tmp_path / "recipe.yaml")
    runs = {}
    for mode in ("ddp", "zero3"):
        runs[mode] = tmp_path / mode
        launch(CONFIGS[mode], recipe, f"output_dir={runs[mode]}")
    want = losses_by_step(runs["ddp"] / "onpol" / "metrics.jsonl")
    got = losses_by_step(runs["zero3"] / "onpol" / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert max(abs(got[s] - want[s]) for s in want) < 1e-5
