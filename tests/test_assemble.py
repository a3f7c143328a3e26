"""`distill run` and `distill bench` build a stage's training step with the same code: the modules a
QAT stage and a depth-pruned recovery stage train (fake quantization, the hidden-state layer map
that follows the prune, projections, weights, teacher, hooks) are identical whichever command
assembles them."""

import torch

from distill.bench.step import build_train_step
from distill.compress.fake_quant import FakeQuantLinear
from distill.recipe_file import load_recipe
from distill.run import train_stage
from distill.run.pipeline import run_recipe

from conftest import tiny_recipe

HIDDEN = {"kind": "mse", "weight": 0.5, "layer_map": "uniform", "projection": True}
STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 2}},
    {"name": "shallow", "kind": "prune", "model": "teacher", "prune": {"method": "depth", "layers": [1]}},
    {
        "name": "recovered",
        "kind": "distill",
        "model": "shallow",
        "teacher": "teacher",
        "train": {"max_steps": 1},
        "objective": {"ce_weight": 0.5, "terms": [{"kind": "forward_kl", "weight": 0.5}], "hidden": HIDDEN},
    },
    {
        "name": "qat",
        "kind": "qat",
        "model": "recovered",
        "quant": {"bits": 4, "group_size": 32},
        "train": {"max_steps": 1},
        "fake_quant_after": 1,
    },
]  # fmt: skip


def _signature(run):
    """Everything that decides what a step computes, in comparable form."""
    module = run.module
    return {
        "modules": [(name, type(m).__name__) for name, m in module.named_modules()],
        "fake_quant": sorted(
            n for n, m in module.named_modules() if isinstance(m, FakeQuantLinear)
        ),
        "layer_map": list(module.layer_map),
        "objective": module.objective.model_dump() if module.objective else None,
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "teacher": {k: v.clone() for k, v in run.teacher.state_dict().items()}
        if run.teacher
        else None,
        "hooks": (run.hooks.before_step is not None, run.hooks.after_optimizer_step is not None),
        "keeps_sparsity": run.keeps_sparsity,
        "quant": run.quant,
    }


def test_run_and_bench_assemble_the_same_qat_and_depth_pruned_recovery_steps(tmp_path, monkeypatch):
    recipe = load_recipe(tiny_recipe(tmp_path / "recipe.yaml", stages=STAGES))
    assembled = {}
    real = train_stage.assemble_training_run

    def recording(ctx, stage, spec, acc=None, **kwargs):
        run = real(ctx, stage, spec, acc, **kwargs)
        torch.manual_seed(0)  # the loop draws nothing before the first step; keep it so
        assembled[stage.name] = _signature(run)
        return run

    monkeypatch.setattr(train_stage, "assemble_training_run", recording)
    run_recipe(recipe)
    for name in ("recovered", "qat"):
        stage = recipe.stage(name)
        notes = []
        bench = _signature(
            build_train_step(recipe, stage, "chunked", torch.device("cpu"), notes).run
        )
        ran = assembled[name]
        assert notes == []  # every upstream stage had run: nothing was built fresh
        for key in (
            "modules",
            "fake_quant",
            "layer_map",
            "objective",
            "hooks",
            "keeps_sparsity",
            "quant",
        ):
            assert bench[key] == ran[key], key
        assert bench["state"].keys() == ran["state"].keys()
        assert all(torch.equal(bench["state"][k], ran["state"][k]) for k in ran["state"])
        assert all(torch.equal(bench["teacher"][k], ran["teacher"][k]) for k in ran["teacher"])
    # the recovery keeps teacher layer 0: its map follows the prune (uniform would pair it with 1)
    assert assembled["recovered"]["layer_map"] == [(0, 0)]
    assert assembled["qat"]["fake_quant"] and assembled["qat"]["hooks"] == (True, False)
