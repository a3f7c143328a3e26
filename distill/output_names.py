"""The names distill gives its own files and folders in a run's output folder, beside the stage
folders, and the check that keeps a stage's name from colliding with them."""

from __future__ import annotations

import re

RESERVED_NAMES = (
    "tokenizer",  # data/prepare.py: the run's tokenizer, rebuilt when its fingerprint differs
    "data",  # data/prepare.py: the token store (`data.partial` while built, `data.lock`)
    "eval",  # run/eval_sets.py: packed eval sets
    "recipe.yaml",  # run/pipeline.py: the resolved recipe
    "summary.json",  # run/report.py (`summary.tmp` while written)
    "report.md",  # run/report.py
    "report.png",  # run/report_plots.py
    "report_curves.png",  # run/report_plots.py
    "wandb",  # tracking.py: W&B's own run folder
)
"""Names distill writes beside the stage folders in the output folder; a stage named so would
clobber them or be wiped. Also refused: the temporary and moved-aside names (`*.tmp`,
`*.partial`, `*.lock`, `<stage>.previous-<fingerprint>`) and, by the name pattern, hidden names
(`.distill.lock`), paths and `..`."""

RESERVED_SUFFIXES = (".tmp", ".partial", ".lock")

STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_stage_name(name: str) -> str:
    """`name`, if it can be a stage's folder in the output folder; else a ValueError listing the
    reserved names."""
    lowered = name.lower()  # a case-insensitive file system (macOS) sees `Tokenizer` as `tokenizer`
    if (
        not STAGE_NAME.fullmatch(name)
        or lowered in RESERVED_NAMES
        or lowered.endswith(RESERVED_SUFFIXES)
        or ".previous-" in lowered
    ):
        raise ValueError(
            f"stage name {name!r} cannot be a folder of the output folder: use letters, digits, "
            "`_`, `.` and `-`, starting with a letter or digit, and none of the names distill "
            f"writes there itself ({', '.join(RESERVED_NAMES)}, names ending in "
            f"{', '.join(RESERVED_SUFFIXES)} or holding `.previous-`)"
        )
    return name
