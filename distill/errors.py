"""Every way a `distill` command can end, in one place: the error types and their exit codes.

Each error carries its exit code, so the CLI maps exceptions to codes with one rule and every rank
of a multi-process run exits with the documented code.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_DIVERGED = 1  # training stopped after too many non-finite steps
EXIT_BAD_INPUT = 2  # recipe, paths, data, checkpoint, launch: the message says what to change
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; run again to resume
EXIT_INTERRUPTED = 130  # a second signal or Ctrl-C: stopped at once, the last checkpoint remains


class DistillError(Exception):
    """Base of every error `distill` reports to a user; `exit_code` is what the command returns."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(DistillError, ValueError):
    """A recipe (or an override, a flag, an input file) that cannot run; the message says what to
    change."""


class SettingError(RecipeError):
    """A bad value of one named setting, found by a library function that takes a spec.

    The message holds `{key}` where the setting's name goes, so the caller names it the way the
    user wrote it: `prune.heads_fraction` in a recipe, `--heads-fraction` on the command line.
    """

    def __init__(self, key: str, template: str):
        super().__init__(template.format(key=key))
        self.key, self.template = key, template

    def named(self, name_of) -> RecipeError:
        """The same error with the setting named by `name_of(key)`."""
        return RecipeError(self.template.format(key=name_of(self.key)))


class LaunchError(RecipeError):
    """The launch (accelerate/DeepSpeed config, processes, rendezvous) and the recipe cannot run
    together; the message says which setting to change."""


class CheckpointError(DistillError):
    """A checkpoint cannot be written or used; the message says what to do."""


class TrainingDiverged(DistillError):
    """Too many consecutive non-finite steps."""

    exit_code = EXIT_DIVERGED


class StopRequested(DistillError):
    """Raised after a signal-triggered checkpoint; run the same command again to resume."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, checkpoint: Path | None):
        super().__init__(
            f"stopped by signal; checkpoint {checkpoint}. Run the same command again to resume "
            f"(exit code {EXIT_PREEMPTED})."
        )
        self.checkpoint = checkpoint
