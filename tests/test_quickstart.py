"""The real `distill` CLI on a scaled-down quickstart: files, summary, quality order, skipping
finished stages, and models that reload with plain transformers."""

import json

import pytest

from conftest import RECIPES, TINY, cli_here, run_cli

QUICKSTART = RECIPES / "quickstart.yaml"
STEPS = [
    "stages.teacher.train.max_steps=150",
    "stages.baseline.train.max_steps=100",
    "stages.distilled.train.max_steps=100",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_cli("run", QUICKSTART, *TINY, *STEPS, f"output_dir={out}")
    return out, proc


def test_outputs_exist(run_dir):
    out, proc = run_dir
    assert "done: 3 stages" in proc.stdout
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    for stage in ("teacher", "baseline", "distilled"):
        assert (out / stage / "model" / "config.json").is_file()
        assert (out / stage / "metrics.jsonl").is_file()
        assert (out / stage / "stage.json").is_file()
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    report = (out / "report.md").read_text()
    for stage in ("teacher", "baseline", "distilled"):
        assert f"| {stage} |" in report


def test_summary_fields_and_quality_order(run_dir):
    out, _ = run_dir
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["teacher", "baseline", "distilled"]
    assert [s["kind"] for s in stages] == ["train", "train", "distill"]
    for s in stages:
        for key in ("model_dir", "params", "size_bytes", "wall_s", "steps", "eval"):
            assert key in s, key
        assert s["size_bytes"] > 0 and s["params"] > 0
        assert s["eval"]["perplexity"] > 1 and s["eval"]["loss"] > 0
    teacher, baseline, distilled = (s["eval"]["perplexity"] for s in stages)
    assert stages[1]["params"] == stages[2]["params"] < stages[0]["params"]
    assert stages[1]["steps"] == stages[2]["steps"] == 100
    assert distilled < baseline, (distilled, baseline)
    assert teacher < distilled, (teacher, distilled)


def test_metrics_log_every_term(run_dir):
    out, _ = run_dir
    rows = [json.loads(line) for line in (out / "distilled" / "metrics.jsonl").open()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(10, 101, 10))
    for key in ("loss", "loss_ce", "loss_forward_kl", "lr", "grad_norm", "tokens_per_s"):
        assert key in train_rows[0], key
    # the total is the weighted sum of the terms (0.1 CE + 0.9 KL), not one micro-batch's value
    r = train_rows[-1]
    assert r["loss"] == pytest.approx(0.1 * r["loss_ce"] + 0.9 * r["loss_forward_kl"], rel=1e-4)
    assert any("eval/perplexity" in r for r in rows)


def test_models_reload_with_transformers_and_generate(run_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run_dir
    for stage in ("teacher", "baseline", "distilled"):
        path = out / stage / "model"
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("def main():", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert gen.shape[1] == ids.shape[1] + 8
        assert isinstance(tok.decode(gen[0]), str)


def test_second_run_skips_finished_stages(run_dir):
    out, _ = run_dir
    before = (out / "summary.json").read_text()
    proc = cli_here("run", QUICKSTART, *TINY, *STEPS, f"output_dir={out}")
    for stage in ("teacher", "baseline", "distilled"):
        assert f"stage {stage!r} already finished" in proc.stderr
    assert json.loads((out / "summary.json").read_text()) == json.loads(before)


def test_changed_setting_reruns_only_that_stage_and_later(run_dir, tmp_path):
    import shutil

    out, _ = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    proc = cli_here(
        "run",
        QUICKSTART,
        *TINY,
        *STEPS,
        f"output_dir={copy}",
        "stages.distilled.objective.terms.0.temperature=2.0",
    )
    assert "stage 'teacher' already finished" in proc.stderr
    assert "stage 'baseline' already finished" in proc.stderr
    assert "stage 'distilled' has output from other settings" in proc.stderr
    assert "stage 'distilled' (distill) starting" in proc.stderr


def test_check_prints_resolved_recipe():
    proc = cli_here("check", QUICKSTART, "stages.distilled.train.lr=1e-4")
    assert "lr: 0.0001" in proc.stdout
    assert "recipe OK: 3 stages" in proc.stderr


def test_bad_override_exits_2_with_message(tmp_path):
    proc = run_cli("run", QUICKSTART, f"output_dir={tmp_path}", "train.lrr=1", check=False)
    assert proc.returncode == 2
    assert "Did you mean 'lr'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written that could look like a finished run
