"""The recipe sections of on-policy distillation's prompts: where a stage's prompts come from
(`data.prompts`) and the on-policy evaluation (`eval.on_policy`). Kept beside distill.config, which
imports them, so that module stays one reader's size."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.specs import Section


class PromptsSpec(Section):
    """Prompts the student completes in on-policy steps and evaluation: the first `prompt_tokens`
    of the token store's blocks (default), or records of `files` / a `hub` dataset."""

    files: list[str] | None = None
    """JSON/JSONL/Parquet/CSV/text files or globs holding one prompt per record (`field`)."""
    hub: str | None = None
    """A hub dataset id with a `field` column of prompts."""
    hub_config: str | None = None
    split: str = "train"
    format: Literal["auto", "text", "json", "parquet", "csv", "disk"] = "auto"
    field: str = "prompt"
    """Column or key holding the prompt text."""
    prompt_tokens: int = Field(32, ge=1)
    """Blocks: the prompt is a block's first N tokens. Files/hub: each prompt keeps its last N
    tokens (left-padded when shorter)."""
    max_prompts: int | None = Field(None, gt=0)
    """Read at most this many records (files/hub)."""
    eval_fraction: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False)
    """Files/hub: share of prompts held out for evaluation, by a stable hash of each record's id
    (blocks: the held-out split's blocks are the held-out prompts)."""

    @model_validator(mode="after")
    def _one_source(self) -> PromptsSpec:
        if self.files is not None and self.hub is not None:
            raise ValueError("give at most one of `files` and `hub` (neither: the token store)")
        if self.files is not None and not self.files:
            raise ValueError("`files` is empty; list prompt files, or remove it to use blocks")
        return self

    @property
    def source(self) -> str:
        return "files" if self.files else "hub" if self.hub else "blocks"


class OnPolicyEvalSpec(Section):
    """The teacher's per-token negative log-likelihood of the student's own completions of
    held-out prompts, greedy and sampled (needs a teacher: the stage's or `eval.teacher`)."""

    prompts: int = Field(32, gt=0)
    """Held-out prompts completed."""
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    batch_size: int = Field(16, gt=0)
    seed: int = 0
    """Seed of the sampled completions (the same prompts and draws for every stage)."""
