"""The weight grids of the formats a model is shipped in, reproduced bit for bit in torch.

A model trained (QAT) or measured (PTQ) on one of these grids computes exactly what the served
model computes once exported: the exporter rounds onto the same grid, so nothing is rounded twice.
Each grid follows its format's own quantizer, checked against it by the tests:

- ``gguf-q4_0`` (``gguf.quants.Q4_0``, llama.cpp's ``quantize_row_q4_0_ref``): blocks of 32 along
  the input dimension; ``d = m / -8`` where ``m`` is the block's value of largest magnitude *with its
  sign* (so the extreme lands on code 0, the top of the range is one step short); codes
  ``min(15, trunc(x * (1/d) + 8.5))`` computed with the float32 ``d``, while the file stores ``d`` as
  float16 and the runtime computes ``(code - 8) * fp16(d)``.
- ``gguf-q8_0`` (``gguf.quants.Q8_0``): blocks of 32; ``d = max|x| / 127``; codes
  ``round(x * (1/d))`` rounding halves away from zero; ``d`` stored as float16.
- ``compressed-tensors`` (its ``calculate_qparams`` and ``quantize``, symmetric int): per group of
  32/64/128 input columns or per output channel; ``scale = max|x| / ((qmax - qmin) / 2)`` (7.5 for
  int4, 127.5 for int8), rounded to ``scale_dtype``, 0 replaced by that dtype's epsilon; codes
  ``round(clamp(x / scale, qmin, qmax))`` rounding halves to even.

The rounding is always computed in float32, as the exporters compute it (gguf's numpy code works
in float32; the compressed-tensors export compresses a float32 model). The dequantized value
``code * scale`` is exact in float32 (at most 8 + 11 significant bits), so a float32 runtime
computes it exactly and a bf16/fp16 runtime rounds it once, as a model fake-quantized in that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.errors import RecipeError
from distill.targets import CT_GROUP_SIZES, grid_name, resolve_target

SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Grid:
    """One target format's weight grid: how a [out, in] weight becomes codes and scales."""

    target: str
    """One of TARGETS."""
    bits: int
    group_size: int | None
    """Input columns per scale; None = one scale per output channel (compressed-tensors only)."""
    scale_dtype: str = "float16"
    """The dtype the format stores scales in (GGUF: always float16)."""

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def name(self) -> str:
        """Short name: "gguf-q4_0", "ct-int4-g32", "ct-int8-pc"."""
        return grid_name(self.target, self.bits, self.group_size)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed integer codes (int8, shape of ``w``) and scales ([out, in / group]) of ``w``."""
        if w.dim() != 2:
            raise ValueError(f"{self.name()}: expects a 2-d [out, in] weight, got {tuple(w.shape)}")
        group = self.group_size or w.shape[1]
        if w.shape[1] % group:
            raise ValueError(
                f"{self.name()}: in_features {w.shape[1]} is not a multiple of the group size "
                f"{group}"
            )
        groups = w.detach().to(torch.float32).reshape(w.shape[0], -1, group)
        if self.target == "gguf-q4_0":
            codes, scale = _q4_0(groups)
        elif self.target == "gguf-q8_0":
            codes, scale = _q8_0(groups)
        else:
            codes, scale = _ct_symmetric(groups, self)
        return codes.reshape(w.shape), scale

    def dequantize(
        self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``codes * scale`` (exact in float32), in ``dtype``."""
        out_features, n_groups = scale.shape
        w = codes.reshape(out_features, n_groups, -1).to(torch.float32)
        return (w * scale.to(torch.float32)[..., None]).reshape(codes.shape).to(dtype)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(w))`` in ``w``'s dtype; the gradient passes through unchanged."""
        return _StraightThrough.apply(w, self)


class _StraightThrough(torch.autograd.Function):
    """Forward: the grid's value; backward: the identity, so every weight keeps training."""

    @staticmethod
    def forward(ctx, w, grid):
        codes, scale = grid.quantize(w)
        return grid.dequantize(codes, scale, w.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def _q4_0(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # argmax returns the first of equal magnitudes, as numpy's does: it decides the sign of d.
    index = groups.abs().argmax(dim=-1, keepdim=True)
    d = groups.gather(-1, index) / -8.0
    inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    codes = torch.trunc(groups * inverse + 8.5).clamp(0, 15) - 8
    return codes.to(torch.int8), d[..., 0].to(torch.float16)


def _q8_0(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = groups.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    scaled = groups * inverse
    # gguf's np_roundf (halves away from zero); floor(|x| + 0.5) would differ just below a half.
    magnitude = scaled.abs()
    floored = magnitude.floor()
    codes = torch.sign(scaled) * (floored + (2 * (magnitude - floored)).floor())
    return codes.to(torch.int8), d[..., 0].to(torch.float16)


def _ct_symmetric(groups: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    # compressed-tensors' calculate_qparams: 0 always representable, then max|x| / (range / 2),
    # with the range as a float32 0-d tensor as its calculate_range makes it.
    min_vals = torch.clamp(groups.amin(dim=-1), max=0)
    max_vals = torch.clamp(groups.amax(dim=-1), min=0)
    max_pos = torch.max(min_vals.abs(), max_vals)
    half_range = torch.tensor(float(grid.qmax - grid.qmin)) / 2
    scale = max_pos / half_range
    scale_dtype = SCALE_DTYPES[grid.scale_dtype]
    finfo = torch.finfo(scale_dtype)
    scale = torch.clamp(scale, finfo.min, finfo.max).to(scale_dtype).to(torch.float32)
    scale = torch.where(scale == 0, torch.tensor(finfo.eps, dtype=torch.float32), scale)
    codes = torch.round(torch.clamp(groups / scale[..., None], grid.qmin, grid.qmax))
    return codes.to(torch.int8), scale.to(scale_dtype)


def target_grid(
    target: str,
    bits: int | None = None,
    group_size: int | None = -1,
    symmetric: bool = True,
    scale_dtype: str = "bfloat16",
) -> Grid:
    """The grid of ``target`` for a scheme (see ``resolve_target``), or a RecipeError naming the
    nearest supported choice."""
    return Grid(*resolve_target(target, bits, group_size, symmetric, scale_dtype))


def check_widths(grid: Grid, in_features_by_name: dict[str, int]) -> None:
    """One error naming every layer whose input width the grid's group size does not divide."""
    if grid.group_size is None:
        return
    bad = {n: k for n, k in in_features_by_name.items() if k % grid.group_size}
    if not bad:
        return
    name, width = next(iter(bad.items()))
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    fits = [
        g
        for g in (*CT_GROUP_SIZES, None)
        if grid.target == "compressed-tensors"
        and (g is None or all(k % g == 0 for k in bad.values()))
    ]
    hint = f"; or use group_size {fits[0]}" if fits else ""
    raise RecipeError(
        f"{grid.name()}: in_features {width} of {name}{more} is not a multiple of the group size "
        f"{grid.group_size}; prune to a multiple of {grid.group_size} (prune.multiple_of: "
        f"{grid.group_size}){hint}"
    )
