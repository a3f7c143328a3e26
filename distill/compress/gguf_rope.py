"""Scaled RoPE in GGUF files, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

- ``llama3`` (Llama 3.1/3.2/3.3): no scaling keys; one F32 tensor ``rope_freqs.weight`` with a
  factor per rotary frequency, by which llama.cpp divides that frequency (``LlamaModel.
  generate_extra_tensors``). llama.cpp's Qwen2/Qwen3 graphs take no such factors (its converter
  writes none for them), so there it is refused.
- ``linear``: ``{arch}.rope.scaling.type = "linear"`` and ``{arch}.rope.scaling.factor``;
  llama.cpp scales every position by 1/factor, as transformers divides every frequency.

transformers' GGUF loader reads neither back (it restores RoPE scaling for gpt-oss only):
``apply_file_rope`` puts the file's frequencies into a model it loaded, so that verification
measures the model llama.cpp runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from distill.errors import RecipeError

SCALED = {"llama3": ("llama",), "linear": ("llama", "qwen2", "qwen3")}
"""RoPE scalings written, and the llama.cpp architectures that run them."""
SUPPORTED = "unscaled RoPE, llama3 (Llama, Mistral) and linear (Llama, Mistral, Qwen2, Qwen3)"
TENSOR = "rope_freqs.weight"


def rope_parameters(config) -> dict:
    """The config's RoPE parameters (transformers 5 ``rope_parameters``, older ``rope_scaling``),
    with ``rope_type`` set (``default`` when unscaled)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope.get("full_attention", rope))  # the converter reads full attention's
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def check_rope(config, arch: str) -> str:
    """The config's rope_type if a GGUF file for llama.cpp's ``arch`` can carry it, else a
    RecipeError naming the scalings that are written."""
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type == "default" or arch in SCALED.get(rope_type, ()):
        return rope_type
    if rope_type in SCALED:
        why = (
            f"llama.cpp's {arch} graph takes no per-frequency RoPE factors (its own converter "
            "drops them, and the file then computes another model)"
        )
        fix = "export safetensors or compressed-tensors (vLLM) instead"
    else:
        why = "that RoPE scaling is not written here"
        fix = (
            "export safetensors and convert it with llama.cpp's convert_hf_to_gguf.py, or "
            "export compressed-tensors for vLLM"
        )
    raise RecipeError(
        f"GGUF export: rope_type {rope_type!r} in a {arch} model: {why}. GGUF export writes "
        f"{SUPPORTED}; {fix}"
    )


def write_rope(writer, config, head_dim: int) -> None:
    """RoPE metadata (base, and ``linear``'s scaling keys) and ``llama3``'s ``rope_freqs``
    tensor, which the converter writes first, before the model's own tensors."""
    import gguf

    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "llama3":
        writer.add_tensor(TENSOR, llama3_factors(rope, head_dim).numpy())


def llama3_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Per rotary frequency, unscaled over ``llama3``-scaled (float32, ``head_dim / 2``): 1 for
    wavelengths under ``original / high_freq_factor``, ``factor`` over ``original /
    low_freq_factor``, smoothly between. The original context comes from ``rope_parameters``,
    where transformers reads it (llama.cpp's converter reads a top-level config key that Llama 3
    configs lack and falls back to 8192, their value)."""
    base = float(rope.get("rope_theta", 1e4))
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    factors = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen > original / low, torch.full_like(freqs, factor), factors)
    return torch.where(wavelen < original / high, torch.ones_like(freqs), factors)


def file_rope_factors(path: str | Path) -> torch.Tensor | None:
    """What the GGUF file at ``path`` divides each RoPE frequency by (``rope_freqs`` times the
    linear factor), or None for unscaled RoPE."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    kind = reader.fields.get(f"{arch}.rope.scaling.type")
    linear = 1.0
    if kind is not None and kind.contents() == "linear":
        linear = float(reader.fields[f"{arch}.rope.scaling.factor"].contents())
    tensor = next((t for t in reader.tensors if t.name == TENSOR), None)
    if tensor is None and linear == 1.0:
        return None
    factors = torch.ones(1) if tensor is None else torch.from_numpy(tensor.data.copy())
    return factors.to(torch.float32) * linear


def apply_file_rope(model, path: str | Path):
    """``model`` (as transformers' GGUF loader loaded the file at ``path``) with the file's RoPE
    frequencies, which that loader leaves unscaled."""
    factors = file_rope_factors(path)
    if factors is None:
        return model
    rotary = model.model.rotary_emb
    # From the unscaled frequencies, so a loader that one day applies the scaling is not doubled.
    default, _ = rotary.compute_default_rope_parameters(model.config)
    rotary.inv_freq = (default / factors).to(rotary.inv_freq.device)
    rotary.original_inv_freq = rotary.inv_freq.clone()
    return model
