"""The report from a summary alone (what `distill report` rewrites): one table with every stage's
metrics and its change against the teacher and the stage it came from, the position table, the
frontier plot and each training stage's loss curves."""

import json

from distill.run.report import stage_table, write_report
from distill.run.report_plots import _frontier


def _entry(name, kind, source, ppl, size, tok_s, **extra):
    metrics = {
        "sets": {
            "heldout": {
                "perplexity": ppl,
                "position_buckets": [[0, 64], [64, 128]],
                "position_perplexity": [ppl * 1.1, ppl * 0.9],
            },
            "licence": {"perplexity": ppl * 2},
        },
        "lm_eval": {"stdlib_docstrings/acc": 0.3},
        "speed": {"tokens_per_s": tok_s, "time_to_first_token_s": 0.01, "peak_mem_bytes": 2**20},
        **extra,
    }
    return {
        "name": name,
        "kind": kind,
        "from": source,
        "params": 10,
        "size_bytes": size,
        "scheme": "fp32",
        "eval": {"perplexity": ppl, "loss": 1.0},
        "steps": 3,
        "wall_s": 1.0,
        "metrics": metrics,
    }


ENTRIES = [
    _entry("teacher", "train", "teacher", 20.0, 4_000_000, 50.0),
    _entry(
        "student", "distill", "small", 25.0, 1_000_000, 150.0,
        teacher={"model": "teacher", "top1_agreement": 0.7, "kl": 0.25},
    ),
    _entry("int4", "export", "student", 26.0, 500_000, 200.0),
]  # fmt: skip


def test_table_has_every_metric_and_both_changes():
    header, rows = stage_table(ENTRIES)
    for column in ("heldout ppl", "licence ppl", "vs teacher", "vs from", "top-1 agree", "KL"):
        assert column in header
    assert "stdlib_docstrings/acc" in header and "tok/s" in header
    row = dict(zip(header, rows[2]))
    assert row["vs teacher"] == "+30.0 %" and row["vs from"] == "+4.0 %"
    assert dict(zip(header, rows[0]))["vs from"] == "-"  # a `models` key, not a stage
    assert dict(zip(header, rows[1]))["top-1 agree"] == "0.700"


def test_report_files(tmp_path):
    (tmp_path / "student").mkdir()
    rows = [{"step": s, "loss": 3 / s, "loss_ce": 4 / s, "loss_forward_kl": 2 / s} for s in (1, 2)]
    (tmp_path / "student" / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    report = write_report(tmp_path, "r", ENTRIES).read_text()
    assert "| int4 | export | student |" in report
    assert "| student | 27.50 | 22.50 |" in report  # perplexity by position
    assert "![report](report.png)" in report and "![report_curves](report_curves.png)" in report
    assert (tmp_path / "report.png").stat().st_size > 0
    assert (tmp_path / "report_curves.png").stat().st_size > 0


def test_frontier_keeps_only_undominated_points():
    points = [(1.0, 30.0), (1.0, 25.0), (2.0, 27.0), (4.0, 20.0)]
    assert _frontier(points, higher_x_better=False) == [(1.0, 25.0), (4.0, 20.0)]
    assert _frontier([(50.0, 20.0), (150.0, 25.0), (100.0, 30.0)], True) == [
        (150.0, 25.0),
        (50.0, 20.0),
    ]


def test_report_is_logged_to_wandb_when_on(tmp_path, monkeypatch):
    from distill.config import WandbSpec

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    write_report(tmp_path, "r", ENTRIES, WandbSpec(mode="offline"))
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media"
    assert list((media / "table").rglob("*.table.json")) and list((media / "images").rglob("*.png"))
