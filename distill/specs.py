"""The settings that library functions take as they are: the distillation objective (logit terms,
hidden-state loss), pruning and quantization. Each is also a section of the recipe (distill.config),
validated at load with the same messages, so an error names the setting the same way everywhere."""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.errors import RecipeError, SettingError
from distill.targets import grid_name, resolve_target


class Section(BaseModel):
    # No setting means anything at inf or nan, and inf passes every lower bound (`lr: .inf`
    # trains to nan without an error): every float of every section must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads `true` as 1 in a number field (`batch_size: true`)
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field and _number_not_bool(field.annotation):
                    raise ValueError(f"`{key}` takes a number, got {str(value).lower()}")
        return data


def _leaf_types(annotation: Any) -> list:
    if typing.get_origin(annotation) is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in _leaf_types(arg)]
    return [annotation]


def _number_not_bool(annotation: Any) -> bool:
    leaves = _leaf_types(annotation)
    return bool not in leaves and any(t in (int, float) for t in leaves)


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A seed numpy and torch both accept (torch's generators take 64 bits, numpy's legacy one 32)."""

UnitFloat = Annotated[float, Field(ge=0, lt=1)]
"""A fraction in [0, 1), such as a decay rate."""

BATCH_MAX = 65536
"""Upper bound of batch sizes and token counts generated: far above any real run, low enough
that a typo (a few more zeros) fails at load instead of hanging while indices are built."""


LOGIT_LOSS_KINDS = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tv",
    "logit_mse",
)


class LogitTerm(Section):
    """One weighted logit-distillation term of the objective (the recipe's `objective.terms`
    items, and what the loss functions take)."""

    kind: str
    """Divergence between teacher and student token distributions: one of LOGIT_LOSS_KINDS."""
    weight: float = 1.0
    """Multiplies ``T**2 * term`` in the total; >= 0 (0 logs the term without training on it)."""
    temperature: float = 1.0
    """Softening temperature T of both sides, > 0; the term is scaled by T² so gradient size stays
    comparable."""
    beta: float = 0.5
    """`jsd` only: 0 gives KL(teacher || student), 1 gives KL(student || teacher) (TRL convention)."""
    alpha: float = 0.1
    """`skew_kl` / `skew_reverse_kl` only: skew of the mixture, in [0, 1]; 0 is the plain KL."""

    def __init__(self, kind: str | None = None, /, **fields: Any):
        """`LogitTerm("jsd", beta=0.3)` as well as `LogitTerm(kind="jsd", beta=0.3)`."""
        super().__init__(**({"kind": kind} if kind is not None else {}), **fields)

    @model_validator(mode="after")
    def _ranges(self) -> LogitTerm:
        if self.kind not in LOGIT_LOSS_KINDS:
            raise ValueError(
                f"unknown logit loss kind {self.kind!r}; use one of {', '.join(LOGIT_LOSS_KINDS)}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"{self.kind}: temperature must be a finite number greater than 0, i.e. > 0, got "
                f"{self.temperature}; use 1.0 for no softening (typical KD values are 1 to 4)"
            )
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(
                f"{self.kind}: weight must be a finite number >= 0, got {self.weight}; "
                "use 0 to log a term without training on it"
            )
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{self.kind}: {name} must be in [0, 1], got {value}")
        return self


class HiddenLossSpec(Section):
    kind: Literal["mse", "cosine"] = "mse"
    weight: float = Field(1.0, ge=0)
    layer_map: Literal["uniform"] | list[tuple[int, int]] = "uniform"
    """`uniform`, or explicit [student_layer, teacher_layer] pairs (0-based)."""
    projection: bool = True
    """Learn a linear map student width -> teacher width when they differ."""


class OnPolicySpec(Section):
    """On-policy distillation: on a fraction of the steps the student samples completions of
    prompts (`data.prompts`) and the logit terms are taken on the completion tokens only."""

    fraction: float = Field(0.5, ge=0, le=1, allow_inf_nan=False)
    """lambda: share of the optimizer steps that train on the student's own samples (step s is
    on-policy when floor((s+1) lambda) > floor(s lambda): a pure function of the step)."""
    max_new_tokens: int = Field(32, ge=1, le=1_000_000)
    """Tokens sampled per prompt (fewer when every completion of the batch ended with EOS)."""
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    """Sampling temperature of the student's completions."""
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""


class ObjectiveSpec(Section):
    ce_weight: float = Field(0.5, ge=0)
    """Weight of next-token cross-entropy on the labels."""
    terms: list[LogitTerm] = [LogitTerm(kind="forward_kl", weight=0.5)]
    """Logit-distillation terms, summed with their weights."""
    hidden: HiddenLossSpec | None = None
    """Intermediate-layer loss; off when absent."""
    chunk_size: int = Field(1024, gt=0)
    """Tokens per chunk of the memory-efficient loss (memory O(chunk x vocab))."""
    path: Literal["chunked", "naive"] = "chunked"
    """`naive` materialises full logits (a reference; slow and memory hungry)."""
    on_policy: OnPolicySpec | None = None
    """Also train on the student's own sampled completions (a fraction of the steps); off when
    absent."""


