"""Never lose work: a run killed anywhere continues bitwise as if never stopped; checkpoints that
are half-written, truncated or corrupt are skipped loudly; signals save and exit; NaNs are skipped."""

import json
import shutil
import signal
import time

import pytest

from conftest import (
    all_rows,
    cli_here,
    losses_by_step,
    run_cli,
    same_weights,
    start_cli,
    tiny_recipe,
)

# 12 distill steps of 2 micro-batches of 4 blocks over ~70 training blocks: an epoch every ~9 steps.
DISTILL = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 6}},
    {
        "name": "distilled",
        "kind": "distill",
        "model": "student",
        "teacher": "teacher",
        "train": {"max_steps": 12, "grad_accum": 2, "save_every": 2, "keep_last": 3},
    },
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and a copy of its finished teacher to start interrupted runs from."""
    base = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(base / "recipe.yaml", DISTILL)
    cli_here("run", recipe)
    return base


def fresh_run(reference, tmp_path):
    """A run dir whose teacher stage is already finished, so only `distilled` runs."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    for part in ("tokenizer", "data", "teacher", "recipe.yaml"):
        src = reference / "run" / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run / part)
    recipe = tiny_recipe(tmp_path / "recipe.yaml", DISTILL)
    return run, recipe


def steps_of(rows):
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "kill_at",
    [
        "5.1",  # in the middle of gradient accumulation (after micro-batch 0 of step 5)
        "8.0",  # at a step boundary, in the middle of the first epoch
        "11.1",  # in the second epoch, after the checkpoint of step 10
    ],
)
def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path, kill_at):
    run, recipe = fresh_run(reference, tmp_path)
    killed = run_cli("run", recipe, env={"DISTILL_FAULT": f"kill_at_micro={kill_at}"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (run / "distilled" / "stage.json").exists()  # not mistaken for a finished stage
    resumed = cli_here("run", recipe)
    assert "resumed from" in resumed.stderr
    expected = losses_by_step(reference / "run" / "distilled" / "metrics.jsonl")
    got = losses_by_step(run / "distilled" / "metrics.jsonl")
    assert got == expected  # == on floats: bitwise
    # Steps recomputed after the resume logged exactly what the killed attempt had logged.
    rows = [r for r in all_rows(run / "distilled" / "metrics.jsonl") if "loss" in r]
    for r in rows:
        assert r["loss"] == expected[r["step"]]
    assert same_weights(reference / "run" / "distilled" / "model", run / "distilled" / "model")


def test_sigkill_during_save_keeps_previous_checkpoint(reference, tmp_path):
    run, recipe = fresh_run(reference, tmp_path)
    proc = start_cli("run", recipe, env={"DISTILL_FAULT": "slow_save=30"})
    ckpts = run / "distilled" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".tmp-") for p in _ls(ckpts)):
        time.sleep(0.1)
    time.sleep(0.5)  # the first save is now sleeping between writing and committing
    proc.kill()
    proc.wait()
    assert any(p.name.startswith(".tmp-") for p in _ls(ckpts))
    assert not [p for p in _ls(ckpts) if p.name.startswith("step_")]
    resumed = cli_here("run", recipe)
    assert "resumed from" not in resumed.stderr  # nothing whole to resume from: starts over
    assert not any(p.name.startswith(".tmp-") for p in _ls(ckpts))
    assert losses_by_step(run / "distilled" / "metrics.jsonl") == losses_by_step(
        reference / "run" / "distilled" / "metrics.jsonl"
    )


def _ls(path):
    return list(path.iterdir()) if path.is_dir() else []


@pytest.fixture(scope="module")
def killed_after_step_8(reference, tmp_path_factory):
    """A run killed before step 9: checkpoints of steps 6 and 8 (each damage case gets a copy)."""
    run, recipe = fresh_run(reference, tmp_path_factory.mktemp("killed"))
    run_cli("run", recipe, env={"DISTILL_FAULT": "kill_at_micro=9.0"}, check=False)
    return run


def _killed_after_step_8(killed, tmp_path):
    run, recipe = fresh_run(killed.parent, tmp_path)  # the recipe, in this test's folder
    shutil.copytree(killed / "distilled", run / "distilled")
    ckpts = sorted((run / "distilled" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts][-2:] == ["step_00000006", "step_00000008"]
    return run, recipe, ckpts[-1]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "delete_file"])
