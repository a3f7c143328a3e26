"""Weights & Biases in offline mode: every loss term is logged, and a stage stopped by a signal and
resumed continues the same W&B run with steps that keep increasing."""

import os
import signal
import struct
import subprocess
import sys
import time

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


def wandb_records(path):
    """Records of a W&B offline `.wandb` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            full = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            full, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(full)
        yield record


def run_summary(run_dir):
    name, run_id, steps, keys = None, None, [], set()
    for file in run_dir.glob("run-*.wandb"):
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, name = record.run.run_id, record.run.display_name
            elif kind == "history":
                steps.append(record.history.step.num)
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return name, run_id, steps, keys


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
