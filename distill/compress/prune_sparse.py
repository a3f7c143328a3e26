"""Unstructured (magnitude, Wanda) and N:M semi-structured pruning: same shapes, zeros, and the
keep-masks that recovery training re-applies after every optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from distill.compress.layers import (
    check_calibration,
    input_sq_sums,
    prunable_linears,
)
from distill.errors import RecipeError, SettingError
from distill.specs import PruneSpec


def prune_sparse(
    model: nn.Module,
    spec: PruneSpec,
    calibration: list[torch.Tensor] | None,
    exclude: Sequence[str],
) -> tuple[dict[str, torch.Tensor], dict]:
    """Zero weights of every prunable linear (magnitude, wanda, nm); returns keep-masks and the
    per-layer details."""
    method, sparsity, n, m, scope = spec.method, spec.sparsity, spec.n, spec.m, spec.scope
    linears = prunable_linears(model, exclude)
    if not linears:
        raise RecipeError(f"exclude={list(exclude)} leaves no linear layer to prune")
    if method == "nm":
        _check_nm(m, linears)
        use_wanda = spec.scoring == "wanda"
    else:
        use_wanda = method == "wanda"
    sq_sums = None
    if use_wanda:
        check_calibration(calibration, f"{method} with Wanda scoring")
        sq_sums = input_sq_sums(model, linears, calibration)

    def scores(name: str) -> torch.Tensor:
        weight = linears[name].weight.detach().float().abs()
        return weight if sq_sums is None else weight * sq_sums[name].sqrt()

    if method == "magnitude" and scope == "global":
        keeps = _global_keep_masks(scores, list(linears), sparsity)
    else:
        keeps = {}
        for name in linears:
            s = scores(name)
            if method == "nm":
                keep = _keep_highest(s.view(s.shape[0], -1, m), m - n).view_as(s)
            elif method == "magnitude":
                keep = _keep_highest(s.flatten(), round(sparsity * s.numel())).view_as(s)
            else:  # wanda: compare within each output row
                keep = _keep_highest(s, round(sparsity * s.shape[1]))
            keeps[name] = keep

    masks = {}
    with torch.no_grad():
        for name, keep in keeps.items():
            linears[name].weight.masked_fill_(~keep, 0)
            masks[f"{name}.weight"] = keep
    details = {
        "scoring": "wanda" if use_wanda else "magnitude",
        "per_layer_sparsity": {
            name: 1 - keep.float().mean().item() for name, keep in masks.items()
        },
    }
    if method == "nm":
        details.update(n=n, m=m)
    else:
        details.update(target_sparsity=sparsity, scope=scope)
    return masks, details


def _check_nm(m: int, linears: dict[str, nn.Linear]) -> None:
    for name, linear in linears.items():
        if linear.in_features % m:
            raise SettingError(
                "N:M sparsity needs {m} to divide every in_features; "
                f"{name} has in_features={linear.in_features}, {{m=}}",
                m=m,
            )


def _keep_highest(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Bool keep-mask that drops the `num_pruned` lowest scores along the last dimension."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if num_pruned > 0:
        keep.scatter_(-1, scores.topk(num_pruned, dim=-1, largest=False).indices, False)
    return keep


def _global_keep_masks(
    scores: Callable[[str], torch.Tensor], names: list[str], sparsity: float
) -> dict[str, torch.Tensor]:
    """Drop the lowest `sparsity` share of scores over all layers together.

    Concatenating every score would need fp32 memory for the whole model, so the threshold is found
    by bisection on the bits of non-negative float32 scores (their int32 views sort like the
    values), one layer in memory at a time; ties at the threshold are dropped in layer order.
    """
    total = sum(scores(name).numel() for name in names)
    num_pruned = round(sparsity * total)

    def as_float(bits: int) -> float:
        return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()

    low, high = 0, 0x7F800000  # +inf
    while low < high:  # smallest threshold with at least num_pruned scores <= it
        mid = (low + high) // 2
        at_most = sum(int((scores(name) <= as_float(mid)).sum()) for name in names)
        low, high = (low, mid) if at_most >= num_pruned else (mid + 1, high)
    threshold = as_float(low)
    ties_to_drop = num_pruned - sum(int((scores(name) < threshold).sum()) for name in names)
    keeps = {}
    for name in names:
        s = scores(name)
        keep = s > threshold
        tie_positions = (s == threshold).flatten().nonzero().squeeze(1)
        keep.view(-1)[tie_positions[ties_to_drop:]] = True
        ties_to_drop = max(0, ties_to_drop - tie_positions.numel())
        keeps[name] = keep
    return keeps