def test_damaged_newest_checkpoint_falls_back_to_previous(
    reference, killed_after_step_8, tmp_path, damage
):
    run, recipe, newest = _killed_after_step_8(killed_after_step_8, tmp_path)
    manifest = json.loads((newest / "MANIFEST.json").read_text())["files"]
    victim = newest / max(manifest, key=lambda k: manifest[k]["size"])  # the largest file
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "flip_byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "MANIFEST.json").unlink()
    else:
        victim.unlink()
    resumed = cli_here("run", recipe)
    assert f"skipping checkpoint {newest}" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step_00000006" in resumed.stderr
    assert losses_by_step(run / "distilled" / "metrics.jsonl") == losses_by_step(
        reference / "run" / "distilled" / "metrics.jsonl"
    )


def test_disk_full_during_save_is_clear_and_keeps_previous(reference, tmp_path):
    run, recipe = fresh_run(reference, tmp_path)
    proc = cli_here("run", recipe, env={"DISTILL_FAULT": "enospc_at_save=4"}, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # the fault fails the real write (into /dev/full): torch.save raises its RuntimeError
    assert "saving the checkpoint of step 4" in proc.stderr
    assert "RuntimeError" in proc.stderr and "unexpected pos" in proc.stderr
    assert "free" in proc.stderr
    assert "step_00000002) is intact" in proc.stderr
    names = [p.name for p in (run / "distilled" / "checkpoints").iterdir()]
    assert names == ["step_00000002"]
    resumed = cli_here("run", recipe)
    assert "resumed from" in resumed.stderr and "step_00000002" in resumed.stderr


def test_keep_last_deletes_only_after_commit(reference):
    names = sorted(p.name for p in (reference / "run" / "distilled" / "checkpoints").iterdir())
    assert names == ["step_00000008", "step_00000010", "step_00000012"]


def test_nan_steps_are_skipped_then_the_run_stops(reference, tmp_path):
    run, recipe = fresh_run(reference, tmp_path)
    proc = cli_here("run", recipe, env={"DISTILL_FAULT": "nan_at=3"})
    rows = [r for r in all_rows(run / "distilled" / "metrics.jsonl") if r.get("skipped")]
    assert [r["step"] for r in rows] == [4]  # step index 3 is logged as step 4
    assert "non-finite loss" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())["stages"]
    assert summary[-1]["skipped_steps"] == 1

    run2, recipe2 = fresh_run(reference, tmp_path / "again")
    proc = cli_here("run", recipe2, env={"DISTILL_FAULT": "nan_at=3-11"}, check=False)
    assert proc.returncode == 1
    assert "5 consecutive steps with a non-finite loss" in proc.stderr
    assert "step_00000006" in proc.stderr  # where the last good checkpoint is
    assert not (run2 / "distilled" / "stage.json").exists()


def test_sigterm_saves_and_exits_75_then_resumes(reference, tmp_path):
    run, recipe = fresh_run(reference, tmp_path)
    proc = start_cli("run", recipe, env={"DISTILL_FAULT": "step_sleep=0.3"}, text=True)
    metrics = run / "distilled" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.is_file() and len(steps_of(all_rows(metrics))) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "got SIGTERM" in err and "Run the same command again to resume" in err
    stopped_at = max(steps_of(all_rows(metrics)))
    assert (run / "distilled" / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert stopped_at < 12
    resumed = cli_here("run", recipe)
    assert f"at step {stopped_at}" in resumed.stderr
    assert losses_by_step(metrics) == losses_by_step(
        reference / "run" / "distilled" / "metrics.jsonl"
    )


def _launch_ddp(recipe, env=None, check=True):
    from test_distributed import launch

    return launch("launch/cpu_ddp.yaml", recipe, env=env, check=check)


def test_two_processes_sigkill_mid_accumulation_resumes_bitwise(tmp_path):
    """Two DDP processes (gloo), killed with SIGKILL after micro-batch 0 of step 5 on every rank,
    resumed in fresh processes: losses and final weights equal the uninterrupted 2-process run."""
    stages = [{**DISTILL[0]}, {**DISTILL[1], "train": {**DISTILL[1]["train"], "max_steps": 8}}]
    (tmp_path / "a").mkdir()
    whole = tiny_recipe(tmp_path / "a" / "recipe.yaml", stages)
    _launch_ddp(whole)
    cut = tmp_path / "b"
    cut.mkdir()
    recipe = tiny_recipe(cut / "recipe.yaml", stages)
    killed = _launch_ddp(recipe, env={"DISTILL_FAULT": "kill_at_micro=5.1"}, check=False)
    assert killed.returncode != 0
    assert not (cut / "run" / "distilled" / "stage.json").exists()
    resumed = _launch_ddp(recipe)
    assert "resumed from" in resumed.stderr and "step_00000004" in resumed.stderr
    a, b = tmp_path / "a" / "run" / "distilled", cut / "run" / "distilled"
    assert losses_by_step(b / "metrics.jsonl") == losses_by_step(a / "metrics.jsonl")
    assert same_weights(a / "model", b / "model")
