"""The ptq -> qat -> export chain through the real `distill` CLI on a tiny recipe: summary fields,
fake quantization in the qat stage's metric and in its first steps, the exported model on disk,
and the errors for schemes or references that cannot work."""

import json

import pytest
import torch

from distill.errors import RecipeError
from distill.recipe_file import load_recipe

from conftest import cli_here, losses_by_step, run_cli, tiny_recipe

INT4 = {"bits": 4, "group_size": 32}
QAT_TRAIN = {"max_steps": 5, "lr": 1e-3}
FAKE_QUANT_AFTER = 2
# The qat stage's default objective, for the float run its first steps must equal.
PURE_KD = {"ce_weight": 0.0, "terms": [{"kind": "forward_kl", "weight": 1.0}]}

STAGES = [
    {"name": "fp", "kind": "train", "model": "student", "train": {"max_steps": 12}},
    {"name": "ptq", "kind": "ptq", "model": "fp", "quant": INT4},
    {
        "name": "qat",
        "kind": "qat",
        "model": "fp",
        "quant": INT4,
        "fake_quant_after": FAKE_QUANT_AFTER,
        "train": QAT_TRAIN,
    },
    {
        "name": "ship",
        "kind": "export",
        "model": "qat",
        "formats": ["ct-w4a16"],
        "eval": {"latency": True, "latency_tokens": 8},
    },
    # What the qat stage would compute without fake quantization: same teacher, objective, steps.
    {
        "name": "float-kd",
        "kind": "distill",
        "model": "fp",
        "teacher": "fp",
        "objective": PURE_KD,
        "train": QAT_TRAIN,
    },
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tiny_recipe(tmp_path_factory.mktemp("qat") / "recipe.yaml", STAGES)
    out = path.parent / "run"
    cli_here("run", path)
    stages = {e["name"]: e for e in json.loads((out / "summary.json").read_text())["stages"]}
    return out, stages


def heldout(model, out):
    """Held-out perplexity of `model` on the run's own eval blocks, as the stages measure it."""
    from distill.data.prepare import open_prepared
    from distill.recipe_file import load_recipe
    from distill.runtime.evaluate import heldout_metrics

    prepared = open_prepared(
        load_recipe(out.parent / "recipe.yaml"), out / "tokenizer", out / "data"
    )
    vocab = len(prepared.tokenizer)
    return heldout_metrics(model, prepared.data.eval, 8, vocab)["perplexity"]


def test_summary_has_perplexity_scheme_and_size_for_every_stage(run):
    out, stages = run
    for entry in stages.values():
        assert entry["eval"]["perplexity"] > 1 and entry["size_bytes"] > 0, entry["name"]
    assert {name: e["scheme"] for name, e in stages.items()} == {
        "fp": "fp32",
        "ptq": "int4-g32-sym",
        "qat": "int4-g32-sym",
        "ship": "ct-int4-g32",
        "float-kd": "fp32",
    }
    assert stages["ptq"]["steps"] == 0 and stages["qat"]["steps"] == QAT_TRAIN["max_steps"]
    assert stages["qat"]["compare_to"] == "ptq" and stages["qat"]["fake_quant_after"] == 2
    ship = stages["ship"]
    assert ship["compare_to"] == "qat" and ship["params"] == stages["qat"]["params"]
    (export,) = ship["exports"]
    assert export["trained_grid"] == "int4-g32-sym" and export["grid"] == "ct-int4-g32"
    assert export["runtimes"]["transformers"]["latency_s"] > 0
    # packed int4 linears: smaller on disk than the float weights it was exported from
    assert ship["size_bytes"] < 0.8 * stages["qat"]["size_bytes"]
    report = (out / "report.md").read_text()
    assert "| ship | export |" in report and "ship: ct-w4a16 on grid ct-int4-g32" in report
    if "recovered_fraction" in stages["qat"]:  # present when ptq lost anything
        assert "qat recovered" in report


def test_ptq_and_qat_metrics_are_fake_quantized_evals_of_the_exported_weights(run):
    from transformers import AutoModelForCausalLM

    from distill.compress.fake_quant import prepare_qat
    from distill.specs import QuantSpec

    out, stages = run
    for name, source in (("ptq", "fp"), ("qat", "qat")):
        quant = json.loads((out / name / "model" / "distill_quant.json").read_text())
        assert {k: quant[k] for k in INT4} == INT4
        model = AutoModelForCausalLM.from_pretrained(out / source / "model")
        if name == "ptq":  # ptq exports the float weights it was given, and measures them too
            fp = heldout(model, out)
            assert fp == pytest.approx(stages["ptq"]["perplexity_before"], rel=1e-6)
        prepare_qat(model, QuantSpec(bits=4, group_size=32))
        assert heldout(model, out) == pytest.approx(stages[name]["eval"]["perplexity"], rel=1e-6)
    assert stages["ptq"]["eval"]["perplexity"] != stages["ptq"]["perplexity_before"]


def test_exported_model_matches_qat_reloads_and_generates(run):
    """Trained on torchao's grid, exported onto compressed-tensors' (the same formula, a division
    where torchao multiplies by the reciprocal): the same perplexity to within rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stages = run
    path = out / "ship" / "export" / "ct-w4a16"
    exported = stages["ship"]["eval"]["perplexity"]
    assert exported == pytest.approx(stages["qat"]["eval"]["perplexity"], rel=3e-3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # as measured
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 8)
    assert heldout(model, out) == pytest.approx(exported, rel=1e-6)


def test_distill_eval_measures_stage_dirs_as_the_stages_did(run):
    out, stages = run
    paths = {"qat": out / "qat" / "model", "ship": out / "ship" / "export" / "ct-w4a16"}
    for name, path in paths.items():
        command = run_cli if name == "qat" else cli_here  # one real `distill eval`, one in-process
        proc = command("eval", path, "--recipe", out.parent / "recipe.yaml")
        result = json.loads(proc.stdout)
        assert result.get("scheme") == ("int4-g32-sym" if name == "qat" else None)
        assert result["perplexity"] == pytest.approx(stages[name]["eval"]["perplexity"], rel=1e-6)


def test_fake_quant_starts_after_n_steps(run):
    out, _ = run
    qat = losses_by_step(out / "qat" / "metrics.jsonl")
    float_kd = losses_by_step(out / "float-kd" / "metrics.jsonl")
    # logged step s is the loss of step s - 1: the first N steps run in float, bit for bit
    for step in range(1, FAKE_QUANT_AFTER + 1):
        assert qat[step] == float_kd[step], step
    # then the weights are rounded: the same step computes another loss
    assert qat[FAKE_QUANT_AFTER + 1] != float_kd[FAKE_QUANT_AFTER + 1], (qat, float_kd)


def test_exported_model_cannot_be_referenced_and_convert_is_gone(tmp_path):
    bad = [*STAGES[:4], {"name": "again", "kind": "ptq", "model": "ship"}]
    with pytest.raises(RecipeError, match=r"stages.4.model: 'ship' is an `export` stage"):
        load_recipe(tiny_recipe(tmp_path / "bad.yaml", bad))
    old = [*STAGES[:3], {"name": "convert", "kind": "convert", "model": "qat"}]
    with pytest.raises(
        RecipeError, match=r"replaced by `kind: export` with `formats: \[ct-w4a16\]`"
    ):
        load_recipe(tiny_recipe(tmp_path / "old.yaml", old))


@pytest.mark.parametrize(
    "quant,message",
    [
        ({"activations": "int4_dynamic"}, "int8_dynamic"),
        ({"group_size": 48}, "16, 32, 64, 128, 256 or null"),
        ({"bits": 1}, "greater than or equal to 2"),
    ],
)
def test_bad_scheme_in_recipe(tmp_path, quant, message):
    stages = [{"name": "ptq", "kind": "ptq", "model": "student", "quant": quant}]
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe(tmp_path / "recipe.yaml", stages))


def test_group_size_that_does_not_fit_the_model_exits_2_naming_the_alternatives(tmp_path):
    # the tiny student's attention layers have 32 input columns: groups of 64 cannot tile them
    stages = [{"name": "ptq", "kind": "ptq", "model": "student", "quant": {"group_size": 64}}]
    proc = cli_here("run", tiny_recipe(tmp_path / "recipe.yaml", stages), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stage 'ptq' (quant): int4-g64-sym: group_size 64 does not divide in_features 32" in (
        proc.stderr
    )
    assert "(8, 16, 32)" in proc.stderr and "Traceback" not in proc.stderr
