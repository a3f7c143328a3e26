"""compressed-tensors ``pack-quantized`` checkpoints (W4A16, W8A16): what vLLM and transformers load.

The compressed-tensors package writes the format: ``apply_quantization_config`` attaches the
scheme, ``ModelCompressor.compress_model`` packs the codes into int32 and ``update_config`` writes
the ``quantization_config`` of config.json. The one thing done here is the scales: they come from
``distill.compress.grids`` (the same formula as compressed-tensors' ``calculate_qparams``, checked
bit for bit by the tests) instead of an observer, so the codes compressed-tensors packs are the
codes a model fake-quantized on that grid trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.compress.grids import SCALE_DTYPES, Grid, check_widths
from distill.errors import RecipeError

IGNORED = ("lm_head",)
"""Linears kept in float: the output head (also when tied to the embeddings, which are never
quantized by a W4A16/W8A16 scheme)."""


def quantized_linears(model, ignore: tuple[str, ...] = IGNORED) -> dict[str, torch.nn.Linear]:
    """The linears a W4A16/W8A16 export quantizes, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in ignore
    }


def quantization_config(grid: Grid, ignore: tuple[str, ...] = IGNORED):
    """The compressed-tensors QuantizationConfig of ``grid`` (symmetric int, weights only)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    weights = QuantizationArgs(
        num_bits=grid.bits,
        type="int",
        symmetric=True,
        strategy="channel" if grid.group_size is None else "group",
        group_size=grid.group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=list(ignore), format="pack-quantized"
    )


def export_compressed_tensors(
    model, tokenizer, out_dir: str | Path, grid: Grid, dtype: str = "bfloat16"
) -> Path:
    """Write ``model`` (changed in place: its linears end up compressed) as a pack-quantized
    checkpoint in ``out_dir``, with the tokenizer. Float tensors other than the packed weights
    are stored in ``dtype``; scales too, so bf16/fp16 servers read them without rounding."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    if grid.target != "compressed-tensors":
        raise RecipeError(
            f"export_compressed_tensors: {grid.name()} is not a compressed-tensors grid"
        )
    if dtype not in SCALE_DTYPES:
        raise RecipeError(
            f"compressed-tensors export: dtype {dtype!r}: one of {list(SCALE_DTYPES)}"
        )
    if dtype == "float16" and grid.scale_dtype != "float16":
        raise RecipeError(
            f"compressed-tensors export in float16 with scales rounded to {grid.scale_dtype}: not "
            "every such scale is a float16 number; use scale_dtype float16 for a float16 export"
        )
    linears = quantized_linears(model)
    check_widths(grid, {name: m.in_features for name, m in linears.items()})

    # Rounded in float32, as the grid is defined (a bf16 checkpoint loads exactly into float32).
    model.to(torch.float32)
    apply_quantization_config(model, quantization_config(grid), show_progress=False)
    with torch.no_grad():
        for name, module in linears.items():
            if getattr(module, "quantization_scheme", None) is None:
                raise RecipeError(f"compressed-tensors did not attach a scheme to {name}")
            _, scale = grid.quantize(module.weight)
            module.weight_scale.data = scale.to(torch.float32)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.to(SCALE_DTYPES[dtype])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    return out_dir


def linear_bytes_ratio(out_dir: str | Path) -> float:
    """Bytes of the quantized linears on disk (packed codes + scales) over their bf16 bytes."""
    from safetensors import safe_open

    packed = bf16 = 0
    for path in Path(out_dir).glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if not key.endswith(".weight_packed"):
                    continue
                prefix = key[: -len("weight_packed")]
                shape = f.get_tensor(prefix + "weight_shape").tolist()
                packed += f.get_tensor(key).nbytes + f.get_tensor(prefix + "weight_scale").nbytes
                bf16 += 2 * shape[0] * shape[1]
    if not bf16:
        raise RecipeError(f"{out_dir}: no packed weights found (not a pack-quantized checkpoint)")
    return packed / bf16


def unpack_on_load(model):
    """Run one forward of a compressed-tensors model transformers loaded: the package may keep the
    weights packed until the whole model's first forward (a hook on it), and code that calls the
    decoder directly (held-out evaluation) would find no ``weight``. Other models: unchanged."""
    config = getattr(model.config, "quantization_config", None)
    method = (
        config.get("quant_method")
        if isinstance(config, dict)
        else getattr(config, "quant_method", None)
    )
    if method == "compressed-tensors":
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
    return model
