"""The Slurm batch scripts, run for real on this host with test doubles for `srun` (one task per
"node", all local) and `scontrol` (records calls), and the SLURM_* variables an allocation sets.

Each script: training runs; USR1 sent to the batch shell (what `#SBATCH --signal=B:USR1@...` does
before the time limit) leaves a checkpoint and a `scontrol requeue` call; the requeued job (same
script, SLURM_RESTART_COUNT=1) resumes from that checkpoint and finishes. The multi-node script
starts two launchers (`--num_machines 2`, machine ranks 0 and 1 from each task's SLURM_NODEID)
that meet at a c10d rendezvous on localhost, under the multi-node ZeRO-3 config users get.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, losses_by_step, tiny_recipe

pytestmark = pytest.mark.distributed

SCRIPTS = sorted((ROOT / "slurm").iterdir())
STEPS = 12

FAKE_SRUN = r"""#!/bin/bash
# Test double for srun: one task per node of the allocation (SLURM_NNODES), all on this host, each
# with its own SLURM_NODEID/SLURM_PROCID. Signals sent to it go to every task, as srun forwards
# them; it exits with the highest task exit code. Tasks after the first start FAKE_SRUN_STAGGER_S
# later: on one host, node 0's launcher must check its rendezvous port before node 1 binds it.
while [[ "${1:-}" == -* ]]; do shift; done
echo "srun $*" >>"$FAKE_SLURM_LOG"
pids=()
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do
    if [ "$i" -gt 0 ]; then sleep "${FAKE_SRUN_STAGGER_S:-0}"; fi
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
rc=0
for pid in "${pids[@]}"; do
    wait "$pid"; r=$?
    while [ "$r" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do wait "$pid"; r=$?; done
    if [ "$r" -gt "$rc" ]; then rc=$r; fi
done
exit "$rc"
"""

FAKE_SCONTROL = r"""#!/bin/bash
# Test double for scontrol: records every call; `show hostnames A,B` prints one name a line.
echo "scontrol $*" >>"$FAKE_SLURM_LOG"
if [ "$1 $2" = "show hostnames" ]; then tr ',' '\n' <<<"$3"; fi
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(
        ["shellcheck", "-x", str(script)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


@pytest.fixture
def allocation(tmp_path):
    """Environment of a job inside a fake allocation, with srun/scontrol doubles on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    recipe = tiny_recipe(
        tmp_path / "recipe.yaml",
        [{"name": "base", "kind": "train", "model": "student", "train": {"max_steps": STEPS}}],
    )
    venv_bin = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{venv_bin}:{os.environ['PATH']}",
        "FAKE_SLURM_LOG": str(tmp_path / "slurm_calls.log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "RECIPE": str(recipe),
        "MASTER_PORT": str(free_port()),
    }
    env.pop("SLURM_RESTART_COUNT", None)
    return tmp_path, env


def run_preempted_then_requeued(script: str, tmp_path, env) -> tuple[str, str]:
    """First job: USR1 after two logged steps. Requeued job: runs to the end. Their outputs."""
    metrics = tmp_path / "run" / "base" / "metrics.jsonl"
    first_log = tmp_path / "first.out"
    with open(first_log, "w") as out:
        job = subprocess.Popen(
            ["bash", f"slurm/{script}"],
            cwd=ROOT,
            env={**env, "DISTILL_FAULT": "step_sleep=0.5"},  # time to signal mid-run
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert job.poll() is None, first_log.read_text()[-5000:]
            assert time.time() < deadline, (
                "training never started\n" + first_log.read_text()[-5000:]
            )
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell before the time limit
        assert job.wait(timeout=240) == 0, first_log.read_text()[-5000:]
    first = first_log.read_text()
    calls = (tmp_path / "slurm_calls.log").read_text()
    assert "scontrol requeue 4242" in calls, first[-5000:]
    saved = sorted(p.name for p in (tmp_path / "run" / "base" / "checkpoints").iterdir())
    assert len(saved) == 1, saved
    step = int(saved[0].split("_")[1])
    assert 2 <= step < STEPS, saved

    requeued = subprocess.run(
        ["bash", f"slurm/{script}"],
        cwd=ROOT,
        env={**env, "SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    second = requeued.stdout + requeued.stderr
    assert requeued.returncode == 0, second[-5000:]
    checkpoint = tmp_path / "run" / "base" / "checkpoints" / saved[0]
    assert f"resumed from {checkpoint} at step {step}" in second
    assert "done: 1 stages" in second
    assert (tmp_path / "slurm_calls.log").read_text().count("requeue") == 1  # not again
    assert sorted(losses_by_step(tmp_path / "run" / "base" / "metrics.jsonl")) == list(
        range(1, STEPS + 1)
    )
    assert (tmp_path / "run" / "base" / "model" / "config.json").is_file()
    return first, second


def test_single_node_script_checkpoints_requeues_and_resumes(allocation):
    tmp_path, env = allocation
    env.update({"ACCELERATE_CONFIG": "launch/cpu_ddp.yaml", "GPUS_PER_NODE": "2"})
    first, second = run_preempted_then_requeued("single_node.sbatch", tmp_path, env)
    assert "--num_processes 2" in first and "--num_machines 1" in first
    assert "[distill-slurm] checkpoint saved; requeueing job 4242" in first


def test_multi_node_script_two_launchers_checkpoint_requeue_resume(allocation):
    tmp_path, env = allocation
    env.update(
        {
            "ACCELERATE_CONFIG": "launch/multinode_zero3.yaml",
            "GPUS_PER_NODE": "1",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "localhost,localhost",
            "FAKE_SRUN_STAGGER_S": "2",
        }
    )
    first, second = run_preempted_then_requeued("multi_node.sbatch", tmp_path, env)
    for rank in (0, 1):  # each launcher took its machine rank from its own SLURM_NODEID
        assert f"--num_machines 2 --machine_rank {rank} --num_processes 2" in first
    assert "--rdzv_backend c10d" in first
    assert "rendezvous at localhost:" in first
    assert first.count("asking the training processes to checkpoint") == 2  # both nodes
    calls = (tmp_path / "slurm_calls.log").read_text()
    assert "scontrol show hostnames localhost,localhost" in calls
    assert calls.count("srun ") == 2  # the first job and the requeued one
