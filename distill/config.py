"""The typed recipe: YAML in, validated dataclass-like models out.

Every setting has one declared home, with its default and a one-line doc: here, or for the models
and tokenizer in distill.model_specs, the eval sets and gates in distill.eval_specs, the objective,
pruning and quantization in distill.specs. Loading fails before any model is built, with one
message that names the key, the value, what is allowed and, for a misspelt key, the closest valid
key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from distill.eval_specs import GateSpec, HubEvalSet, LmEvalSpec, MetricBound  # noqa: F401
from distill.model_specs import ModelSpec, TokenizerSpec, TokenizerTrainSpec  # noqa: F401
from distill.output_names import check_stage_name
from distill.prompts_spec import OnPolicyEvalSpec, PromptsSpec
from distill.specs import (
    BATCH_MAX,
    LogitTerm,
    ObjectiveSpec,
    PruneSpec,
    QuantSpec,
    Section,
    Seed,
    UnitFloat,
)
from distill.targets import CT_GROUP_SIZES, EXPORT_FORMATS

TRAINING_KINDS = ("train", "distill", "qat")


# ----------------------------------------------------------------------------------------------
# Data


class DataSpec(Section):
    """Text to train and evaluate on: exactly one of `stdlib`, `files`, `hub`, or only `store`."""

    stdlib: bool = False
    """Use the Python standard library's own .py sources found on this machine (no download)."""
    files: list[str] | None = None
    """Text/JSON/JSONL/Parquet/CSV files or globs, or one `datasets.save_to_disk` directory."""
    hub: str | None = None
    """A hub dataset id for `datasets.load_dataset`."""
    hub_config: str | None = None
    split: str = "train"
    """Split of a hub or saved dataset to read."""
    format: Literal["auto", "text", "json", "parquet", "csv", "disk"] = "auto"
    """How to read `files`; auto picks by extension."""
    text_field: str = "text"
    """Column holding the text in JSON/Parquet/CSV/hub data."""
    seq_len: int = Field(128, ge=8, le=1 << 20)
    """Tokens per packed block."""
    eval_fraction: float = Field(0.035, gt=0, lt=1)
    """Fraction of documents held out, chosen by a stable hash of each document's id."""
    eval_max_blocks: int = Field(256, gt=0)
    """Evaluate on at most this many held-out blocks."""
    max_documents: int | None = Field(None, gt=0)
    """Read at most this many documents (in sorted order; for quick runs)."""
    stdlib_exclude: list[str] = [
        "test",
        "tests",
        "site-packages",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "tkinter",
        "ensurepip",
    ]
    """Top-level stdlib folders left out (tests and vendored code)."""
    streaming: bool = False
    """Read `hub` (or JSON/Parquet/CSV `files`) through datasets' streaming, never whole."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad document (undecodable, binary, not JSON, no text): stop naming it, or skip and count."""
    num_proc: int | None = Field(None, gt=0, le=4096)
    """Tokenizer worker processes (default: this machine's cores); the result is the same for any."""
    store: str | None = None
    """Token store directory to build or reuse (default: <output_dir>/data); alone, a prepared one."""
    shard_tokens: int = Field(1 << 28, gt=0)
    """Token ids per shard file of the store."""
    prompts: PromptsSpec | None = None
    """Prompts of on-policy steps and evaluation (default: the first tokens of the blocks)."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("stdlib", "files", "hub") if getattr(self, k)]
        if len(given) > 1 or not (given or self.store):
            raise ValueError(
                f"give exactly one data source of `stdlib: true`, `files: [...]`, `hub: <id>` (or "
                f"only `store: <prepared store>`); got {given or 'none'}"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Objective


# ----------------------------------------------------------------------------------------------
# Training


class TrainSpec(Section):
    max_steps: int = Field(100, gt=0, le=10**9)
    """Optimizer steps."""
    batch_size: int = Field(8, gt=0, le=BATCH_MAX)
    """Sequences per micro-batch per process."""
    grad_accum: int = Field(1, gt=0, le=BATCH_MAX)
    """Micro-batches per optimizer step."""
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final lr as a fraction of `lr` (cosine and linear)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Fraction of `max_steps` with linear warm-up."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[UnitFloat, UnitFloat] = (0.9, 0.95)
    """Adam's moment decay rates, each in [0, 1)."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the global gradient norm (0 = off)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision for forward passes."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on the held-out split every N steps (0 = only at the end)."""
    eval_batches: int | None = Field(None, gt=0)
    """Cap on held-out batches for periodic evals (the final eval uses all `data.eval_max_blocks`)."""
    log_every: int = Field(10, gt=0)
    save_every: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0 = only when stopped by a signal and at the end)."""
    keep_last: int = Field(2, ge=2)
    """Checkpoints kept; older ones are deleted only after a newer one is committed."""
    resume: Literal["auto", "never"] | str = "auto"
    """`auto` = newest valid checkpoint of the stage, `never`, or a checkpoint directory."""
    max_bad_steps: int = Field(5, gt=0)
    """Stop after this many consecutive steps with a non-finite loss or gradient norm."""
    seed: Seed | None = None
    """Seed for this stage (default: the recipe's seed)."""


class TeacherRef(Section):
    """Where a stage's teacher comes from: a model (run online) or an offline teacher cache."""

    model: str | None = None
    """A previous stage's name or a key of `models`."""
    cache: str | None = None
    """A `cache-teacher` stage's name, or a cache directory: the teacher is never loaded."""
    placement: Literal["auto", "replicate", "zero3"] = "auto"
    """Under DeepSpeed: a full frozen copy per device, or partitioned as an inference ZeRO-3 engine."""
    max_memory_fraction: float = Field(0.5, gt=0, le=1)
    """`auto` replicates when the teacher's weights fit in this fraction of device memory."""

    @model_validator(mode="after")
    def _one_source(self) -> TeacherRef:
        if (self.model is None) == (self.cache is None):
            raise ValueError(
                "give exactly one of `model` (a stage or `models` key, run online) or `cache` "
                "(a `cache-teacher` stage or a cache directory)"
            )
        return self


class CacheSpec(Section):
    """What a `cache-teacher` stage writes: the teacher's top-k log-probabilities at T = 1 and
    their ids for every position of the cached blocks, optionally hidden states of some layers."""

    k: int = Field(32, ge=1, le=1024)
    """Top-k tokens kept per position; the rest of the mass is one tail bucket."""
    tail_samples: int = Field(32, ge=0, le=1024)
    """Tokens drawn per position from the teacher's tail (outside the top k), one id each plus 2
    bytes: they make the forward KL (T = 1) from the cache unbiased for the whole vocabulary.
    0: the top k and the tail's mass only (a student learns the tail's shape from CE alone)."""
    hidden_layers: list[int] = []
    """0-based teacher layers whose outputs are stored (bf16) for offline hidden-state losses."""
    blocks: int | None = Field(None, gt=0)
    """Cache the first N training blocks (default: all)."""
    batch_size: int = Field(16, gt=0, le=BATCH_MAX)
    """Blocks per teacher forward, per process."""
    shard_blocks: int = Field(256, gt=0)
    """Blocks per shard file (the unit of atomic writes and of resume)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision of the teacher forward."""
    placement: Literal["auto", "replicate", "zero3"] = "auto"
    """As `teacher.placement` of a distill stage."""
    max_memory_fraction: float = Field(0.5, gt=0, le=1)


def _teacher_from_string(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


def _trains_on_something(objective: ObjectiveSpec) -> ObjectiveSpec:
    """All weights 0 gives a zero loss: the stage would run to the end and only decay weights."""
    weights = [objective.ce_weight, *(term.weight for term in objective.terms)]
    if objective.hidden is not None:
        weights.append(objective.hidden.weight)
    if not any(weight > 0 for weight in weights):
        raise ValueError(
            "every weight is 0 (ce_weight, each term's weight, hidden.weight), so the stage "
            "would train on nothing; give at least one a weight above 0"
        )
    return objective


class EvalSpec(Section):
    batch_size: int = Field(16, gt=0, le=BATCH_MAX)
    latency: bool = False
    """Also measure generation: time of `latency_tokens` tokens, tokens/s, time to first token,
    peak memory."""
    latency_tokens: int = Field(128, gt=0, le=BATCH_MAX)
    sets: dict[str, list[str] | HubEvalSet] = {}
    """More eval sets beside `heldout` (the training data's held-out split): name -> files or
    globs (`${stdlib}` is this Python's standard library folder), or a hub dataset id."""
    set_max_blocks: int = Field(64, gt=0)
    """Evaluate on at most this many `seq_len` blocks of each set of `sets`."""
    position_buckets: int = Field(4, ge=1)
    """Perplexity by position: the block split into this many equal spans."""
    teacher: str | None = None
    """Teacher for agreement and KL in stages that have none (a stage or a `models` key)."""
    agreement_blocks: int = Field(64, gt=0)
    """Held-out blocks for teacher agreement and KL."""
    lm_eval: LmEvalSpec | None = None
    on_policy: OnPolicyEvalSpec | None = None
    """Teacher NLL of the model's own greedy and sampled completions of held-out prompts."""
    gates: list[GateSpec] = []
    """Recipe-wide only: checked after every stage ran and the report is written."""

    @field_validator("sets", mode="before")
    @classmethod
    def _hub_from_string(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"hub": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("sets")
    @classmethod
    def _not_heldout(cls, value: dict) -> dict:
        if "heldout" in value:
            raise ValueError(
                "`heldout` is the training data's held-out split; name the set otherwise"
            )
        empty = [name for name, source in value.items() if source == []]
        if empty:
            raise ValueError(f"eval set {empty[0]!r} lists no files; give files or globs")
        return value


# ----------------------------------------------------------------------------------------------
# Stages


class StageBase(Section):
    name: str
    """Unique stage name; also its output folder."""
    model: str
    """The model this stage starts from: a previous stage's name or a key of `models`."""
    eval: EvalSpec | None = None
    """Overrides the recipe's `eval` for this stage."""
    compare_to: str | None = None
    """An earlier stage to compare with in the report (e.g. the baseline a distilled student beats)."""

    _name = field_validator("name")(check_stage_name)

    @property
    def teacher_model(self) -> str | None:
        """The model this stage learns from (a stage name or `models` key), or None."""
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            return teacher.model  # None when the teacher is a cache
        return self.model if self.kind == "qat" else None  # QAT: the full-precision model

    @property
    def teacher_cache(self) -> str | None:
        """The offline teacher cache this stage reads (a stage name or a directory), or None."""
        teacher = getattr(self, "teacher", None)
        return teacher.cache if teacher is not None else None


class TrainingStageBase(StageBase):
    train: TrainSpec = TrainSpec()


class TrainStage(TrainingStageBase):
    kind: Literal["train"]


class DistillStage(TrainingStageBase):
    kind: Literal["distill"]
    teacher: Annotated[TeacherRef, Field()]
    objective: ObjectiveSpec = ObjectiveSpec()
    keep_sparsity: bool | Literal["auto"] = "auto"
    """Keep pruned weights at zero (auto: when the student comes from a prune stage)."""

    _teacher = field_validator("teacher", mode="before")(_teacher_from_string)
    _objective = field_validator("objective")(_trains_on_something)


class CacheTeacherStage(StageBase):
    """Runs the teacher (`model`) once over the training blocks and writes its outputs."""

    kind: Literal["cache-teacher"]
    cache: CacheSpec = CacheSpec()


class PruneStage(StageBase):
    kind: Literal["prune"]
    prune: PruneSpec


class PtqStage(StageBase):
    kind: Literal["ptq"]
    quant: QuantSpec = QuantSpec()


class QatStage(TrainingStageBase):
    kind: Literal["qat"]
    quant: QuantSpec = QuantSpec()
    teacher: TeacherRef | None = None
    """Full-precision teacher (default: the model this stage starts from)."""
    objective: ObjectiveSpec = ObjectiveSpec(
        ce_weight=0.0, terms=[LogitTerm(kind="forward_kl", weight=1.0)]
    )
    fake_quant_after: int = Field(0, ge=0)
    """Train this many steps in full precision before fake quantization starts."""

    _teacher = field_validator("teacher", mode="before")(_teacher_from_string)
    _objective = field_validator("objective")(_trains_on_something)


class ExportStage(StageBase):
    kind: Literal["export"]
    formats: list[str] = Field(min_length=1)
    """Formats to write, each loaded back and evaluated through its runtime: ct-w4a16, ct-w8a16
    (compressed-tensors for vLLM), gguf-q4_0, gguf-q8_0, gguf-f16, gguf-bf16, gguf-f32
    (llama.cpp), safetensors-bf16, safetensors-fp16."""
    group_size: int | None | Literal["auto"] = "auto"
    """compressed-tensors: input columns per scale (32, 64, 128; null: per output channel); auto:
    the group of the symmetric `ptq`/`qat` scheme the model was trained with, else 32."""
    embeddings: Literal["q8_0", "f16"] | None = None
    """GGUF: the type of token embeddings and output head (default: Q8_0 in Q4_0/Q8_0 files)."""

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in EXPORT_FORMATS]
        if bad:
            raise ValueError(f"unknown formats {bad}; supported: {', '.join(EXPORT_FORMATS)}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | str | None) -> int | str | None:
        if v not in (None, "auto", *CT_GROUP_SIZES):
            raise ValueError(
                f"group_size must be auto, null (per output channel) or one of the served sizes "
                f"{', '.join(map(str, CT_GROUP_SIZES))}"
            )
        return v


class EvaluateStage(StageBase):
    """Evaluate an earlier stage's output (or a model of `models`) with this stage's `eval`;
    writes no model of its own."""

    kind: Literal["evaluate"]


Stage = Annotated[
    Union[  # noqa: UP007
        TrainStage,
        DistillStage,
        CacheTeacherStage,
        PruneStage,
        PtqStage,
        QatStage,
        ExportStage,
        EvaluateStage,
    ],
    Field(discriminator="kind"),
]


class WandbSpec(Section):
    project: str = "distill"
    entity: str | None = None
    name: str | None = None
    """Run name (default: recipe name and stage)."""
    mode: Literal["online", "offline", "disabled"] = "disabled"
    tags: list[str] = []


class TrackingSpec(Section):
    wandb: WandbSpec = WandbSpec()


class Recipe(Section):
    """A whole job: data, tokenizer, models and the stages that turn them into a small model."""

    name: str = "run"
    """The run's name (no `/`, not empty, `.` or `..`: it is part of the default `output_dir`)."""
    output_dir: str = "runs/${name}"
    """Where every stage writes; `${name}` is replaced by the recipe's name."""
    seed: Seed = 0
    data: DataSpec
    tokenizer: TokenizerSpec = TokenizerSpec()
    models: dict[str, ModelSpec]
    """Named starting points. A stage's `model`/`teacher` names an earlier stage (its output model)
    or, when no earlier stage has that name, one of these."""
    train: dict[str, Any] = {}
    """Defaults merged into every training stage's `train` block."""
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    stages: list[Stage]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value.strip() in ("", ".", "..") or "/" in value or "\\" in value:
            raise ValueError(
                f"the recipe's name {value!r} must be a plain name (not empty, `.` or `..`, no "
                "`/`): `${name}` in `output_dir` is replaced by it"
            )
        return value

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "`output_dir` is empty, which would write into the current directory; give a "
                "folder (`.` if you mean the current one)"
            )
        return value

    @field_validator("stages")
    @classmethod
    def _some_stages(cls, value: list) -> list:
        if not value:
            raise ValueError("a recipe needs at least one stage (see recipes/quickstart.yaml)")
        return value

    @model_validator(mode="after")
    def _buckets_fit(self) -> Recipe:
        evals = [("eval", self.eval)] + [
            (f"stages.{i}.eval", s.eval) for i, s in enumerate(self.stages)
        ]
        for where, spec in evals:
            if spec is not None and spec.position_buckets >= self.data.seq_len:
                raise ValueError(
                    f"{where}.position_buckets={spec.position_buckets} must be below data.seq_len="
                    f"{self.data.seq_len}: each bucket is a span of the block's predicted positions"
                )
        return self

    @field_validator("train")
    @classmethod
    def _train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key not in TrainSpec.model_fields:
                close = difflib.get_close_matches(str(key), list(TrainSpec.model_fields), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown key {key!r}.{hint} Allowed: {', '.join(TrainSpec.model_fields)}"
                )
        return value

    @model_validator(mode="after")
    def _references(self) -> Recipe:
        seen: list[str] = []
        exported: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages.{i}.name: stage name {stage.name!r} is used twice")
            refs = [("model", stage.model)]
            if stage.compare_to is not None:
                refs.append(("compare_to", stage.compare_to))
            teacher = getattr(stage, "teacher", None)
            if teacher is not None and teacher.model is not None:
                refs.append(("teacher.model", teacher.model))
            for key, ref in refs:
                if ref in exported and stage.kind != "evaluate":
                    raise ValueError(
                        f"stages.{i}.{key}: {ref!r} is an `export` stage; its files are for "
                        "servers; name the stage it exported instead"
                    )
                if ref not in seen and ref not in self.models:
                    allowed = list(dict.fromkeys(seen + list(self.models)))
                    close = difflib.get_close_matches(ref, allowed, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"stages.{i}.{key}: {ref!r} is neither an earlier stage nor a key of "
                        f"`models` (allowed: {', '.join(allowed) or 'none'}){hint}"
                    )
            _check_cache_ref(self, i, stage, seen)
            seen.append(stage.name)
            if stage.kind == "export":
                exported.add(stage.name)
            if stage.eval is not None and stage.eval.gates:
                raise ValueError(f"stages.{i}.eval.gates: gates are recipe-wide; use `eval.gates`")
        teacher = self.eval.teacher
        if teacher is not None and teacher not in seen and teacher not in self.models:
            raise ValueError(
                f"eval.teacher: {teacher!r} is neither a stage nor a key of `models` (allowed: "
                f"{', '.join(dict.fromkeys(seen + list(self.models)))})"
            )
        for i, gate in enumerate(self.eval.gates):
            for key in ("stage", "against"):
                ref = getattr(gate, key)
                if ref is not None and ref not in seen:
                    close = difflib.get_close_matches(ref, seen, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"eval.gates.{i}.{key}: {ref!r} is not a stage (stages: "
                        f"{', '.join(seen)}){hint}"
                    )
        return self

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))

    def stage(self, name: str) -> Any:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def fingerprint(self, *parts: Any) -> str:
        """A stable hash of JSON-serialisable settings (for skipping finished stages)."""
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_cache_ref(recipe: Recipe, index: int, stage, seen: list[str]) -> None:
    """A `teacher.cache` naming a stage must name an earlier `cache-teacher` stage (anything else
    is read as a directory); a cache-teacher stage's `model` is its teacher."""
    cache = stage.teacher_cache
    if cache is None or cache not in {s.name for s in recipe.stages}:
        return
    if cache not in seen:
        raise ValueError(f"stages.{index}.teacher.cache: stage {cache!r} runs after this one")
    kind = recipe.stage(cache).kind
    if kind != "cache-teacher":
        raise ValueError(
            f"stages.{index}.teacher.cache: {cache!r} is a `{kind}` stage, not a `cache-teacher` "
            f"stage; write `teacher: {cache}` to run it online"
        )


# ----------------------------------------------------------------------------------------------
# Loading, overrides, error messages
