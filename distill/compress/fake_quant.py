"""Fake quantization for `ptq` and `qat`: the rounding a quantized model computes, in training.

Flow: ``prepare_qat`` swaps linears for ``FakeQuantLinear`` (training sees the rounded weights, the
gradient passes straight through); ``remove_fake_quant`` swaps them back, leaving the float weights
an `export` stage writes in a server's format (``distill.compress.export``).

A scheme with a ``target`` ("gguf-q4_0", "gguf-q8_0", "compressed-tensors") rounds exactly as that
format's own quantizer (``distill.compress.grids``, tested bit for bit against gguf.quants and
compressed-tensors), so the export is not rounded a second time. Without a target the rounding is
torchao's affine formula (``choose_qparams_affine`` + ``quantize_affine``, as used by
``IntxWeightOnlyConfig``), reproduced here in plain torch; ``torchao_config(scheme)`` gives the
torchao config that produces the same codes, and the tests check that equality bit for bit. Per
row of the weight and per group of ``group_size`` input columns (the whole row when
``group_size`` is None), with ``qmin, qmax = -2**(bits-1), 2**(bits-1) - 1``::

    symmetric:  scale = max(|w|) / ((qmax - qmin) / 2),          zero_point = 0
    asymmetric: scale = (max(w, 0) - min(w, 0)) / (qmax - qmin),
                zero_point = clamp(qmin - round(min(w, 0) / scale), qmin, qmax)
    scale = max(scale, smallest normal of the weight dtype), then cast to scheme.scale_dtype
    q     = clamp(round(w * (1 / scale)) + zero_point, qmin, qmax)     (round half to even)
    w_hat = (q - zero_point) * scale

Symmetric divides by 7.5 for int4 (not 7): the negative end uses code -8 fully and a group's
largest positive weight lands half a step past code 7 and is clamped to it. (compressed-tensors
uses the same formula but divides by the scale where torchao multiplies by its reciprocal: a
different rounding in rare ties, hence the target grids.)

Why not torchao's QAT (``QATConfig`` + ``IntxFakeQuantizeConfig``, torchao 0.18): for symmetric
schemes it rounds exactly as here (tested), but for asymmetric ones its zero point differs from its
own converter's. ``activations="int8_dynamic"`` is simulated (per-token quantize-dequantize of the
input, as torchao's ``Int8DynamicActivationIntxWeightConfig`` does with its unpacked format): the
numerics of an int8 kernel, not its speed.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from distill.compress.grids import Grid, target_grid
from distill.specs import QuantSpec

SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def group_size_for(scheme: QuantSpec, in_features: int, module_name: str = "weight") -> int:
    """The group size used for a weight with ``in_features`` columns; errors if it cannot."""
    if scheme.group_size is None:
        return in_features
    check_divides(scheme, {module_name: in_features})
    return scheme.group_size


def check_divides(scheme: QuantSpec, in_features_by_name: dict[str, int]) -> None:
    """Raise one error naming every layer whose in_features the group size does not divide."""
    bad = {n: k for n, k in in_features_by_name.items() if k % (scheme.group_size or k)}
    if not bad:
        return
    sizes = [g for g in (8, 16, 32, 64, 128, 256) if all(k % g == 0 for k in bad.values())]
    by_width: dict[int, list[str]] = {}
    for name, k in bad.items():
        by_width.setdefault(k, []).append(name)
    layers = "; ".join(
        f"{k} ({names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''})"
        for k, names in by_width.items()
    )
    raise ValueError(
        f"{scheme.name()}: group_size {scheme.group_size} does not divide in_features "
        f"{layers}; use a group size that divides it "
        f"({', '.join(map(str, sizes)) or 'no power of two from 8 to 256 does'}), "
        "group_size=None (per output channel), or add these modules to exclude"
    )


def scheme_grid(scheme: QuantSpec) -> Grid:
    """The target format's grid of a scheme with a ``target``."""
    scale_dtype = scheme.scale_dtype if scheme.target == "compressed-tensors" else "bfloat16"
    return target_grid(scheme.target, scheme.bits, scheme.group_size, scheme.symmetric, scale_dtype)


