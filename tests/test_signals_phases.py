"""SIGTERM/SIGUSR1 in every phase of a run, not only in the training loop (each phase reached
deterministically with `DISTILL_FAULT=term_in_phase=<phase>`, which sends the SIGTERM there):

- during a training stage's final held-out eval, with `save_every: 0`: exit 75 with the trained
  weights in a checkpoint and the stage not marked done; the rerun only evaluates and exports;
- during a prune stage: exit 75, nothing of it written or marked done; the rerun completes it;
- what the Slurm wrapper reports, from the exit record distill writes (the launcher itself turns
  every worker failure into exit code 1).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from distill.errors import StopRequested
from distill.recipe_file import load_recipe
from distill.run.pipeline import run_recipe

from conftest import ROOT, all_rows, run_cli, tiny_recipe

STEPS = 4
STAGES = [
    {"name": "base", "kind": "train", "model": "student", "train": {"max_steps": STEPS}},
    {"name": "pruned", "kind": "prune", "model": "base", "prune": {"method": "magnitude"}},
]


def training_rows(out) -> int:
    return sum("loss" in row for row in all_rows(out / "base" / "metrics.jsonl"))


def test_stops_in_the_final_eval_and_in_prune_lose_nothing(tmp_path, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", STAGES)
    out = tmp_path / "run"
    record = tmp_path / "exit.txt"
    env = {"DISTILL_FAULT": "term_in_phase=final-eval", "DISTILL_EXIT_FILE": str(record)}
    stopped = run_cli("run", recipe, env=env, check=False)
    assert stopped.returncode == 75, stopped.stderr[-4000:]
    assert "Traceback" not in stopped.stderr
    assert "during final-eval of stage 'base'" in stopped.stderr
    assert not (out / "base" / "stage.json").exists()
    checkpoint = out / "base" / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted((out / "base" / "checkpoints").iterdir()) == [checkpoint]  # save_every: 0
    assert record.read_text().splitlines()[:2] == ["code=75", f"checkpoint={checkpoint}"]
    assert training_rows(out) == STEPS

    # Rerun (in this process, to spare a start): the training stage is not trained again, only
    # evaluated and exported; then a SIGTERM as the prune stage starts.
    monkeypatch.setenv("DISTILL_FAULT", "term_in_phase=prune")
    with pytest.raises(StopRequested) as stop:
        run_recipe(load_recipe(recipe))
    assert stop.value.checkpoint is None and "prune of stage 'pruned'" in str(stop.value)
    assert f"resumed from {checkpoint} at step {STEPS}" in capsys.readouterr().err
    assert training_rows(out) == STEPS
    assert (out / "base" / "stage.json").is_file() and (out / "base" / "model").is_dir()
    assert not (out / "pruned" / "stage.json").exists() and not (out / "pruned" / "model").exists()

    monkeypatch.delenv("DISTILL_FAULT")
    results = run_recipe(load_recipe(recipe))
    assert [r.name for r in results] == ["base", "pruned"]
    assert "stage 'base' already finished" in capsys.readouterr().err
    assert (out / "pruned" / "stage.json").is_file()


# --- the Slurm wrapper ---------------------------------------------------------------------------

FAKE_ACCELERATE = r"""#!/bin/bash
# Test double for `accelerate launch`: distill's exit record, then the launcher's own exit code
printf '%b' "$FAKE_RECORD" >"$DISTILL_EXIT_FILE"
exit "$FAKE_LAUNCHER_RC"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >>"$FAKE_SLURM_LOG"
"""

CASES = {
    "checkpoint": (
        "code=75\\ncheckpoint=/r/base/checkpoints/step_4\\nphase=training of stage 'base'\\n",
        0,
        ["checkpoint saved; requeueing job 77", "training resumes from /r/base/checkpoints/step_4"],
    ),
    "no-checkpoint": (
        "code=75\\ncheckpoint=\\nphase=prune of stage 'pruned'\\n",
        0,
        ["stopped during prune of stage 'pruned' before anything was lost", "requeueing job 77"],
    ),
    "bad-input": ("code=2\\n", 2, ["bad input (exit code 2)", "not requeued"]),
    "gate": ("code=3\\n", 3, ["an eval gate failed", "not requeued"]),
    "diverged": ("code=1\\n", 1, ["diverged or crashed", "not requeued"]),
    "at-once": ("code=130\\n", 130, ["stopped at once", "not requeued"]),
}


def fake_job(tmp_path, record: str, accelerate: str = FAKE_ACCELERATE) -> dict:
    """The environment of single_node.sbatch with test doubles for the launcher and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("accelerate", accelerate), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "FAKE_SLURM_LOG": str(tmp_path / "calls.log"),
        "FAKE_RECORD": record,
        "FAKE_LAUNCHER_RC": "1",  # torchrun: any worker's failure
        "SLURM_JOB_ID": "77",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "RECIPE": "recipe.yaml",
        "ACCELERATE_CONFIG": "launch/cpu_ddp.yaml",
    }
    env.pop("SLURM_RESTART_COUNT", None)
    return env


@pytest.mark.parametrize("case", CASES)
def test_the_slurm_wrapper_reports_what_really_happened(tmp_path, case):
    record, job_rc, said = CASES[case]
    env = fake_job(tmp_path, record)
    job = subprocess.run(
        ["bash", "slurm/single_node.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert job.returncode == job_rc, job.stderr
    for text in said:
        assert text in job.stderr, job.stderr
    requeued = (tmp_path / "calls.log").is_file()
    assert requeued == (job_rc == 0)
    assert not list(tmp_path.glob("distill-exit-*"))  # the records are removed


FAKE_WORKER_LAUNCHER = r"""#!/bin/bash
# Test double for `accelerate launch` whose one worker trains until a TERM reaches it, then
# records a checkpoint and exits 75 (as distill does); the launcher exits 1 (as torchrun does)
bash -c 'trap "printf \"%b\" \"\$FAKE_RECORD\" >\"\$DISTILL_EXIT_FILE\"; exit 75" TERM
touch "$FAKE_READY"; while :; do sleep 0.1; done' &
wait $!
exit 1
"""


def test_scancel_batch_term_checkpoints_every_worker_and_does_not_requeue(tmp_path):
    record = "code=75\\ncheckpoint=/r/base/checkpoints/step_2\\nphase=training\\n"
    env = fake_job(tmp_path, record, FAKE_WORKER_LAUNCHER)
    env["FAKE_READY"] = str(tmp_path / "ready")
    job = subprocess.Popen(
        ["bash", "slurm/single_node.sbatch"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what `scancel --batch --signal=TERM` sends
    _, err = job.communicate(timeout=30)
    assert job.returncode == 75, err
    assert "TERM, asking the training processes to checkpoint" in err
    assert "training resumes from /r/base/checkpoints/step_2" in err
    assert "stopped on request, not requeued" in err
    assert not (tmp_path / "calls.log").exists()  # no scontrol requeue
