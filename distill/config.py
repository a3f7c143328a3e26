"""The typed recipe: YAML in, validated dataclass-like models out.

Every setting has one declared home here, with its default and a one-line doc. Loading fails before
any model is built, with one message that names the key, the value, what is allowed and, for a
misspelt key, the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from distill.prompts_spec import OnPolicyEvalSpec, PromptsSpec
from distill.specs import LogitTerm, ObjectiveSpec, PruneSpec, QuantSpec, Section
from distill.targets import EXPORT_FORMATS

TRAINING_KINDS = ("train", "distill", "qat")


# ----------------------------------------------------------------------------------------------
# Models and tokenizer


class ModelSpec(Section):
    """Where a model comes from: a local directory or hub id (`path`), or a config (`config`)."""

    path: str | None = None
    """Local directory or hub id loaded with AutoModelForCausalLM.from_pretrained."""
    config: dict[str, Any] | None = None
    """A transformers config (`model_type` plus fields) for a model trained from scratch."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype when loaded; training math follows `train.precision`."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo (only for repos you trust)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `path` is a hub id."""
    attn_implementation: str | None = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (student only)."""
    lora: LoraSpec | None = None
    """Train PEFT LoRA adapters instead of all weights (student only)."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.config is None):
            raise ValueError(
                "give exactly one of `path` (a local directory or hub id) or `config` "
                "(a transformers config with `model_type`)"
            )
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("`config` needs a `model_type` (for example `llama` or `qwen2`)")
        return self


class LoraSpec(Section):
    r: int = Field(16, gt=0)
    """Adapter rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear`."""
    merge_on_save: bool = True
    """Merge adapters into the weights when the stage's model is exported."""


ModelSpec.model_rebuild()


class TokenizerTrainSpec(Section):
    vocab_size: int = Field(4096, ge=260, le=1_000_000)
    """Byte-level BPE vocabulary size, special tokens included."""
    min_frequency: int = Field(2, ge=1)
    max_chars: int = Field(50_000_000, gt=0)
    """Train on at most this many characters of the training split (read in order)."""
    max_documents: int | None = Field(1_000_000, gt=0)
    """Train on at most this many documents of the training split (null: `max_chars` alone)."""


class TokenizerSpec(Section):
    """Where the tokenizer comes from: the first model's path, a path, or trained by the recipe."""

    source: Literal["model", "path", "train"] = "model"
    path: str | None = None
    """Tokenizer directory or hub id when `source: path`."""
    train: TokenizerTrainSpec = TokenizerTrainSpec()

    @model_validator(mode="after")
    def _path_given(self) -> TokenizerSpec:
        if self.source == "path" and not self.path:
            raise ValueError("`source: path` needs `path` (a tokenizer directory or hub id)")
        return self


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
    seq_len: int = Field(128, ge=8)
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
    num_proc: int | None = Field(None, gt=0)
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
    max_steps: int = Field(100, gt=0)
    """Optimizer steps."""
    batch_size: int = Field(8, gt=0)
    """Sequences per micro-batch per process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final lr as a fraction of `lr` (cosine and linear)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Fraction of `max_steps` with linear warm-up."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
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
    seed: int | None = None
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

    k: int = Field(64, ge=1, le=1024)
    """Top-k tokens kept per position; the rest of the mass is one tail bucket."""
    hidden_layers: list[int] = []
    """0-based teacher layers whose outputs are stored (bf16) for offline hidden-state losses."""
    blocks: int | None = Field(None, gt=0)
    """Cache the first N training blocks (default: all)."""
    batch_size: int = Field(16, gt=0)
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
    batch_size: int = Field(16, gt=0)


class MetricBound(Section):
    min: float | None = None
    max: float | None = None


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


class EvalSpec(Section):
    batch_size: int = Field(16, gt=0)
    latency: bool = False
    """Also measure generation: time of `latency_tokens` tokens, tokens/s, time to first token,
    peak memory."""
    latency_tokens: int = Field(128, gt=0)
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
        return value


# ----------------------------------------------------------------------------------------------
# Stages


class StageBase(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Unique stage name; also its output folder."""
    model: str
    """The model this stage starts from: a previous stage's name or a key of `models`."""
    eval: EvalSpec | None = None
    """Overrides the recipe's `eval` for this stage."""
    compare_to: str | None = None
    """An earlier stage to compare with in the report (e.g. the baseline a distilled student beats)."""

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
    output_dir: str = "runs/${name}"
    """Where every stage writes; `${name}` is replaced by the recipe's name."""
    seed: int = 0
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

    @field_validator("train")
    @classmethod
    def _train_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key not in TrainSpec.model_fields:
                close = difflib.get_close_matches(key, list(TrainSpec.model_fields), n=1)
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
