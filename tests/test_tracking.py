"""Weights & Biases in offline mode: every loss term is logged, and a stage stopped by a signal and
resumed continues the same W&B run with steps that keep increasing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, all_rows, tiny_recipe

STAGES = [
    {
        "name": "distilled",
        "kind": "distill",
        "model": "student",
        "teacher": "teacher",
        "train": {"max_steps": 10, "save_every": 100},
        "objective": {
            "ce_weight": 0.5,
            "terms": [{"kind": "forward_kl", "weight": 0.5}, {"kind": "tv", "weight": 0.1}],
        },
    },
]


def run_summary(run_dir):
    """(display name, run id, history steps, logged keys) of an offline run, as W&B's own reader of
    its transaction log reports them (`wandb leet inspect --json`: one JSON record per line)."""
    (log,) = run_dir.glob("run-*.wandb")
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(log)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    name, run_id, steps, keys = None, None, [], set()
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("type") == "run":
            run_id, name = record["run"]["run_id"], record["run"]["display_name"]
        elif record.get("type") == "history":
            steps.append(record["history"]["step"]["num"])
            keys |= {k for k in record["history"]["item"] if not k.startswith("_")}
    return name, run_id, steps, keys


class RecordingWandb:
    """Stands in for the `wandb` module: records every call the tracker makes."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, metrics, step):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self):
        self.calls.append(("finish",))


def test_tracker_calls_wandb_in_order_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    from distill.config import WandbSpec
    from distill.tracking import Tracker

    recorder = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", recorder)
    spec = WandbSpec(mode="offline", project="p", tags=["t"])
    first = Tracker(tmp_path / "m.jsonl", spec, run_name="r/s", config={"a": 1}, group="r")
    first.log({"loss": 2.0}, step=1)
    first.close()
    again = Tracker(tmp_path / "m.jsonl", spec, run_name="r/s", run_id=first.run_id, group="r")
    again.log({"loss": 1.0}, step=2)
    again.close()
    (init1, log1, fin1, init2, log2, fin2) = recorder.calls
    assert init1[0] == init2[0] == "init" and fin1 == fin2 == ("finish",)
    assert init1[1]["id"] == init2[1]["id"] == first.run_id and init1[1]["resume"] == "allow"
    assert init1[1]["group"] == "r" and init1[1]["name"] == "r/s" and init1[1]["mode"] == "offline"
    assert log1 == ("log", 1, {"loss": 2.0}) and log2 == ("log", 2, {"loss": 1.0})
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


def test_offline_wandb_run_continues_after_resume(tmp_path):
    recipe = tiny_recipe(
        tmp_path / "recipe.yaml",
        stages=[
            {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 4}},
            *STAGES,
        ],
    )
    wandb_dir = tmp_path / "wb"
    wandb_dir.mkdir()
    env = {
        **os.environ,
        "WANDB_DIR": str(wandb_dir),
        "DISTILL_FAULT": "step_sleep=0.3",
        "PYTHONWARNINGS": "ignore",
        "WANDB_MODE": "offline",
    }
    args = [sys.executable, "-m", "distill", "run", str(recipe), "tracking.wandb.mode=offline"]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "run" / "distilled" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (
        metrics.is_file() and sum("loss" in r for r in all_rows(metrics)) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    env.pop("DISTILL_FAULT")
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    summaries = [run_summary(r) for r in runs]
    distill_runs = [s[1:] for s in summaries if s[0] == "tiny/distilled"]
    assert len(distill_runs) == 2, summaries
    (id1, steps1, keys1), (id2, steps2, keys2) = distill_runs
    assert id1 == id2  # the resumed attempt continues the same W&B run
    assert steps1 and steps2 and max(steps1) < min(steps2)  # steps keep increasing
    assert max(steps2) == 10
    for key in ("loss", "loss_ce", "loss_forward_kl", "loss_tv", "lr", "grad_norm", "tokens_per_s"):
        assert key in keys1 | keys2, key
    assert "eval/perplexity" in keys2
