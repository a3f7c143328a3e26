"""Loading teachers and students (path, hub id or config), and the checks that a teacher and a
student can be distilled into one another at all: same tokenizer, heads that cover it, a sequence
length the model supports."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distill.compress.ct_export import unpack_on_load
from distill.config import ModelSpec
from distill.errors import DistillError, RecipeError
from distill.files import atomic_dir, check_free_space
from distill.recipe_file import looks_local
from distill.safe_load import weights_only

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str):
    return "auto" if name == "auto" else DTYPES[name]


def build_model(spec: ModelSpec, tokenizer, seed: int, what: str):
    """A causal LM from `spec`: loaded from a path/hub id, or freshly initialised from a config."""
    from transformers import AutoModelForCausalLM

    from distill.model_specs import build_config

    if spec.config is not None:
        defaults = {"vocab_size": len(tokenizer)}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            defaults[key] = getattr(tokenizer, key, None)
        config = build_config(spec, what, defaults)
        if spec.attn_implementation:
            config._attn_implementation = spec.attn_implementation
        # Seeded here so the same recipe always starts from the same weights.
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.trust_remote_code
            )
        except Exception as err:  # noqa: BLE001 - whatever the model's own code raises
            raise RecipeError(
                f"models.{what}.config: transformers cannot build a causal LM from it: "
                f"{str(err).strip() or type(err).__name__}"
            ) from err
        if spec.dtype not in ("auto", "float32"):
            model = model.to(DTYPES[spec.dtype])
        return model
    return load_pretrained(
        spec.path,
        what=what,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
        attn_implementation=spec.attn_implementation,
    )


def load_pretrained(
    path: str,
    what: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """AutoModelForCausalLM.from_pretrained with errors that say which model and what to do."""
    from transformers import AutoModelForCausalLM

    path = os.path.expanduser(path)
    if looks_local(path) and not os.path.isdir(path):
        raise RecipeError(f"{what}: model directory {path!r} does not exist")
    if os.path.isdir(path) and not (Path(path) / "config.json").is_file():
        raise RecipeError(
            f"{what}: {path!r} has no config.json, so it is not a saved transformers model; "
            "point at the directory written by save_pretrained"
        )
    kwargs = {
        "dtype": resolve_dtype(dtype),
        "trust_remote_code": trust_remote_code,
        "weights_only": True,  # transformers' default today, for `.bin` weights; kept explicit
    }
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    fix = (
        "Weights saved by save_pretrained hold only tensors. If you trust this model, load it in "
        "a Python session of your own and save it again with save_pretrained (safetensors), then "
        "point distill at the copy."
    )
    try:
        with weights_only(Path(path), fix):
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except DistillError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, OSError, ValueError...: same fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(
            f"{what}: could not load a causal LM from {path!r}: {first}. If it is a local "
            "directory, its weights may be missing or corrupt (re-save it with save_pretrained); "
            "if it is a hub id, check the name, `revision` and network access "
            "(`trust_remote_code: true` for models with custom code)."
        ) from err
    return unpack_on_load(model)  # a compressed-tensors export: weights unpacked now


def load_tokenizer(path: str, what: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            os.path.expanduser(path), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as err:
        raise RecipeError(
            f"{what}: no usable tokenizer at {path!r} ({err}); set `tokenizer.source: path` with "
            "`tokenizer.path`, or `tokenizer.source: train`"
        ) from err


def has_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((Path(os.path.expanduser(path)) / n).is_file() for n in names)


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_same_tokenizer(reference, other, reference_name: str, other_name: str) -> None:
    """Distillation compares token distributions, so both sides must mean the same thing by
    every id. The tokenizers themselves are compared, not config.vocab_size (which may count
    padding rows)."""
    vocab_a, vocab_b = reference.get_vocab(), other.get_vocab()
    if vocab_a != vocab_b:
        only_a = len(vocab_a.keys() - vocab_b.keys())
        only_b = len(vocab_b.keys() - vocab_a.keys())
        moved = sum(1 for t, i in vocab_a.items() if t in vocab_b and vocab_b[t] != i)
        raise RecipeError(
            f"tokenizer mismatch between {reference_name} ({len(vocab_a)} tokens) and "
            f"{other_name} ({len(vocab_b)} tokens): {only_a} tokens only in the first, {only_b} "
            f"only in the second, {moved} with different ids. Logit distillation needs one "
            "shared tokenizer: pick a student from the teacher's family, or train the student "
            "with the teacher's tokenizer (`tokenizer.source: path`)."
        )
    for key in SPECIAL_TOKENS:
        a, b = getattr(reference, key, None), getattr(other, key, None)
        if a is not None and b is not None and a != b:
            raise RecipeError(
                f"tokenizer mismatch between {reference_name} and {other_name}: {key} is {a} vs "
                f"{b}; use the same tokenizer files for both"
            )


def check_head_covers_tokenizer(model, tokenizer, what: str) -> None:
    """lm_head rows may be padded past the tokenizer (Qwen: 151,936 tokens, 152,064 rows);
    fewer rows than tokens is a real mismatch."""
    rows = weight_shape(model.get_output_embeddings().weight)[0]
    if rows < len(tokenizer):
        raise RecipeError(
            f"{what}: its lm_head has {rows} rows but the tokenizer has {len(tokenizer)} tokens; "
            "the model was not trained with this tokenizer (resize it with "
            "model.resize_token_embeddings, or use the model's own tokenizer)"
        )


def check_seq_len(model, seq_len: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise RecipeError(
            f"data.seq_len={seq_len} is longer than {what}'s max_position_embeddings={limit}; "
            f"lower `data.seq_len` to at most {limit}"
        )


def weight_shape(weight) -> torch.Size:
    """A weight's full shape, also when ZeRO-3 holds only this rank's flat partition of it."""
    return getattr(weight, "ds_shape", weight.shape)


def hidden_width(model) -> int:
    return weight_shape(model.get_output_embeddings().weight)[1]


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def count_params(model) -> int:
    """Parameters counted once even when tied (embeddings and lm_head share one tensor)."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


