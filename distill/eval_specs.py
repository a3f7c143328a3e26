"""The parts of the `eval` section that name what else to measure and what must hold: hub eval
sets, lm-eval tasks, and the gates a run must pass (exit code 3 when one fails)."""

from __future__ import annotations

from pydantic import Field, model_validator

from distill.specs import BATCH_MAX, Section


class HubEvalSet(Section):
    """A hub dataset as an eval set (a plain string in `eval.sets` is its `hub` id)."""

    hub: str
    config: str | None = None
    split: str = "test"
    text_field: str = "text"


class LmEvalSpec(Section):
    """lm-eval harness tasks, run through its Python API on each stage's model."""

    tasks: list[str] = Field(min_length=1)
    """Task names: local YAMLs under `include_path` (and distill's own, e.g. `stdlib_docstrings`),
    or hub tasks when the machine is online."""
    include_path: list[str] = []
    """Extra folders of task YAMLs (distill's own task folder is always searched)."""
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(None, gt=0)
    """Documents per task (a count, or a fraction when below 1)."""
    batch_size: int = Field(16, gt=0, le=BATCH_MAX)


class MetricBound(Section):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> MetricBound:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min={self.min} is above max={self.max}: no score can pass")
        return self


class GateSpec(Section):
    """A condition a stage must meet; a run whose gate fails exits with code 3."""

    stage: str
    against: str | None = None
    """The stage `max_perplexity_increase` compares with."""
    set: str = "heldout"
    """The eval set whose perplexity is compared."""
    max_perplexity_increase: float | None = Field(None, ge=0)
    """Allowed relative increase over `against` (0.02 = 2 %)."""
    min_teacher_agreement: float | None = Field(None, ge=0, le=1)
    """Top-1 agreement with the teacher, at least."""
    lm_eval: dict[str, MetricBound] = {}
    """`<task>/<metric>: {min: x, max: y}` bounds on lm-eval scores."""

    @model_validator(mode="after")
    def _against_given(self) -> GateSpec:
        if self.max_perplexity_increase is not None and self.against is None:
            raise ValueError(
                "`max_perplexity_increase` needs `against` (the stage to compare with)"
            )
        return self
