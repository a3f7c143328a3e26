"""Where metrics go: a JSONL file that is always written, and Weights & Biases when enabled.

W&B is never required: disabled, offline, missing or unreachable, training goes on. The W&B run id is
kept in checkpoints so a resumed stage continues the same W&B run with increasing steps.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
from pathlib import Path

from distill.config import WandbSpec
from distill.files import writing


class Tracker:
    """Main-process metrics sink; other ranks get a tracker that drops everything."""

    def __init__(
        self,
        metrics_path: Path | None,
        wandb_spec: WandbSpec | None = None,
        run_name: str = "run",
        config: dict | None = None,
        run_id: str | None = None,
        group: str | None = None,
    ):
        self.metrics_path = metrics_path
        self.run_id = run_id
        self._wandb_run = None
        if metrics_path is None:
            return
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: a row that cannot be written (a full disk) is cut off at once, not left in a
        # buffer that the next write or close would fail on again
        self._fh = open(metrics_path, "ab", buffering=0)  # noqa: SIM115 - lives as the tracker
        if wandb_spec is not None and wandb_spec.mode != "disabled":
            self._start_wandb(wandb_spec, run_name, config or {}, group)

    def _start_wandb(self, spec: WandbSpec, run_name: str, config: dict, group: str | None):
        try:
            import wandb
        except ImportError:
            print(
                "distill: tracking.wandb is enabled but wandb is not installed "
                "(pip install 'distill[wandb]'); continuing with metrics.jsonl only",
                file=sys.stderr,
            )
            return
        if self.run_id is None:
            # not `random`: drawing from the global RNG would change the training run
            self.run_id = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)
            )
        try:
            self._wandb_run = wandb.init(
                project=spec.project,
                entity=spec.entity,
                name=spec.name or run_name,
                mode=spec.mode,
                id=self.run_id,
                resume="allow",
                config=config,
                group=group,
                tags=spec.tags,
                reinit="create_new",
            )
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop training
            print(
                f"distill: W&B unavailable ({err}); continuing with metrics.jsonl", file=sys.stderr
            )
            self._wandb_run = None

    def log(self, metrics: dict, step: int) -> None:
        if self.metrics_path is None:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        data = memoryview((json.dumps(row) + "\n").encode())
        end = os.fstat(self._fh.fileno()).st_size
        with writing(
            self.metrics_path,
            f"appending a row to {self.metrics_path}",
            "Its earlier rows are intact, and so are the stage's checkpoints",
            cleanup=lambda: os.ftruncate(self._fh.fileno(), end),  # no half row
        ):
            while data:  # a short write is followed by one that says why
                data = data[self._fh.write(data) :]
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(metrics, step=step)
            except Exception as err:  # noqa: BLE001
                print(f"distill: W&B log failed ({err}); continuing", file=sys.stderr)

    def close(self) -> None:
        if self.metrics_path is None:
            return
        self._fh.close()
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception:  # noqa: BLE001
                pass
            self._wandb_run = None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def log_report(
    spec: WandbSpec, recipe_name: str, header: list[str], rows: list[list[str]], images: list[Path]
) -> None:
    """The run report as a W&B run of its own (`<name>/report`): the stage table and the plots.
    Any W&B failure only prints: the report files are already written."""
    try:
        import wandb
    except ImportError:
        print("distill: report not logged to W&B: pip install 'distill[wandb]'", file=sys.stderr)
        return
    try:
        run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            name=f"{spec.name or recipe_name}/report",
            mode=spec.mode,
            group=recipe_name,
            tags=spec.tags,
            job_type="report",
            reinit="create_new",
        )
        table = wandb.Table(columns=header, data=rows)
        run.log(
            {"report/stages": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in images}}
        )
        run.finish()
    except Exception as err:  # noqa: BLE001 - W&B is optional; the report files hold everything
        print(f"distill: report not logged to W&B ({err})", file=sys.stderr)
