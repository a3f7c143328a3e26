"""The objective through the real CLI: every logit term and a hidden-state loss in one recipe, with
projections trained, checkpointed, and left out of the exported student."""

import pytest
import torch

from conftest import all_rows, cli_here, tiny_recipe

ALL_TERMS = [
    {"kind": "forward_kl", "weight": 0.3, "temperature": 2.0},
    {"kind": "reverse_kl", "weight": 0.1},
    {"kind": "jsd", "weight": 0.1, "beta": 0.3},
    {"kind": "skew_kl", "weight": 0.1, "alpha": 0.2},
    {"kind": "skew_reverse_kl", "weight": 0.1, "alpha": 0.2},
    {"kind": "tv", "weight": 0.1},
    {"kind": "logit_mse", "weight": 0.01},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("objective")
    stages = [
        {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 4}},
        {
            "name": "distilled",
            "kind": "distill",
            "model": "student",
            "teacher": "teacher",
            "train": {"max_steps": 4},
            "objective": {
                "ce_weight": 0.2,
                "terms": ALL_TERMS,
                "hidden": {"kind": "cosine", "weight": 0.5, "layer_map": "uniform"},
                "chunk_size": 48,
            },
        },
    ]
    recipe = tiny_recipe(base / "recipe.yaml", stages)
    cli_here("run", recipe)
    return base / "run"


def test_every_term_is_logged_and_sums_to_the_total(run):
    rows = [r for r in all_rows(run / "distilled" / "metrics.jsonl") if "loss" in r]
    last = rows[-1]
    expected = 0.2 * last["loss_ce"] + 0.5 * last["loss_hidden"]
    for term in ALL_TERMS:
        t = term.get("temperature", 1.0)
        expected += term["weight"] * t * t * last[f"loss_{term['kind']}"]
    assert last["loss"] == pytest.approx(expected, rel=1e-5)
    assert all(last[f"loss_{t['kind']}"] >= 0 for t in ALL_TERMS)


def test_projections_are_checkpointed_but_not_exported(run):
    from safetensors.torch import load_file

    exported = load_file(run / "distilled" / "model" / "model.safetensors")
    assert not any("projection" in k for k in exported)
    ckpt = sorted((run / "distilled" / "checkpoints").glob("step_*"))[-1]
    files = [p for p in ckpt.iterdir() if p.name.startswith(("pytorch_model", "model"))]
    state = {}
    for f in files:
        state.update(
            load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True)
        )
    proj = [k for k in state if "projections" in k]
    assert proj, sorted(state)[:10]
    # student width 32 -> teacher width 64, one projection per mapped layer pair (2 layers)
    weights = [state[k] for k in proj if k.endswith("weight")]
    assert len(weights) == 2 and all(tuple(w.shape) == (64, 32) for w in weights)


def test_student_of_distill_reloads(run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "distilled" / "model")
    assert model.config.hidden_size == 32