def _qparams(w: torch.Tensor, scheme: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale [out, n_groups] (scheme.scale_dtype) and zero_point [out, n_groups] (int8)."""
    group = group_size_for(scheme, w.shape[-1])
    groups = w.detach().reshape(w.shape[0], -1, group)
    min_neg = torch.clamp(groups.amin(dim=-1), max=0)
    max_pos = torch.clamp(groups.amax(dim=-1), min=0)
    eps = torch.finfo(w.dtype).smallest_normal
    if scheme.symmetric:
        scale = torch.max(-min_neg, max_pos) / (float(scheme.qmax - scheme.qmin) / 2)
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (max_pos - min_neg) / float(scheme.qmax - scheme.qmin)
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.clamp(
            scheme.qmin - torch.round(min_neg / scale), scheme.qmin, scheme.qmax
        )
    # torchao with scale_dtype != weight dtype: zero_point from the unrounded scale, codes from the
    # rounded one (``_adjust_scale_dtype_in_intx_unpacked_tensor``).
    return scale.to(SCALE_DTYPES[scheme.scale_dtype]), zero_point.to(torch.int8)


def quantize_weight(
    w: torch.Tensor, scheme: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``q`` (int8, shape of ``w``), ``scale`` and ``zero_point`` ([out, n_groups])."""
    if w.dim() != 2:
        raise ValueError(
            f"quantize_weight expects a 2-d [out, in] weight, got shape {tuple(w.shape)}"
        )
    scale, zero_point = _qparams(w, scheme)
    groups = w.detach().reshape(scale.shape[0], scale.shape[1], -1)
    q = torch.round(groups * (1.0 / scale[..., None])) + zero_point[..., None]
    q = torch.clamp(q, scheme.qmin, scheme.qmax)
    return q.reshape(w.shape).to(torch.int8), scale, zero_point


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    scheme: QuantSpec,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` reshaped to ``shape``, in ``dtype`` (torchao's order of ops)."""
    out_features, n_groups = scale.shape
    w = q.reshape(out_features, n_groups, -1).to(dtype)
    if zero_point is not None and not scheme.symmetric:
        w = w - zero_point[..., None].to(dtype)
    return (w * scale[..., None]).reshape(shape).to(dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: quantize-dequantize; backward: the gradient passes to the input unchanged."""

    @staticmethod
    def forward(ctx, x, quant_dequant):
        return quant_dequant(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def _weight_quant_dequant(w: torch.Tensor, scheme: QuantSpec) -> torch.Tensor:
    q, scale, zero_point = quantize_weight(w, scheme)
    return dequantize_weight(q, scale, zero_point, scheme, w.shape, dtype=w.dtype)


def fake_quantize_weight(w: torch.Tensor, scheme: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(w))`` in value, bit for bit; the gradient is the identity.

    Scales come from ``w`` itself (detached: no gradient flows through the scale), so no weight is
    outside the range except, in symmetric mode, a group's largest positive weight, which sits half
    a step past the top code and is clamped to it. Its gradient also passes unchanged: every element
    of ``w`` gets exactly the incoming gradient, so the weight that sets the scale keeps training.
    """
    if scheme.target is not None:
        return scheme_grid(scheme).fake_quantize(w)
    return _StraightThrough.apply(w, lambda t: _weight_quant_dequant(t, scheme))


def _activation_quant_dequant(x: torch.Tensor) -> torch.Tensor:
    """Per-token asymmetric int8, as torchao's ``_apply_int8_act_asym_per_token_quant_dequant``."""
    qmin, qmax = -128, 127
    min_neg = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    max_pos = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    scale = torch.clamp(
        (max_pos - min_neg) / float(qmax - qmin), min=torch.finfo(x.dtype).smallest_normal
    )
    zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int8)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax).to(torch.int8)
    return ((q.to(x.dtype) - zero_point.to(x.dtype)) * scale).to(x.dtype)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic int8 quantize-dequantize of ``x``; straight-through gradient."""
    return _StraightThrough.apply(x, _activation_quant_dequant)


# --- modules -------------------------------------------------------------------------------------


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (and input, for ``+a8``).

    ``enabled=False`` gives the exact float forward, so fake quantization can start after N steps.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        scheme: QuantSpec | None = None,
        enabled: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scheme = scheme or QuantSpec()
        group_size_for(self.scheme, in_features)
        self.enabled = enabled

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantSpec) -> FakeQuantLinear:
        """A FakeQuantLinear holding the very same weight and bias Parameters as ``linear``."""
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            scheme=scheme,
        )
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.scheme.activations == "int8_dynamic":
            x = fake_quantize_activation(x)
        return F.linear(x, fake_quantize_weight(self.weight, self.scheme), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme.name()}, enabled={self.enabled}"


# --- model transforms ----------------------------------------------------------------------------


def _is_excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(pattern in name or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _eligible_linears(model: nn.Module, scheme: QuantSpec, kinds: tuple[type, ...]):
    """(name, module) of every linear to quantize; checks group sizes before anything changes."""
    embedding_weights = _embedding_weights(model)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in kinds
        and not _is_excluded(name, scheme.exclude)
        and id(module.weight) not in embedding_weights
    ]
    check_divides(scheme, {name: module.in_features for name, module in chosen})
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def prepare_qat(model: nn.Module, scheme: QuantSpec) -> list[str]:
    """Swap every eligible ``nn.Linear`` for a ``FakeQuantLinear`` in place; returns their names.

    The same Parameter objects move into the new modules, so state_dict keys, an optimizer built
    before or after, and a teacher comparison keep working. Excluded: names matching
    ``scheme.exclude``, embeddings and linears tied to them; subclasses of nn.Linear are left alone.
    """
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("model is already prepared for QAT; call remove_fake_quant(model) first")
    names = []
    for name, linear in _eligible_linears(model, scheme, (nn.Linear,)):
        _replace(model, name, FakeQuantLinear.from_linear(linear, scheme))
        names.append(name)
    return names


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off in every FakeQuantLinear (off = exact float forward)."""
    modules = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not modules:
        raise ValueError("model has no FakeQuantLinear; call prepare_qat(model, scheme) first")
    for module in modules:
        module.enabled = enabled


def remove_fake_quant(model: nn.Module) -> list[str]:
    """Swap every FakeQuantLinear back to a plain ``nn.Linear`` (same Parameters); returns names."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            linear.weight, linear.bias = module.weight, module.bias
            _replace(model, name, linear)
            names.append(name)
    return names


def torchao_config(scheme: QuantSpec):
    """The torchao config whose ``quantize_`` gives the same codes and scales as this module."""
    try:
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_primitives import MappingType
    except ImportError as error:
        raise ImportError("torchao is not installed: pip install 'distill[quant]'") from error
    granularity = PerAxis(0) if scheme.group_size is None else PerGroup(scheme.group_size)
    mapping = MappingType.SYMMETRIC if scheme.symmetric else MappingType.ASYMMETRIC
    weight_dtype = getattr(torch, f"int{scheme.bits}", None)
    if weight_dtype is None:
        raise ValueError(
            f"{scheme.name()}: torch {torch.__version__} has no torch.int{scheme.bits}, which "
            "torchao's config needs (torch >= 2.6); prepare_qat here does not need it"
        )
    scale_dtype = SCALE_DTYPES[scheme.scale_dtype]
    if scheme.activations == "int8_dynamic":
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype,
            weight_granularity=granularity,
            weight_mapping_type=mapping,
            weight_scale_dtype=scale_dtype,
        )
    return IntxWeightOnlyConfig(
        weight_dtype=weight_dtype,
        granularity=granularity,
        mapping_type=mapping,
        scale_dtype=scale_dtype,
    )
