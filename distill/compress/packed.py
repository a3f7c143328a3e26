"""Packed low-bit weights: real integer codes and scales in memory and on disk.

A converted model's linears are ``QuantizedLinear`` (codes packed into a little-endian bitstream,
scales, optional zero points), saved by ``save_quantized`` and read by ``load_quantized`` (or by
``AutoModelForCausalLM.from_pretrained`` once this module is imported). The codes equal what
``distill.compress.fake_quant`` rounds to during QAT, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.compress.fake_quant import (
    SCALE_DTYPES,
    FakeQuantLinear,
    _activation_quant_dequant,
    _eligible_linears,
    _replace,
    dequantize_weight,
    group_size_for,
    quantize_weight,
)
from distill.specs import QuantSpec

FORMAT_NAME = "distill-intx-packed"


FORMAT_VERSION = 1


QUANT_CONFIG_FILE = "quantization.json"


WEIGHTS_FILE = "model.safetensors"


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes -> uint8 little-endian bitstream of ``q - qmin`` (see the module docstring)."""
    unsigned = (q.reshape(-1).to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=q.device)
    stream = ((unsigned[:, None] >> shifts) & 1).reshape(-1)
    stream = F.pad(stream, (0, (-stream.numel()) % 8)).reshape(-1, 8).to(torch.int32)
    byte_shifts = torch.arange(8, dtype=torch.int32, device=q.device)
    return (stream << byte_shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``numel`` signed int8 codes."""
    if 8 % bits == 0:
        # 2, 4 and 8 bits: whole codes per byte, a shift per slot.
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        unsigned = ((packed[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    else:
        byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        stream = ((packed[:, None] >> byte_shifts) & 1).reshape(-1)[: numel * bits]
        code_shifts = torch.arange(bits, dtype=torch.int16, device=packed.device)
        unsigned = (stream.reshape(numel, bits).to(torch.int16) << code_shifts).sum(dim=-1)
    return (unsigned.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


class QuantizedLinear(nn.Module):
    """A linear layer stored as packed integer codes + scales.

    Reference path: unpack, dequantize, ``F.linear``. The dequantized weight is exactly
    ``fake_quantize_weight(original weight)`` when the input has the original weight's dtype, so a
    converted model computes bit for bit what QAT trained. Kernel path (``use_kernel``, default on;
    CPU inference only): int4 groups of 32/64/128/256 with out_features % 16 == 0 run
    ``aten._weight_int4pack_mm_for_cpu``; int8 per-channel symmetric runs ``aten._weight_int8pack_mm``.
    Same weights, different summation order: equal to the reference within float rounding.
    The first kernel forward builds the kernel's weight layout and keeps it beside the packed codes
    (another 0.5 byte per weight for int4, 1 for int8), never in the state_dict.
    """

    use_kernel: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantSpec,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n_groups = in_features // group_size_for(scheme, in_features)
        packed_bytes = (in_features * out_features * scheme.bits + 7) // 8
        self.register_buffer("qweight", torch.empty(packed_bytes, dtype=torch.uint8, device=device))
        scale_dtype = SCALE_DTYPES[scheme.scale_dtype]
        self.register_buffer(
            "scale", torch.empty(out_features, n_groups, dtype=scale_dtype, device=device)
        )
        if not scheme.symmetric:
            self.register_buffer(
                "zero_point", torch.empty(out_features, n_groups, dtype=torch.int8, device=device)
            )
        else:
            self.zero_point = None
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.kernel = _kernel_for(scheme, in_features, out_features)
        self._kernel_cache: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantSpec) -> QuantizedLinear:
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            scheme,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        q, scale, zero_point = quantize_weight(weight, scheme)
        module.qweight.copy_(pack_codes(q, scheme.bits))
        module.scale.copy_(scale)
        if module.zero_point is not None:
            module.zero_point.copy_(zero_point)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_codes(self.qweight, self.scheme.bits, self.in_features * self.out_features)
        shape = (self.out_features, self.in_features)
        return dequantize_weight(q, self.scale, self.zero_point, self.scheme, shape, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if (
            self.use_kernel
            and self.kernel is not None
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            out = self._kernel_matmul(x.reshape(-1, self.in_features))
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out + bias if bias is not None else out
        if self.scheme.activations == "int8_dynamic":
            x = _activation_quant_dequant(x)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _kernel_matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Rebuild the kernel layout when the dtype or the buffers changed (load_state_dict, .to).
        key = (x.dtype, self.qweight.data_ptr(), self.qweight._version, self.scale._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            numel = self.in_features * self.out_features
            q = unpack_codes(self.qweight, self.scheme.bits, numel).reshape(self.out_features, -1)
            if self.kernel == "int4pack":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    q.to(torch.int32) + 8, 1
                )
                scale = self.scale.float()
                zero = torch.zeros_like(scale)
                if self.zero_point is not None:  # (q - zp) * s == q * s + (-zp * s)
                    zero = -self.zero_point.float() * scale
                scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(x.dtype)
                self._kernel_cache = (key, packed, scales_and_zeros.contiguous())
            else:
                self._kernel_cache = (key, q.contiguous(), self.scale.reshape(-1).to(x.dtype))
        _, weight, scales = self._kernel_cache
        if self.kernel == "int4pack":
            group = self.in_features // self.scale.shape[1]
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales)
        return torch.ops.aten._weight_int8pack_mm(x, weight, scales)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme.name()}, kernel={self.kernel}"
        )


def _kernel_for(scheme: QuantSpec, in_features: int, out_features: int) -> str | None:
    """Which CPU kernel serves this layer: "int4pack", "int8pack" or None (reference path)."""
    if scheme.activations is not None:
        return None
    group = group_size_for(scheme, in_features)
    if (
        scheme.bits == 4
        and group in (32, 64, 128, 256)
        and out_features % 16 == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    ):
        return "int4pack"
    if (
        scheme.bits == 8
        and scheme.symmetric
        and scheme.group_size is None
        and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    ):
        return "int8pack"
    return None


def set_kernels_enabled(model: nn.Module, enabled: bool) -> None:
    """Use the CPU int4/int8 kernels (fast) or the bit-exact reference path in every
    QuantizedLinear."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernel = enabled


def _empty_quantized_linears(model: nn.Module, names, scheme: QuantSpec) -> None:
    """Replace the named linears by empty ``QuantizedLinear`` shells for a checkpoint to fill."""
    for name in names:
        linear = model.get_submodule(name)
        module = QuantizedLinear(
            linear.in_features,
            linear.out_features,
            scheme,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        _replace(model, name, module)


def convert_model(model: nn.Module, scheme: QuantSpec) -> list[str]:
    """Replace eligible linears (plain or FakeQuantLinear) by QuantizedLinear in place; returns names.

    The converted weights equal what ``fake_quantize_weight`` produced during QAT, bit for bit.
    """
    for module in model.modules():
        if isinstance(module, FakeQuantLinear) and module.scheme != scheme:
            raise ValueError(
                f"model was prepared for QAT with {module.scheme.name()} but is being converted "
                f"with {scheme.name()}; convert with the QAT scheme"
            )
    names = []
    with torch.no_grad():
        for name, linear in _eligible_linears(model, scheme, (nn.Linear, FakeQuantLinear)):
            _replace(model, name, QuantizedLinear.from_linear(linear, scheme))
            names.append(name)
    return names


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, scheme: QuantSpec) -> None:
    """Write a converted model (see the module docstring for the format) and its tokenizer."""
    from safetensors.torch import save_file

    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not modules:
        raise ValueError("model has no QuantizedLinear; call convert_model(model, scheme) first")
    for name, module in modules.items():
        if module.scheme != scheme:
            raise ValueError(
                f"{name} was converted with {module.scheme.name()}, not {scheme.name()}"
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # safetensors refuses shared storage: keep the first name of each tensor, record the others.
    tensors, tied, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        identity = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and identity in seen:
            tied[key] = seen[identity]
        else:
            seen[identity] = key
            tensors[key] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "scheme": scheme.model_dump(mode="json"),
        "scheme_name": scheme.name(),
        "dtype": str(dtype).removeprefix("torch."),
        "modules": sorted(modules),
        "tied": tied,
    }
    (out_dir / QUANT_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if getattr(model, "config", None) is not None:
        # Named in config.json so the directory says what it is; the in-memory config is restored.
        config = model.config
        had_quantization_config = hasattr(config, "quantization_config")
        previous = getattr(config, "quantization_config", None)
        config.quantization_config = {
            "quant_method": FORMAT_NAME,
            "scheme": scheme.name(),
            "scheme_config": scheme.model_dump(mode="json"),
            "modules": sorted(modules),
            "load_with": "import distill.compress.packed; then AutoModelForCausalLM.from_pretrained "
            "or distill.compress.packed.load_quantized",
        }
        try:
            config.save_pretrained(out_dir)
        finally:
            if had_quantization_config:
                config.quantization_config = previous
            else:
                del config.quantization_config
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def is_quantized_dir(path: str | Path) -> bool:
    """True if ``path`` was written by ``save_quantized`` (load it with ``load_quantized``)."""
    return (Path(path) / QUANT_CONFIG_FILE).is_file()


def load_quantized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``: the architecture from config.json, quantized
    linears as QuantizedLinear, every tensor from model.safetensors. Returns it in eval mode.

    ``dtype`` (default: the dtype it was saved in) is the dtype of the float parts and of the
    activations; the codes and scales are loaded unchanged. On CPU, ``torch.bfloat16`` takes the
    int4 kernel's fast path (several times faster than float32 activations)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_quantized_dir(path):
        raise FileNotFoundError(
            f"{path} has no {QUANT_CONFIG_FILE}: not written by save_quantized; a float model "
            "directory loads with transformers.AutoModelForCausalLM.from_pretrained"
        )
    meta = json.loads((path / QUANT_CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / QUANT_CONFIG_FILE}: format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this distill reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    scheme = QuantSpec.model_validate(meta["scheme"])
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(torch, meta["dtype"])
    try:  # every tensor is overwritten below: skip the random initialization
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _empty_quantized_linears(model, meta["modules"], scheme)
    state = load_file(str(path / WEIGHTS_FILE))
    for alias, source in meta["tied"].items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    # Re-tie (no_init_weights also skips transformers' tying): the alias becomes the same tensor.
    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for alias, source in meta["tied"].items():
        module_name, _, attribute = alias.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        shared = (
            model.get_parameter(source) if source in parameter_names else model.get_buffer(source)
        )
        setattr(module, attribute, shared)
    return model.to(device).eval()


def register_transformers_quantizer() -> bool:
    """Teach ``AutoModelForCausalLM.from_pretrained`` to load this format (runs on import of this
    module; idempotent). False when this transformers version has no quantizer registry."""
    try:
        from transformers.quantizers import (
            HfQuantizer,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False
    if FORMAT_NAME in AUTO_QUANTIZER_MAPPING:
        return True

    @register_quantization_config(FORMAT_NAME)
    class DistillIntxConfig(QuantizationConfigMixin):
        """config.json's ``quantization_config`` of a directory written by ``save_quantized``."""

        def __init__(self, scheme_config: dict | None = None, modules=(), **kwargs) -> None:
            if scheme_config is None:
                raise ValueError(
                    f"{FORMAT_NAME} quantization_config without scheme_config: written by an "
                    "older distill; load it with distill.compress.packed.load_quantized"
                )
            self.quant_method = FORMAT_NAME
            self.scheme_config = scheme_config
            self.modules = list(modules)
            for key, value in kwargs.items():
                setattr(self, key, value)

    @register_quantizer(FORMAT_NAME)
    class DistillIntxQuantizer(HfQuantizer):
        """Swaps the listed linears for QuantizedLinear before the packed tensors are loaded."""

        requires_calibration = True  # loads pre-quantized weights only

        def _process_model_before_weight_loading(self, model, **kwargs):
            scheme = QuantSpec.model_validate(self.quantization_config.scheme_config)
            _empty_quantized_linears(model, self.quantization_config.modules, scheme)
            return model

        def is_serializable(self) -> bool:
            return False  # save with save_quantized

        @property
        def is_trainable(self) -> bool:
            return False

    return True


def quantized_size_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of a model directory, or of one file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights under {path}")
    return sum(f.stat().st_size for f in files)


try:
    register_transformers_quantizer()
except (ImportError, ValueError, TypeError):  # another transformers: load_quantized still works
    pass
