"""A full disk, for real: every failed write, whatever the library raises for it (torch.save's
RuntimeError, safetensors' SafetensorError, an OSError), exits 2 with one paragraph naming the path,
the free space and what is intact, and leaves the previous checkpoint and model dir whole.

The file systems are real small tmpfs mounts: as root directly; otherwise each test reruns itself
inside a user and mount namespace (`unshare -rm`), where it may mount one."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_here, tiny_recipe

IN_NAMESPACE = "DISTILL_TEST_IN_NAMESPACE"

# A student that fits the disk, then a teacher whose first checkpoint does not.
STAGES = [
    {
        "name": "student",
        "kind": "train",
        "model": "student",
        "train": {"max_steps": 4, "save_every": 2, "keep_last": 2},
    },
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 2}},
]


@contextlib.contextmanager
def _mounted(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_fs(request, tmp_path):
    """A mount factory (`small_fs(size)`) on a real tmpfs, or None when the test already ran (and
    passed) inside a user namespace."""
    if os.geteuid() != 0:
        if os.environ.get(IN_NAMESPACE) or not shutil.which("unshare"):
            pytest.skip("mounting a tmpfs needs root or `unshare -rm` (user namespaces)")
        node = f"{Path(__file__).name}::{request.node.name}"
        proc = subprocess.run(
            [
                "unshare",
                "-rm",
                sys.executable,
                "-m",
                "pytest",
                node,
                "-q",
                "-p",
                "no:cacheprovider",
            ],
            cwd=Path(__file__).parent,
            env={**os.environ, IN_NAMESPACE: "1"},
            capture_output=True,
            text=True,
        )
        if "1 skipped" in proc.stdout or "unshare:" in proc.stderr:
            pytest.skip(
                f"no tmpfs in a user namespace either: {(proc.stdout + proc.stderr)[-300:]}"
            )
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        yield None
        return
    with contextlib.ExitStack() as stack:
        yield lambda size, name="fs": stack.enter_context(_mounted(tmp_path / name, size))


def _one_paragraph_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1, stderr[-4000:]
    return errors[0]


def test_a_full_disk_exits_2_keeps_the_checkpoint_and_refuses_a_first_save_that_cannot_fit(
    small_fs,
):
    """Another job fills the disk just before step 4's save (after its free-space check passed):
    torch.save fails on the full tmpfs with its own RuntimeError, which exits 2 in one paragraph;
    step 2's checkpoint stays whole and, once space is freed, the run resumes from it. The next
    stage's first checkpoint (estimated: it has none yet) cannot fit: refused before its first
    step, nothing written."""
    if small_fs is None:
        return
    from distill.runtime.checkpoint import verify

    fs = small_fs("2560k")
    recipe = tiny_recipe(fs / "recipe.yaml", STAGES)
    proc = cli_here("run", recipe, env={"DISTILL_FAULT": "fill_disk_at_save=4"}, check=False)
    assert proc.returncode == 2, proc.stderr[-4000:]
    error = _one_paragraph_error(proc.stderr)
    checkpoints = fs / "run" / "student" / "checkpoints"
    assert f"saving the checkpoint of step 4 in {checkpoints} failed" in error
    assert "RuntimeError" in error and "unexpected pos" in error  # what torch.save raises
    assert "No space left on device" in error and " free" in error
    assert f"The previous checkpoint ({checkpoints / 'step_00000002'}) is intact" in error
    assert sorted(p.name for p in checkpoints.iterdir()) == ["disk-filler", "step_00000002"]
    assert verify(checkpoints / "step_00000002") is None

    (checkpoints / "disk-filler").unlink()
    proc = cli_here("run", recipe, check=False)
    assert f"resumed from {checkpoints / 'step_00000002'}" in proc.stderr
    assert (fs / "run" / "student" / "model" / "model.safetensors").is_file()
    assert (fs / "run" / "student" / "stage.json").is_file()
    assert proc.returncode == 2, proc.stderr[-4000:]
    error = _one_paragraph_error(proc.stderr)
    teacher = fs / "run" / "teacher"
    assert (
        f"not enough disk space for a checkpoint (no checkpoint yet) in {teacher / 'checkpoints'}"
        in error
    )
    assert "Nothing was written" in error and "`train.keep_last`" in error
    assert not (teacher / "checkpoints").exists() or not any((teacher / "checkpoints").iterdir())
    assert (teacher / "metrics.jsonl").read_text() == ""  # refused before its first step


def _tiny_model():
    """Enough parameters to fill a 1 MiB disk (and no transformers import: the budget is tight)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64, bias=False))


