"""Evaluation and gates through the real CLI on a tiny recipe: every stage gets every metric under
its documented summary key, an `evaluate` stage measures an earlier stage, a failing gate ends the
run with exit code 3 after the report is written, and a gate that holds exits 0 without rerunning
any stage."""

import json

import pytest

from distill.config import GateSpec, MetricBound
from distill.run.gates import check_gates, gate_failures
from distill.run.results import StageResult

from conftest import cli_here, run_cli, tiny_recipe

EVAL = {
    "batch_size": 8,
    "sets": {"licence": ["${stdlib}/LICENSE.txt"]},
    "set_max_blocks": 8,
    "teacher": "teacher",
    "agreement_blocks": 8,
    "lm_eval": {"tasks": ["stdlib_docstrings"], "limit": 8},
    "latency": True,
    "latency_tokens": 4,
}
STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 6}},
    {"name": "baseline", "kind": "train", "model": "student", "train": {"max_steps": 6}},
    {
        "name": "distilled",
        "kind": "distill",
        "model": "student",
        "teacher": "teacher",
        "train": {"max_steps": 6},
    },
    {"name": "check", "kind": "evaluate", "model": "distilled", "eval": {"latency": False}},
]
FAILING = {
    "stage": "distilled",
    "against": "teacher",
    "max_perplexity_increase": 0.0,  # a 2-layer student after 6 steps is worse than its teacher
    "lm_eval": {"stdlib_docstrings/acc": {"min": 1.01}},
}


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("gates") / "recipe.yaml"
    tiny_recipe(path, STAGES, eval={**EVAL, "gates": [FAILING]})
    return path, run_cli("run", path, check=False)


def test_failing_gate_exits_3_naming_stage_metric_value_threshold(failed_run):
    path, proc = failed_run
    assert proc.returncode == 3, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("gate check(s) failed") :]
    assert "eval.gates.0 (stage 'distilled')" in message
    assert "heldout perplexity" in message and "against 'teacher'" in message
    assert "max_perplexity_increase 0" in message
    assert "lm_eval stdlib_docstrings/acc = " in message and "below the minimum 1.01" in message
    out = path.parent / "run"
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    assert (out / "report_curves.png").is_file()


def test_every_stage_has_every_metric(failed_run):
    path, _ = failed_run
    stages = json.loads((path.parent / "run" / "summary.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["teacher", "baseline", "distilled", "check"]
    for s in stages:
        m = s["metrics"]
        assert set(m["sets"]) == {"heldout", "licence"}
        for values in m["sets"].values():
            assert values["perplexity"] > 1 and len(values["position_perplexity"]) == 4
            assert values["position_buckets"][0][0] == 0 and values["position_buckets"][-1][1] == 32
        assert 0 <= m["lm_eval"]["stdlib_docstrings/acc"] <= 1
        assert m["format"] == "transformers" and m["eval_wall_s"] > 0
        if s["name"] != "teacher":  # the teacher is the reference itself
            assert m["teacher"]["model"] == "teacher"
            assert 0 <= m["teacher"]["top1_agreement"] <= 1 and m["teacher"]["kl"] >= 0
    for s in stages[:3]:
        assert s["metrics"]["speed"]["tokens_per_s"] > 0
        assert s["metrics"]["speed"]["time_to_first_token_s"] > 0
        # the stage's own number and the evaluation's agree (both fp32 on the saved model)
        heldout = s["metrics"]["sets"]["heldout"]["perplexity"]
        assert heldout == pytest.approx(s["eval"]["perplexity"], rel=1e-4)
    check, distilled = stages[3], stages[2]
    assert "speed" not in check["metrics"]  # the stage's own `eval` overrides one key only
    assert check["from"] == "distilled" and check["model_dir"] == distilled["model_dir"]
    assert check["eval"]["perplexity"] == pytest.approx(distilled["eval"]["perplexity"], rel=1e-6)
    report = (path.parent / "run" / "report.md").read_text()
    for column in ("heldout ppl", "licence ppl", "vs teacher", "top-1 agree", "tok/s"):
        assert column in report
    assert "stdlib_docstrings/acc" in report and "by position" in report


def test_holding_gate_exits_0_without_rerunning(failed_run):
    path, _ = failed_run
    holding = {
        "stage": "distilled",
        "against": "teacher",
        "max_perplexity_increase": 10.0,
        "min_teacher_agreement": 0.0,
        "lm_eval": {"stdlib_docstrings/acc": {"min": 0.0}},
    }
    tiny_recipe(path, STAGES, eval={**EVAL, "gates": [holding]})
    proc = cli_here("run", path)
    assert proc.returncode == 0
    for stage in ("teacher", "baseline", "distilled", "check"):
        assert f"stage {stage!r} already finished" in proc.stderr


def _result(name: str, perplexity: float, **metrics) -> StageResult:
    return StageResult(
        name=name,
        kind="train",
        model_dir="",
        source="m",
        params=1,
        size_bytes=1,
        perplexity=perplexity,
        loss=1.0,
        scheme="fp32",
        metrics={"sets": {"heldout": {"perplexity": perplexity}}, **metrics},
    )


def test_gate_checks_each_bound():
    results = {
        "a": _result("a", 10.0),
        "b": _result("b", 10.1, teacher={"top1_agreement": 0.5}, lm_eval={"t/acc": 0.4}),
    }
    ok = GateSpec(stage="b", against="a", max_perplexity_increase=0.02)
    assert gate_failures(ok, results) == []
    strict = GateSpec(
        stage="b",
        against="a",
        max_perplexity_increase=0.005,
        min_teacher_agreement=0.6,
        lm_eval={"t/acc": MetricBound(min=0.5), "t/other": MetricBound(max=1)},
    )
    problems = gate_failures(strict, results)
    assert len(problems) == 4
    assert "+1.00 % against 'a'" in problems[0]
    assert "agreement 0.5, below min_teacher_agreement 0.6" in problems[1]
    assert "t/acc = 0.4, below the minimum 0.5" in problems[2]
    assert "t/other was not measured" in problems[3]
    no_teacher = GateSpec(stage="a", min_teacher_agreement=0.1)
    assert "set `eval.teacher`" in gate_failures(no_teacher, results)[0]
    with pytest.raises(Exception, match="exit|gate") as err:
        check_gates([strict], list(results.values()))
    assert err.value.exit_code == 3


def test_gate_naming_unknown_stage_is_a_recipe_error(tmp_path):
    path = tiny_recipe(tmp_path / "r.yaml", eval={"gates": [{"stage": "distiled"}]})
    proc = cli_here("check", path, check=False)
    assert proc.returncode == 2
    assert "eval.gates.0.stage: 'distiled' is not a stage" in proc.stderr
    assert "did you mean 'distilled'?" in proc.stderr
