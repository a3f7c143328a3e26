"""One `distill` command per output folder: a second `distill run` beside a running one is
refused (exit 2) naming the holder; a holder killed with SIGKILL leaves a lock that is detected as
stale and taken over; a lock from another host is refused with how to remove it. And killing the
process group of `accelerate launch` (its workers each run in a session of their own) leaves no
worker behind."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.errors import OutputDirBusy
from distill.run.lock import LOCK_FILE, RunLock

from conftest import ROOT, cli_here, tiny_recipe

HOLD = """
import sys, time
from distill.run.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(OutputDirBusy, match=f"pid {holder.pid} on host"):
        RunLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: no cleanup, the record stays
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    logs: list[str] = []
    lock = RunLock(tmp_path, logs.append)
    lock.acquire()
    assert len(logs) == 1 and f"stale lock {tmp_path / LOCK_FILE} of pid {holder.pid}" in logs[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    record = {"pid": 4242, "host": "node-17", "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(OutputDirBusy) as err:
        RunLock(tmp_path).acquire()
    message = str(err.value)
    assert "pid 4242 on host 'node-17', started 2026-01-01T00:00:00+00:00" in message
    assert f"delete {tmp_path / LOCK_FILE}" in message


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killing_the_launchers_group_leaves_no_worker_and_a_second_run_is_refused(tmp_path):
    import psutil

    recipe = tiny_recipe(
        tmp_path / "recipe.yaml",
        [{"name": "base", "kind": "train", "model": "student", "train": {"max_steps": 500}}],
    )
    metrics = tmp_path / "run" / "base" / "metrics.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", "launch/cpu_ddp.yaml"]
    cmd += ["--main_process_port", str(port), "-m", "distill", "run", str(recipe)]
    log = tmp_path / "launch.log"
    workers: list[int] = []
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "DISTILL_FAULT": "step_sleep=0.5"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 180
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert launcher.poll() is None, log.read_text()[-5000:]
            assert time.time() < deadline, log.read_text()[-5000:]
            time.sleep(0.2)
        workers = [p.pid for p in psutil.Process(launcher.pid).children()]
        assert len(workers) == 2, workers  # both training: steps are collective

        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder["pid"] in workers  # rank 0 holds it
        second = cli_here("run", recipe, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"pid {holder['pid']} on host {socket.gethostname()!r}" in second.stderr
        assert "Traceback" not in second.stderr

        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], log.read_text()[-5000:]
        # they stopped as on SIGTERM: a checkpoint of the step they were in
        assert len(list((tmp_path / "run" / "base" / "checkpoints").iterdir())) == 1
    finally:
        for pid in workers:  # on failure: no stray workers left on the machine
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
