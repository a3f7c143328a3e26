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

from distill.specs import LogitTerm, ObjectiveSpec, PruneSpec, QuantSpec, Section

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
    """Train on at most this many characters of the training split."""


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
    """Text to train and evaluate on: exactly one of `stdlib`, `files`, `hub`."""

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

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("stdlib", "files", "hub") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one data source of `stdlib: true`, `files: [...]`, `hub: <id>`; got "
                f"{given or 'none'}"
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


class EvalSpec(Section):
    batch_size: int = Field(16, gt=0)
    latency: bool = False
    """Also time greedy generation of `latency_tokens` tokens on CPU."""
    latency_tokens: int = Field(128, gt=0)


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


class ConvertStage(StageBase):
    kind: Literal["convert"]
    quant: QuantSpec | None = None
    """Scheme to convert to (default: the scheme of the `qat`/`ptq` stage named in `model`)."""


Stage = Annotated[
    Union[  # noqa: UP007
        TrainStage, DistillStage, CacheTeacherStage, PruneStage, PtqStage, QatStage, ConvertStage
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
        converted: set[str] = set()
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
                if ref in converted:
                    raise ValueError(
                        f"stages.{i}.{key}: {ref!r} is a `convert` stage; its packed low-bit "
                        "model is for inference (distill.compress.packed.load_quantized) and cannot be "
                        "trained, pruned, quantized or used as a teacher; name the stage it was "
                        "converted from instead"
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
            if stage.kind == "convert":
                converted.add(stage.name)
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
