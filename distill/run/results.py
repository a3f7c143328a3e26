"""What a finished stage produced and measured, typed: one `StageResult` per stage. Its JSON form
is the stage's entry in `summary.json` (and in its `stage.json`), keys as documented there."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class StageResult:
    name: str
    kind: str
    model_dir: str
    """The stage's output model directory."""
    source: str
    """The model it started from (a stage name or a `models` key); `from` in JSON."""
    params: int
    size_bytes: int
    perplexity: float
    """Held-out perplexity (with fake quantization on for `ptq` and `qat`)."""
    loss: float
    scheme: str
    """Quantization scheme name, or the dtype of the stored float weights ("fp32", "bf16")."""
    steps: int = 0
    wall_s: float = 0.0
    """The whole stage: loading, training, evaluation, export."""
    train_wall_s: float | None = None
    """The training loop alone."""
    tokens: int | None = None
    tokens_per_s: float | None = None
    skipped_steps: int | None = None
    teacher: str | None = None
    teacher_agreement: float | None = None
    compare_to: str | None = None
    """The stage the report compares this one with."""
    recovered_fraction: float | None = None
    """Share of what pruning or PTQ lost that this stage won back."""
    keep_sparsity: bool | None = None
    sparsity: float | None = None
    method: str | None = None
    params_before: int | None = None
    perplexity_before: float | None = None
    """Prune and ptq stages: the model's held-out perplexity before pruning or rounding."""
    details: dict | None = None
    """Prune stages: what was removed (the prune record's details)."""
    fake_quant_after: int | None = None
    teacher_cache: str | None = None
    """Training stages: the offline teacher cache they read."""
    on_policy: dict | None = None
    """On-policy training stages: steps, generated tokens, generation vs training time, mean
    completion length, the teacher's mean log-probability of the samples."""
    k: int | None = None
    """`cache-teacher` stages: top-k tokens stored per position."""
    tail_samples: int | None = None
    """`cache-teacher` stages: tokens sampled from the teacher's tail per position."""
    bytes_per_token: float | None = None
    """`cache-teacher` stages: bytes on disk per cached position."""
    latency_s: float | None = None
    latency_dtype: str | None = None
    float_latency_s: float | None = None
    exports: list[dict] | None = None
    """Export stages: each file written (format, path, bytes, grid) and what its runtimes measured."""
    metrics: dict | None = None
    """Everything evaluation measured on the stage's output as served (keys in the README):
    `sets.<name>.{perplexity, loss, tokens, position_buckets, position_perplexity}`,
    `teacher.{model, top1_agreement, kl}`, `lm_eval.<task>/<metric>`, `speed.{tokens_per_s,
    time_to_first_token_s, peak_mem_bytes, ...}`, `format`, `eval_wall_s`."""

    def to_json(self) -> dict[str, Any]:
        """The summary entry: unset fields left out, `perplexity`/`loss` under `eval`."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for key, value in asdict(self).items():
            if key in ("name", "kind", "perplexity", "loss") or value is None:
                continue
            out["from" if key == "source" else key] = value
            if key == "size_bytes":
                out["eval"] = {"perplexity": self.perplexity, "loss": self.loss}
        return out

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> StageResult:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k in known}
        values["source"] = entry["from"]
        values["perplexity"] = entry["eval"]["perplexity"]
        values["loss"] = entry["eval"]["loss"]
        return cls(**values)