def test_a_full_disk_during_a_model_dir_write_keeps_the_previous_model(small_fs):
    """safetensors fails on a full tmpfs with a SafetensorError: a DiskWriteError naming the dir,
    and the previous model dir is unchanged, its temporary sibling gone."""
    if small_fs is None:
        return
    from safetensors.torch import load_file, save_model

    from distill.errors import DiskWriteError
    from distill.faults import fill_disk
    from distill.models import write_model_dir

    fs = small_fs("1M")
    out = fs / "model"
    first = _tiny_model()
    write_model_dir(out, lambda tmp: save_model(first, str(tmp / "model.safetensors")))
    before = load_file(out / "model.safetensors")
    fill_disk(fs / "filler")
    with torch.no_grad():
        first[0].weight.add_(1.0)
    with pytest.raises(DiskWriteError) as caught:
        write_model_dir(out, lambda tmp: save_model(first, str(tmp / "model.safetensors")))
    message = str(caught.value)
    assert f"writing the model dir {out} failed: SafetensorError" in message
    assert "No space left on device" in message
    assert f"The previous {out} is unchanged" in message
    after = load_file(out / "model.safetensors")
    assert after.keys() == before.keys() and all(after[k].equal(before[k]) for k in before)
    assert sorted(p.name for p in fs.iterdir()) == ["filler", "model"]


def test_write_failures_whatever_the_library_raises(tmp_path, monkeypatch):
    """torch's RuntimeError, safetensors' SafetensorError and an OSError become DiskWriteError; an
    unrelated error raised while writing to a disk with room stays what it was."""
    from safetensors import SafetensorError

    from distill import files
    from distill.errors import EXIT_BAD_INPUT, DiskWriteError

    raised = [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        OSError(28, "No space left on device"),
    ]
    for err in raised:
        with pytest.raises(DiskWriteError) as caught:
            _raise_while_writing(tmp_path, err)
        assert caught.value.exit_code == EXIT_BAD_INPUT
        assert caught.value.__cause__ is err
        assert f"writing the thing failed: {type(err).__name__}: {err}" in str(caught.value)
        assert f"The file system holding {tmp_path} has " in str(caught.value)
        assert "The old thing is intact" in str(caught.value)
    with pytest.raises(ValueError, match="a bug"):
        _raise_while_writing(tmp_path, ValueError("a bug"))
    # ... unless the disk is full: then whatever failed, it failed for want of room
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskWriteError, match="No space left on device"):
        _raise_while_writing(tmp_path, ValueError("a library's own words"))


def _raise_while_writing(path, err):
    from distill import files

    with files.writing(path, "writing the thing", "The old thing is intact"):
        raise err


def test_first_checkpoint_estimate_is_checked_against_free_space(tmp_path, monkeypatch):
    """Before any checkpoint exists the estimate (weights + two fp32 AdamW moments per trainable
    parameter) is what is checked; LoRA's frozen base counts only once."""
    from distill import files
    from distill.errors import DiskWriteError
    from distill.runtime.checkpoint import check_free_space, estimate_checkpoint_bytes

    model = _tiny_model()
    params = sum(p.numel() for p in model.parameters())
    overhead = 64 << 10  # RNG states, records
    assert estimate_checkpoint_bytes(model) == params * 4 + params * 8 + overhead
    for p in model.parameters():
        p.requires_grad_(False)
    assert estimate_checkpoint_bytes(model) == params * 4 + overhead
    monkeypatch.setattr(files, "free_bytes", lambda path: params * 4)
    with pytest.raises(
        DiskWriteError, match=r"free, about 385.00 KiB needed\. Nothing was written"
    ):
        check_free_space(tmp_path / "checkpoints", estimate_checkpoint_bytes(model))
    assert not (tmp_path / "checkpoints").exists()


def test_small_writers_on_a_full_disk_keep_what_was_there(small_fs):
    """summary.json (atomic) keeps its previous content; metrics.jsonl keeps its earlier rows and
    gets no half row; neither leaves a temporary file."""
    if small_fs is None:
        return
    from distill.errors import DiskWriteError
    from distill.faults import fill_disk
    from distill.run.report import write_summary
    from distill.tracking import Tracker

    fs = small_fs("1M")
    write_summary(fs / "summary.json", [{"name": "a"}])
    tracker = Tracker(fs / "metrics.jsonl")
    tracker.log({"loss": 1.0}, step=1)
    before = {p.name: p.read_bytes() for p in fs.iterdir()}
    fill_disk(fs / "filler")
    with pytest.raises(DiskWriteError, match="summary.json failed: OSError.*No space left"):
        write_summary(fs / "summary.json", [{"name": "a" * 10_000}])
    with pytest.raises(DiskWriteError, match="metrics.jsonl failed.*earlier rows are intact"):
        tracker.log({"loss": 2.0, "note": "x" * 10_000}, step=2)
    tracker.close()
    assert {p.name: p.read_bytes() for p in fs.iterdir() if p.name != "filler"} == before
