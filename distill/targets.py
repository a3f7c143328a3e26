"""What each target format's weight grid can represent, checked without torch (recipes are
validated against it at load): GGUF Q4_0/Q8_0 and compressed-tensors symmetric int4/int8."""

from __future__ import annotations

import math

from distill.errors import RecipeError

TARGETS = ("gguf-q4_0", "gguf-q8_0", "compressed-tensors")
EXPORT_FORMATS = (
    "safetensors-bf16",
    "safetensors-fp16",
    "gguf-f32",
    "gguf-f16",
    "gguf-bf16",
    "gguf-q8_0",
    "gguf-q4_0",
    "ct-w4a16",
    "ct-w8a16",
)
GGUF_BLOCK = 32
CT_BITS = (4, 8)
CT_GROUP_SIZES = (32, 64, 128)
"""Group sizes vLLM's compressed-tensors W4A16/W8A16 kernels serve (None: one scale per row)."""


def grid_name(target: str, bits: int, group_size: int | None) -> str:
    """A target grid's short name: "gguf-q4_0", "ct-int4-g32", "ct-int8-pc"."""
    if target.startswith("gguf"):
        return target
    return f"ct-int{bits}-{'pc' if group_size is None else f'g{group_size}'}"


def _nearest(value: int, choices: tuple[int, ...]) -> int:
    return min(choices, key=lambda c: (abs(math.log2(c) - math.log2(value)), c))


def resolve_target(
    target: str,
    bits: int | None = None,
    group_size: int | None = -1,
    symmetric: bool = True,
    scale_dtype: str = "bfloat16",
) -> tuple[str, int, int | None, str]:
    """``(target, bits, group_size, scale_dtype)`` of a scheme on ``target``, or a RecipeError
    naming the nearest supported choice.

    ``bits=None`` and ``group_size=-1`` take the target's defaults (4 bits for compressed-tensors;
    groups of 32); ``group_size=None`` asks for one scale per output channel. ``scale_dtype``
    applies to compressed-tensors (GGUF stores fp16 scales).
    """
    if target not in TARGETS:
        raise RecipeError(f"quantization target {target!r}: supported are {', '.join(TARGETS)}")
    if target.startswith("gguf"):
        return _gguf(target, bits, group_size, symmetric)
    if bits is None:
        bits = 4
    if bits not in CT_BITS:
        nearest = min(CT_BITS, key=lambda b: (abs(b - bits), -b))
        raise RecipeError(
            f"compressed-tensors: int{bits} weights are not served by vLLM's compressed-tensors "
            f"kernels; use bits={nearest} (W{nearest}A16); supported: {list(CT_BITS)}"
        )
    if not symmetric:
        raise RecipeError(
            "compressed-tensors export here is symmetric only (W4A16/W8A16 with zero points "
            "fixed at 0); use symmetric quantization (an `-sym` scheme)"
        )
    if group_size == -1:
        group_size = 32
    if group_size is not None and group_size not in CT_GROUP_SIZES:
        raise RecipeError(
            f"compressed-tensors: group_size {group_size} is not one of the served group sizes "
            f"{list(CT_GROUP_SIZES)} or per channel; nearest: "
            f"{_nearest(max(group_size, 1), CT_GROUP_SIZES)}"
        )
    if scale_dtype not in ("bfloat16", "float16"):
        raise RecipeError(
            f"compressed-tensors: scale_dtype {scale_dtype!r}: vLLM computes with scales in the "
            "activation dtype; use bfloat16 or float16"
        )
    return "compressed-tensors", bits, group_size, scale_dtype


def _gguf(
    target: str, bits: int | None, group_size: int | None, symmetric: bool
) -> tuple[str, int, int | None, str]:
    fmt_bits = 4 if target == "gguf-q4_0" else 8
    if bits is not None and bits != fmt_bits:
        nearest = "gguf-q4_0" if bits <= 6 else "gguf-q8_0"
        raise RecipeError(
            f"{target}: holds {fmt_bits}-bit weights, not int{bits}; GGUF has no int{bits} "
            f"format written here: use {nearest} ({4 if nearest == 'gguf-q4_0' else 8} bits)"
        )
    if not symmetric:
        raise RecipeError(
            f"{target}: the format has no zero point (its codes are centred on 0); use "
            "symmetric quantization (an `-sym` scheme)"
        )
    if group_size not in (-1, GGUF_BLOCK):
        what = "per-channel scales" if group_size is None else f"group_size {group_size}"
        raise RecipeError(
            f"{target}: blocks are always {GGUF_BLOCK} weights; {what} cannot be represented; "
            f"use group_size {GGUF_BLOCK} (or compressed-tensors for groups of 64/128 or "
            "per channel)"
        )
    return target, fmt_bits, GGUF_BLOCK, "float16"