def freeze(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def add_lora(model, spec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def unwrap_lora(model, merge: bool):
    """The plain transformers model to export (adapters merged into the weights when asked)."""
    if hasattr(model, "merge_and_unload") and merge:
        return model.merge_and_unload()
    if hasattr(model, "get_base_model") and not merge:
        return model
    return model


def dir_size_bytes(path: str | Path, patterns=("*.safetensors", "*.bin", "*.pt")) -> int:
    """Bytes of weight files in a model directory (what a user ships)."""
    path = Path(path)
    return sum(f.stat().st_size for pat in patterns for f in path.glob(pat) if f.is_file())


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack without the lm_head, so no logits are computed."""
    lm = causal_lm_of(model)
    return getattr(lm, lm.base_model_prefix)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` whole: itself, unless it is a ZeRO-3 partition that no hook has gathered (an
    evaluation outside the engine's forward); then a gathered copy, for reading only."""
    status = getattr(weight, "ds_status", None)
    if status is None or status.name != "NOT_AVAILABLE":
        return weight
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone()


def is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def write_model_dir(
    out: Path, write: Callable[[Path], None], what: str = "writing the model dir", needed=None
) -> None:
    """Write a model directory atomically: `write(tmp)` fills a temporary sibling folder, which
    then replaces `out`, so a model dir is whole or absent (never half-written), and a failed write
    (a full disk) leaves the previous one and says so."""
    with atomic_dir(Path(out), f"{what} {out}", needed) as tmp:
        write(tmp)


def model_bytes(model) -> int:
    """What the model's weights take on disk (each parameter and buffer at its dtype, a tied
    weight once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_model_dir(model, tokenizer, out: Path, extra_files: dict[str, str] | None = None) -> None:
    """`save_pretrained` of the model and tokenizer (plus small text files), atomically, refused
    up front when its weights cannot fit on the disk."""
    needed = model_bytes(model)
    check_free_space(
        Path(out).parent,
        needed,
        f"the model dir {Path(out).name}",
        "Free space there or point `output_dir` at a file system with room, then run the same "
        "command again (a training stage resumes from its last checkpoint).",
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content)

    write_model_dir(out, write, needed=needed)
