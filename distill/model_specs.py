"""The recipe's `models` and `tokenizer` sections, and the transformers config a `config:` entry gives, checked for
what the model class would refuse or silently get wrong (a head count that does not divide the
width, more KV heads than heads, a zero size, a misspelt field), before any model is built."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from distill.errors import RecipeError
from distill.specs import Section


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
    r: int = Field(16, gt=0, le=65536)
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


SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
)
"""Config fields that are counts: a zero or negative one fails deep inside the model's code."""


def build_config(spec: ModelSpec, name: str, defaults: dict[str, Any] | None = None):
    """The transformers config of `models.<name>.config` (with `defaults` for fields it leaves
    out), or a RecipeError naming the field and the fix."""
    from transformers import CONFIG_MAPPING, AutoConfig

    where = f"models.{name}.config"
    fields = dict(spec.config or {})
    model_type = fields.pop("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise RecipeError(
            f"{where}.model_type: transformers has no model type {model_type!r}{hint}; use a "
            "causal LM type such as llama, mistral, qwen2 or qwen3"
        )
    for key, value in (defaults or {}).items():
        fields.setdefault(key, value)
    _check_misspelt(CONFIG_MAPPING[model_type], fields, where)
    _check_sizes(fields, where)  # before transformers divides by them
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # noqa: BLE001 - transformers' strict dataclasses, ValueError, ...
        raise RecipeError(f"{where}: transformers refuses it: {_last_line(err)}") from None
    _check_shape(config, fields, where)
    return config


def _last_line(err: Exception) -> str:
    """The innermost cause of a (multi-line) transformers validation error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text.removeprefix("ValueError: ").removeprefix("TypeError: ")


def _check_misspelt(config_class, fields: dict, where: str) -> None:
    """A field close to a real one is a typo that transformers would keep as an unused attribute
    (the model then gets the default); other extra fields may be read by the model, so pass."""
    known = set(config_class().to_dict()) | set(config_class.attribute_map)
    for key in fields:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if close:
            raise RecipeError(
                f"{where}.{key}: {config_class.model_type} configs have no field {key!r}; did you "
                f"mean {close[0]!r}?"
            )


def _check_sizes(values: dict, where: str) -> None:
    for key in SIZES:
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RecipeError(f"{where}.{key}: must be a whole number, got {value!r}")
        if value is not None and value <= 0:
            raise RecipeError(f"{where}.{key}: must be at least 1, got {value}")


def _check_shape(config, fields: dict, where: str) -> None:
    _check_sizes({key: getattr(config, key, None) for key in SIZES}, where)
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if hidden and heads and hidden % heads and not _explicit_head_dim(config, fields):
        raise RecipeError(
            f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; "
            "each head gets hidden_size / num_attention_heads channels (e.g. "
            f"num_attention_heads={_divisor_near(hidden, heads)})"
        )
    if heads and kv_heads and heads % kv_heads:
        raise RecipeError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads="
            f"{kv_heads}; each KV head serves a whole group of query heads (e.g. "
            f"num_key_value_heads={_divisor_near(heads, kv_heads)})"
        )
    _check_numbers(config.to_dict(), where)


def _explicit_head_dim(config, fields: dict) -> bool:
    """Whether head_dim is set apart from hidden_size / num_attention_heads (given, or fixed by
    the model type as in qwen3), so the two need not divide."""
    if "head_dim" in fields:
        return True
    if not dataclasses.is_dataclass(type(config)):
        return False
    default = {f.name: f.default for f in dataclasses.fields(type(config))}.get("head_dim")
    return isinstance(default, int)


def _divisor_near(total: int, wanted: int) -> int:
    return min((d for d in range(1, total + 1) if total % d == 0), key=lambda d: abs(d - wanted))


def _check_numbers(values: dict, where: str) -> None:
    """Non-finite floats, epsilons and rope bases that are not positive, dropouts outside [0, 1]:
    each trains to NaN without an error."""
    for key, value in values.items():
        if isinstance(value, dict):
            _check_numbers(value, f"{where}.{key}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise RecipeError(f"{where}.{key}: must be a finite number, got {value}")
        if (key.endswith("eps") or key == "rope_theta") and value <= 0:
            raise RecipeError(f"{where}.{key}: must be greater than 0, got {value}")
        if (key.endswith("dropout") or key.endswith("pdrop")) and not 0 <= value <= 1:
            raise RecipeError(
                f"{where}.{key}: a dropout probability must be in [0, 1], got {value}"
            )