PRUNE_METHODS = ("magnitude", "wanda", "nm", "width", "depth")


SPARSE_METHODS = ("magnitude", "wanda", "nm")
"""Methods that zero weights in place (same shapes): recovery keeps their masks."""


PRUNE_SCORINGS = ("wanda", "magnitude")


PRUNE_SCOPES = ("layer", "global")


HEAD_UNITS = ("kv_group", "query_head")


class PruneSpec(Section):
    """How to prune: a `prune` stage's `prune` section, the flags of `distill prune`, and what
    `prune_model` takes. What can be checked without the model is checked here."""

    method: str
    """magnitude, wanda, nm (N:M), width (heads and MLP channels) or depth (layers)."""
    sparsity: float = 0.5
    """Target fraction of zero weights (magnitude, wanda), in (0, 1)."""
    scope: str = "layer"
    """Rank weights within each matrix (`layer`) or across all prunable matrices (`global`,
    magnitude only)."""
    n: int = 2
    """N of N:M: weights kept per group."""
    m: int = 4
    """M of N:M: group size."""
    scoring: str = "wanda"
    """Score used by N:M pruning: wanda or magnitude."""
    heads_fraction: float = 0.25
    """Width: fraction of attention heads removed (of the KV groups, or of each group's queries)."""
    head_unit: str = "kv_group"
    """Width: remove whole KV groups (a KV head with its query heads), or query heads within every
    group (grouped-query attention only)."""
    mlp_fraction: float = 0.25
    """Width: fraction of MLP channels removed."""
    multiple_of: int = Field(32, ge=1)
    """Width: MLP channels kept rounded to a multiple of this (32: what int4 groups and GGUF's
    blocks of 32 need; 352 channels at 0.25 keep 256, not 264); 1: exactly the fraction."""
    heads_multiple_of: int = Field(1, ge=1)
    """Width: the heads left (KV groups, or query heads per group with head_unit query_head) kept
    at a multiple of this: vLLM's tensor parallelism needs the KV heads divisible by the number
    of GPUs (8 heads on 4 GPUs: heads_multiple_of 4); 1: exactly the fraction."""
    layers: int | list[Any] | None = None
    """Depth: how many layers to remove (ranked), or the explicit 0-based indices."""
    calibration_batches: int = Field(8, gt=0)
    """Training batches used to collect activation statistics."""

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        for key, what, allowed in (
            ("method", "pruning {method}", PRUNE_METHODS),
            ("scoring", "{scoring}", PRUNE_SCORINGS),
            ("scope", "{scope}", PRUNE_SCOPES),
            ("head_unit", "{head_unit}", HEAD_UNITS),
        ):
            value = getattr(self, key)
            if value not in allowed:
                raise SettingError(
                    f"unknown {what} {value!r}; allowed: {', '.join(allowed)}", **{key: value}
                )
        if not 0 < self.sparsity < 1:
            raise SettingError(
                f"{{sparsity}} must be in (0, 1), got {self.sparsity}", sparsity=self.sparsity
            )
        if not 0 < self.n < self.m:
            raise SettingError(
                "N:M sparsity needs 0 < {n} < {m}, got {n=}, {m=} (2:4 is the usual)",
                n=self.n,
                m=self.m,
            )
        if self.scope == "global" and self.method != "magnitude":
            raise SettingError(
                f"{{scope}}='global' applies to method 'magnitude' only; {self.method} compares "
                "weights within each row or group, use {scope}='layer'",
                scope=self.scope,
            )
        for key in ("heads_fraction", "mlp_fraction"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise SettingError(f"{{{key}}} must be in [0, 1), got {value}", **{key: value})
        if self.method == "width" and self.heads_fraction == 0 and self.mlp_fraction == 0:
            raise SettingError(
                "width pruning with both fractions 0 removes nothing: raise {heads_fraction} "
                "or {mlp_fraction}",
                heads_fraction=0,
                mlp_fraction=0,
            )
        if self.method == "depth":
            _check_depth_layers(self.layers)
        return self


def _check_depth_layers(layers: Any) -> None:
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise SettingError("{layers=} must remove at least 1 layer", layers=layers)
    elif isinstance(layers, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise SettingError(
                f"{{layers}} must hold integer layer indices, got {layers!r}", layers=layers
            )
        if len(set(layers)) != len(layers):
            raise SettingError(f"{{layers}} {layers} repeats an index", layers=layers)
    else:
        raise SettingError(
            "depth pruning needs {layers}: a count of layers to remove (ranked on calibration "
            f"data) or a list of layer indices, got {layers!r}",
            layers=layers,
        )


QUANT_GROUP_SIZES = (16, 32, 64, 128, 256)


_SCHEME_NAME = re.compile(r"^int(\d+)-(?:g(\d+)|pc)-(sym|asym)(\+a8)?$")


class QuantSpec(Section):
    """How linear weights (and optionally activations) are quantized: the recipe's `quant`
    section, and what fake quantization and packing take."""

    bits: int = 4
    """Weight bits, 2..8; codes are signed integers in [-2**(bits-1), 2**(bits-1) - 1]."""
    group_size: int | None = 32
    """Input columns sharing one scale (16, 32, 64, 128 or 256); null = one scale per output
    channel (the whole row)."""
    symmetric: bool = True
    """Symmetric: zero point 0, scale from max |w|. Asymmetric: scale from min/max, int8 zero point."""
    activations: Literal["int8_dynamic"] | None = None
    """Also fake-quantize activations per token to int8 (asymmetric, computed live)."""
    exclude: tuple[str, ...] = ("lm_head",)
    """Linear layers left in full precision: a pattern matches a substring of the module name or
    the whole name as an fnmatch glob ("lm_head", "*.mlp.down_proj", "layers.0."). Embeddings, and a
    linear tied to an embedding, are never quantized."""
    scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the per-group scales are rounded to and stored in."""
    target: Literal["compressed-tensors", "gguf-q4_0", "gguf-q8_0"] | None = None
    """Round exactly as this export format's own quantizer does (the grid an `export` stage
    writes), so the exported model is not rounded a second time. gguf-q4_0: 4 bits in blocks of
    32; gguf-q8_0: 8 bits in blocks of 32 (bits default to the format's); compressed-tensors:
    symmetric int4/int8 in groups of 32/64/128 or null, bf16/fp16 scales. null: torchao's affine
    formula (exports then round once more, onto the format's grid)."""

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if not 2 <= v <= 8:
            raise ValueError(
                f"bits must be an integer from 2 to 8 (greater than or equal to 2); got {v}"
            )
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is not None and v not in QUANT_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of 16, 32, 64, 128, 256 or null; got {v} (a size that "
                "divides in_features of every quantized layer, or null for one scale per channel)"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _target_bits(cls, data: Any) -> Any:
        # A GGUF type fixes the bits: `target: gguf-q8_0` alone means 8 bits.
        if isinstance(data, dict) and data.get("target") in ("gguf-q4_0", "gguf-q8_0"):
            data = {"bits": 4 if data["target"] == "gguf-q4_0" else 8, **data}
        return data

    @model_validator(mode="after")
    def _fits_target(self) -> QuantSpec:
        if self.target is None:
            return self
        if self.activations is not None:
            raise ValueError(
                f"target {self.target} holds weight-only schemes (W4A16/W8A16, GGUF types); "
                "remove `activations`"
            )
        try:
            self.target_scheme()
        except RecipeError as err:
            raise ValueError(str(err)) from None
        return self

    def target_scheme(self) -> tuple[str, int, int | None, str]:
        """(target, bits, group size, scale dtype) on the target's grid (see `resolve_target`)."""
        scale_dtype = self.scale_dtype if self.target == "compressed-tensors" else "bfloat16"
        return resolve_target(self.target, self.bits, self.group_size, self.symmetric, scale_dtype)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def name(self) -> str:
        """Short name, e.g. "int4-g32-sym", "int8-pc-sym", "int4-g32-sym+a8"; on a target, its
        grid's name ("gguf-q4_0", "ct-int4-g32")."""
        if self.target is not None:
            target, bits, group_size, _ = self.target_scheme()
            return grid_name(target, bits, group_size)
        granularity = "pc" if self.group_size is None else f"g{self.group_size}"
        symmetry = "sym" if self.symmetric else "asym"
        suffix = "+a8" if self.activations == "int8_dynamic" else ""
        return f"int{self.bits}-{granularity}-{symmetry}{suffix}"

    @classmethod
    def parse(cls, text: str, **overrides: Any) -> QuantSpec:
        """Inverse of ``name()``: "int4-g32-sym", "int3-pc-asym", "int4-g32-sym+a8"."""
        match = _SCHEME_NAME.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse quantization scheme {text!r}: expected int<bits>-(g<size>|pc)-"
                "(sym|asym)[+a8], e.g. int4-g32-sym, int8-pc-sym, int4-g32-sym+a8"
            )
        bits, group, symmetry, a8 = match.groups()
        return cls(
            bits=int(bits),
            group_size=int(group) if group else None,
            symmetric=symmetry == "sym",
            activations="int8_dynamic" if a8 else None,
            **overrides,
        )
