"""`distill prune MODEL_DIR --out DIR --method ...`: prune a saved model directory outside a recipe.

Calibration text (for Wanda scores, width importance and ranked depth) is read from files, tokenized
with the model directory's own tokenizer and packed into `--seq-len` blocks. The result is an
ordinary transformers model directory (weights, config, tokenizer) plus `distill_prune.json`, which
records what was removed (a later recovery stage reads it to map hidden-state losses).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from distill.compress.prune import CALIBRATION_BATCH_SIZE, RECORD_FILE, prune_model
from distill.config import DataSpec
from distill.data.blocks import pack_documents
from distill.data.documents import load_documents
from distill.errors import RecipeError, SettingError, as_flag
from distill.models import (
    count_params,
    dir_size_bytes,
    has_tokenizer,
    load_pretrained,
    load_tokenizer,
    save_model_dir,
)
from distill.recipe_file import build_spec
from distill.specs import PruneSpec


def run_prune_command(args) -> int:
    """Check the arguments, load, calibrate, prune, save; print what changed."""

    source, out = Path(os.path.expanduser(args.model_dir)), Path(os.path.expanduser(args.out))
    depth_layers = parse_layers(args.layers) if args.layers is not None else None
    spec = build_spec(PruneSpec, _spec_fields(args, depth_layers), as_flag)
    _check_arguments(args, source, out, depth_layers)
    calibrate = needs_calibration(args.method, args.scoring, depth_layers)
    tokenizer = None
    if has_tokenizer(str(source)):
        tokenizer = load_tokenizer(str(source), f"the tokenizer of {str(source)!r}")
    elif calibrate:
        raise RecipeError(
            f"{str(source)!r} has no tokenizer files, and --method {args.method} needs "
            "calibration text tokenized with the model's tokenizer; save the tokenizer into the "
            "model directory (tokenizer.save_pretrained)"
        )
    calibration = None
    if calibrate:
        _check_seq_len(source, args.seq_len)
        calibration = calibration_blocks(
            args.calibration, tokenizer, args.seq_len, args.calibration_batches
        )

    model = load_pretrained(str(source), what="model to prune", dtype=args.dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    params_before = count_params(model)
    try:
        result = prune_model(model, spec, calibration)
    except SettingError as err:
        raise err.named(as_flag) from None

    record = json.dumps(result.record(source=str(source)), indent=2)
    save_model_dir(model, tokenizer, out, {RECORD_FILE: record})
    size_before, size_after = dir_size_bytes(source), dir_size_bytes(out)
    params_after = count_params(model)
    lines = [f"pruned {source} with {_describe(args, depth_layers)}"]
    if result.masks is not None:
        lines += [
            f"  sparsity of the pruned linears: {result.sparsity:.4f}",
            f"  parameters: {params_before:,}, of which {params_before - result.params_after:,} "
            "are now zero (stored densely: the files keep their size)",
        ]
    else:
        lines += [
            f"  parameters: {params_before:,} -> {params_after:,} "
            f"({result.sparsity * 100:.1f} % removed)",
            "  " + _structure_change(result.details),
        ]
    lines += [
        f"  size on disk: {size_before / 2**20:.2f} MiB -> {size_after / 2**20:.2f} MiB",
        f"saved to {out} (AutoModelForCausalLM.from_pretrained loads it)",
    ]
    print("\n".join(lines))
    return 0


def parse_layers(text: str) -> int | list[int]:
    """`--layers`: "2" is a count to remove; "1,3" or "3," are 0-based indices."""
    parts = [p.strip() for p in text.strip().strip("[]").split(",")]
    try:
        if "," not in text:
            return int(text)
        return [int(p) for p in parts if p]
    except ValueError:
        raise RecipeError(
            f"--layers {text!r}: give a count of layers to remove (e.g. 2) or comma-separated "
            "0-based indices (e.g. 1,3; one index: 3,)"
        ) from None


def needs_calibration(method: str, scoring: str, depth_layers) -> bool:
    """Whether the method reads activations (Wanda scores, width importance, ranked depth)."""
    return (
        method in ("wanda", "width")
        or (method == "nm" and scoring == "wanda")
        or (method == "depth" and isinstance(depth_layers, int))
    )


def calibration_blocks(
    patterns: list[str] | None, tokenizer, seq_len: int, num_batches: int
) -> list[torch.Tensor]:
    """Read the files, pack them into `seq_len` blocks, and draw `num_batches` batches of 8."""
    import glob

    if not patterns:
        raise RecipeError(
            "this method needs calibration text: pass --calibration FILE [FILE ...] (text, "
            "JSONL or Parquet files, or globs) to collect activation statistics from"
        )
    for pattern in patterns:
        if not glob.glob(os.path.expanduser(pattern), recursive=True):
            raise RecipeError(f"--calibration {pattern!r} matches no file")
    docs = load_documents(DataSpec(files=list(patterns), seq_len=max(seq_len, 8)))
    try:
        blocks = pack_documents([text for _, text in docs], tokenizer, seq_len, "calibration")
    except RecipeError:
        raise RecipeError(
            f"the calibration text holds less than one block of --seq-len {seq_len} tokens; "
            "give more text or a smaller --seq-len"
        ) from None
    wanted = num_batches * CALIBRATION_BATCH_SIZE
    if len(blocks) > wanted:  # a seeded draw spreads the blocks over all the files
        picks = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[:wanted]
        blocks = blocks[picks.sort().values]
    else:
        print(
            f"note: calibration text gives {len(blocks)} blocks of {seq_len} tokens; using all "
            f"(asked for {wanted})",
            file=sys.stderr,
        )
    return list(blocks.split(CALIBRATION_BATCH_SIZE))


def _check_arguments(args, source: Path, out: Path, depth_layers) -> None:
    """Everything that can be checked before a model loads, with the flag named."""
    if not source.is_dir():
        raise RecipeError(f"model directory {str(source)!r} does not exist")
    if not (source / "config.json").is_file():
        raise RecipeError(
            f"{str(source)!r} has no config.json: give a directory written by save_pretrained"
        )
    if out.resolve() == source.resolve():
        raise RecipeError(
            "--out must differ from MODEL_DIR (the source model is never overwritten)"
        )
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())
    ):
        raise RecipeError(
            f"--out {str(out)!r} exists and is not a model directory; refusing to overwrite it"
        )
    if args.calibration_batches < 1 or args.seq_len < 2:
        raise RecipeError("--calibration-batches must be >= 1 and --seq-len >= 2")
    if needs_calibration(args.method, args.scoring, depth_layers) and not args.calibration:
        needs = {
            "wanda": "Wanda scores |weight| x input activation norm",
            "nm": "Wanda scoring (the default) weighs by input activation norms; or use "
            "--scoring magnitude",
            "width": "heads and MLP channels are ranked by their activations",
            "depth": "layers are ranked by how much they change the hidden states; or give "
            "indices, e.g. --layers 2,",
        }[args.method]
        raise RecipeError(
            f"--method {args.method} needs --calibration FILE [FILE ...] ({needs}): text files, "
            "JSONL or Parquet, tokenized with the model directory's tokenizer"
        )


def _check_seq_len(source: Path, seq_len: int) -> None:
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"{str(source)!r}: transformers cannot read its config.json: {err}"
        ) from err
    if limit is not None and seq_len > limit:
        raise RecipeError(
            f"--seq-len {seq_len} is longer than the model's max_position_embeddings ({limit}); "
            f"use --seq-len {limit} or less"
        )


def _spec_fields(args, depth_layers) -> dict:
    """The prune settings the flags give (each flag is the PruneSpec field of the same name)."""
    return {
        "method": args.method,
        "sparsity": args.sparsity,
        "scope": args.scope,
        "n": args.n,
        "m": args.m,
        "scoring": args.scoring,
        "heads_fraction": args.heads_fraction,
        "head_unit": args.head_unit,
        "mlp_fraction": args.mlp_fraction,
        "multiple_of": args.multiple_of,
        "heads_multiple_of": args.heads_multiple_of,
        "layers": depth_layers,
        "calibration_batches": args.calibration_batches,
    }


def _describe(args, depth_layers) -> str:
    if args.method in ("magnitude", "wanda"):
        return f"{args.method} at sparsity {args.sparsity} (scope {args.scope})"
    if args.method == "nm":
        return f"{args.n}:{args.m} sparsity scored by {args.scoring}"
    if args.method == "width":
        return f"width (heads {args.heads_fraction}, MLP channels {args.mlp_fraction})"
    return f"depth (layers {depth_layers})"


def _structure_change(details: dict) -> str:
    if "removed_layers" in details:
        return f"removed layers {details['removed_layers']}; {details['num_hidden_layers']} remain"
    return (
        f"attention heads {details['num_attention_heads']} (KV heads "
        f"{details['num_key_value_heads']}), MLP channels {details['intermediate_size']} per layer"
    )
