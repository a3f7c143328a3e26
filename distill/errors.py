"""Every way a `distill` command can end, in one place: the error types and their exit codes.

Each error carries its exit code, so the CLI maps exceptions to codes with one rule and every rank
of a multi-process run exits with the documented code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_DIVERGED = 1  # training stopped after too many non-finite steps
EXIT_BAD_INPUT = 2  # recipe, paths, data, checkpoint, launch: the message says what to change
EXIT_GATE_FAILED = 3  # a stage missed an `eval.gates` threshold (the report is written)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; run again to resume
EXIT_INTERRUPTED = 130  # a second signal or Ctrl-C: stopped at once, the last checkpoint remains


class DistillError(Exception):
    """Base of every error `distill` reports to a user; `exit_code` is what the command returns."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(DistillError, ValueError):
    """A recipe (or an override, a flag, an input file) that cannot run; the message says what to
    change."""


class SettingError(RecipeError):
    """A bad value of named settings, found where a spec is used (a library function or the spec's
    own validation).

    The message is a template: `{key}` stands for a setting's name and `{key=}` for its name and
    value, so each caller names the settings the way its user wrote them (`prune.heads_fraction=0.9`
    in a recipe, `--heads-fraction=0.9` on the command line, `heads_fraction=0.9` in Python).
    """

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        super().__init__(self.render(lambda key: key))

    def render(self, name_of: Callable[[str], str]) -> str:
        text = self.template
        for key, value in self.values.items():
            text = text.replace("{" + key + "=}", f"{name_of(key)}={value}")
            text = text.replace("{" + key + "}", name_of(key))
        return text

    def named(self, name_of: Callable[[str], str], prefix: str = "") -> RecipeError:
        """The same error as a RecipeError, with each setting named by `name_of(key)`."""
        return RecipeError(prefix + self.render(name_of))


def as_flag(key: str) -> str:
    """A spec field's command-line flag: `heads_fraction` -> `--heads-fraction`."""
    return "--" + key.replace("_", "-")


class LaunchError(RecipeError):
    """The launch (accelerate/DeepSpeed config, processes, rendezvous) and the recipe cannot run
    together; the message says which setting to change."""


class CheckpointError(DistillError):
    """A checkpoint cannot be written or used; the message says what to do."""


class DiskWriteError(DistillError):
    """A write failed (full disk, quota, read-only or failing file system); the message names the
    path, the free space there and what is still intact (see `distill.files.writing`)."""


class DamagedOutput(DistillError):
    """A file distill wrote earlier (a stage's output, the token store) no longer matches what was
    recorded when it was written; the message names the file and how to rebuild it."""


class UnsafeFileError(DistillError):
    """A file to load (checkpoint, model weights, cache) holds pickled objects other than tensors:
    refused, since unpickling them could run any code."""


class TrainingDiverged(DistillError):
    """Too many consecutive non-finite steps."""

    exit_code = EXIT_DIVERGED


class GateFailed(DistillError):
    """A stage's metric crossed an `eval.gates` threshold; the message names each failure."""

    exit_code = EXIT_GATE_FAILED


class StopRequested(DistillError):
    """Stopped by SIGTERM/SIGUSR1 at a safe point (after a checkpoint, or at a phase boundary with
    nothing unfinished marked done); run the same command again to resume."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, checkpoint: Path | None, phase: str | None = None):
        during = f" during {phase}" if phase else ""
        if checkpoint is not None:
            text = f"stopped by signal{during}; checkpoint {checkpoint}"
        else:
            text = f"stopped by signal{during}; nothing unfinished was marked done"
        super().__init__(
            f"{text}. Run the same command again to resume (exit code {EXIT_PREEMPTED})."
        )
        self.checkpoint, self.phase = checkpoint, phase


class OutputDirBusy(DistillError):
    """Another `distill` process holds the output folder's lock; the message names it."""
