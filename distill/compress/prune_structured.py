"""Structured pruning: whole attention heads and MLP channels (width, Minitron-style) or whole
layers (depth). The result is a smaller ordinary transformers model with an updated config."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill.compress.layers import (
    _PER_LAYER_CONFIG_LISTS,
    check_calibration,
    input_sq_sums,
    own_config,
    run_calibration,
)
from distill.errors import SettingError
from distill.specs import PruneSpec


def _count_removed(fraction: float, available: int, key: str, what: str) -> int:
    """How many of `available` units a fraction removes: rounded, at least one when above 0."""
    removed = max(round(fraction * available), 1) if fraction > 0 else 0
    if removed >= available:
        raise SettingError(
            f"{{{key}=}} removes {removed} of {available} {what}, leaving none; "
            "use a smaller fraction",
            **{key: fraction},
        )
    return removed


def _kept_multiple(
    kept: int,
    available: int,
    multiple: int,
    key: str = "multiple_of",
    what: str = "the MLP has {} channels",
) -> int:
    """``kept`` rounded to the nearest multiple of ``multiple``, keeping at least one multiple and
    still removing something: int4 groups and GGUF blocks need widths in multiples of 32, tensor
    parallelism head counts divisible by the number of GPUs."""
    largest = (available - 1) // multiple * multiple
    if largest < multiple:
        raise SettingError(
            f"{{{key}=}}: {what.format(available)}, too few to keep a multiple of {multiple} and "
            f"remove any; use a smaller {{{key}}} (1 keeps exactly the fraction)",
            **{key: multiple},
        )
    return min(max(round(kept / multiple) * multiple, multiple), largest)


def _heads_removed(spec: PruneSpec, available: int) -> int:
    """KV groups (or queries per group) removed: the fraction, then the kept count rounded to
    `heads_multiple_of`."""
    by_group = spec.head_unit == "kv_group"
    removed = _count_removed(
        spec.heads_fraction,
        available,
        "heads_fraction",
        "key-value head groups" if by_group else "query heads of each group",
    )
    if removed and spec.heads_multiple_of > 1:
        kept = _kept_multiple(
            available - removed,
            available,
            spec.heads_multiple_of,
            "heads_multiple_of",
            "the model has {} KV groups" if by_group else "each KV group has {} queries",
        )
        removed = available - kept
    return removed


def prune_width(
    model: nn.Module, layers: nn.ModuleList, spec: PruneSpec, calibration: list[torch.Tensor] | None
) -> dict:
    """Remove the least important heads and MLP channels of every layer (the same count in each),
    ranked by the norm of their outputs on calibration data (Minitron)."""
    heads_fraction, mlp_fraction, head_unit = spec.heads_fraction, spec.mlp_fraction, spec.head_unit
    config = model.config
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    group = num_heads // num_kv
    head_dim = layers[0].self_attn.head_dim
    intermediate = layers[0].mlp.down_proj.in_features
    if head_unit == "query_head" and group == 1 and heads_fraction > 0:
        raise SettingError(
            "{head_unit}='query_head' removes query heads within key-value groups, but this "
            f"model has one query head per key-value head ({num_heads} of each); use 'kv_group'",
            head_unit=head_unit,
        )

    def head_counts(removed: int) -> dict:  # config sizes after removing `removed` units
        kv, per_group = (
            (num_kv - removed, group) if head_unit == "kv_group" else (num_kv, group - removed)
        )
        return {"num_attention_heads": kv * per_group, "num_key_value_heads": kv}

    available = num_kv if head_unit == "kv_group" else group
    heads_removed = _heads_removed(spec, available)
    channels_removed = _count_removed(mlp_fraction, intermediate, "mlp_fraction", "MLP channels")
    if channels_removed and spec.multiple_of > 1:
        channels_removed = intermediate - _kept_multiple(
            intermediate - channels_removed, intermediate, spec.multiple_of
        )
    new_intermediate = intermediate - channels_removed
    # head_dim is written explicitly: configs without it derive hidden_size // num_attention_heads.
    updates = {
        **head_counts(heads_removed),
        "head_dim": head_dim,
        "intermediate_size": new_intermediate,
    }
    _check_config_accepts(config, updates, head_counts, available, head_unit)
    check_calibration(calibration, "width pruning")

    stats = {}
    for i, layer in enumerate(layers):
        stats[f"{i}.o_proj"] = layer.self_attn.o_proj
        stats[f"{i}.down_proj"] = layer.mlp.down_proj
    sq_sums = input_sq_sums(model, stats, calibration)

    kept_kv_heads, kept_query_heads, kept_channels = _slice_layers(
        layers,
        sq_sums,
        updates,
        heads_removed,
        channels_removed,
        head_unit,
        (num_kv, group, head_dim),
    )
    config = own_config(model)
    for key, value in updates.items():
        setattr(config, key, value)
    return {
        **updates,
        "head_unit": head_unit,
        "kv_groups_removed_per_layer": heads_removed if head_unit == "kv_group" else 0,
        "query_heads_removed_per_group": heads_removed if head_unit == "query_head" else 0,
        "mlp_channels_removed_per_layer": channels_removed,
        "kept_kv_heads": kept_kv_heads or None,
        "kept_query_heads": kept_query_heads or None,
        "kept_mlp_channels": kept_channels or None,
    }


def _check_config_accepts(
    config, updates: dict, head_counts: Callable[[int], dict], available: int, head_unit: str
) -> None:
    """Fail before any work when the config class rejects the pruned sizes (its own validation)."""

    def error(changes: dict) -> Exception | None:
        try:
            type(config).from_dict({**config.to_dict(), **changes})
        except Exception as err:  # each config class raises its own validation error type
            return err
        return None

    err = error(updates)
    if err is None:
        return
    unit = "groups" if head_unit == "kv_group" else "heads per group"
    allowed = [
        f"{r / available:g} ({r} {unit})"
        for r in range(1, available)
        if error({**updates, **head_counts(r)}) is None
    ]
    raise SettingError(
        f"{type(config).__name__} rejects the pruned sizes {updates}: {err}. "
        f"{{heads_fraction}} values it accepts: {', '.join(allowed) or 'none besides 0'}",
        heads_fraction=None,
    )


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def _slice_attention(
    attn: nn.Module, kept_kv: torch.Tensor, kept_heads: torch.Tensor, head_dim: int
) -> None:
    """Keep the given KV heads and query heads; every kept KV head keeps the same number of query
    heads, in order, so query head h of the result still reads KV head h // new group size."""
    q_rows, kv_rows = _head_rows(kept_heads, head_dim), _head_rows(kept_kv, head_dim)
    _keep_outputs(attn.q_proj, q_rows)
    _keep_outputs(attn.k_proj, kv_rows)
    _keep_outputs(attn.v_proj, kv_rows)
    _keep_inputs(attn.o_proj, q_rows)
    # Attention classes of some versions keep head counts as attributes their forward reads.
    counts = {
        "num_heads": len(kept_heads),
        "num_attention_heads": len(kept_heads),
        "num_key_value_heads": len(kept_kv),
        "num_kv_heads": len(kept_kv),
        "num_key_value_groups": len(kept_heads) // len(kept_kv),
    }
    for attr, value in counts.items():
        if hasattr(attn, attr):
            setattr(attn, attr, value)


def _slice_mlp(mlp: nn.Module, kept: torch.Tensor) -> None:
    _keep_outputs(mlp.gate_proj, kept)
    _keep_outputs(mlp.up_proj, kept)
    _keep_inputs(mlp.down_proj, kept)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept)


def _keep_outputs(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = _like(linear.weight, linear.weight.detach()[rows])
    if linear.bias is not None:
        linear.bias = _like(linear.bias, linear.bias.detach()[rows])
    linear.out_features = len(rows)


def _keep_inputs(linear: nn.Linear, columns: torch.Tensor) -> None:
    columns = columns.to(linear.weight.device)
    linear.weight = _like(linear.weight, linear.weight.detach()[:, columns])
    linear.in_features = len(columns)


def _like(param: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=param.requires_grad)


def prune_depth(
    model: nn.Module,
    layers: nn.ModuleList,
    depth_layers: int | list[int] | None,
    calibration: list[torch.Tensor] | None,
) -> dict:
    num_layers = len(layers)
    details: dict = {}
    if isinstance(depth_layers, int):  # a count, ranked (PruneSpec checked the types)
        if not depth_layers < num_layers:
            raise SettingError(
                f"{{layers=}} must remove at least 1 and fewer than all {num_layers} layers",
                layers=depth_layers,
            )
        check_calibration(calibration, "depth pruning by rank (layers as a count)")
        similarity = _block_similarities(model, layers, calibration)
        removed = sorted(similarity.topk(depth_layers).indices.tolist())
        details["input_output_cosine"] = similarity.tolist()
    else:
        removed = sorted(depth_layers)
        out_of_range = [i for i in removed if not 0 <= i < num_layers]
        if out_of_range:
            raise SettingError(
                f"{{layers}} {out_of_range} out of range: the model has layers 0..{num_layers - 1}",
                layers=depth_layers,
            )
        if not 1 <= len(removed) < num_layers:
            raise SettingError(
                f"{{layers}} must remove at least 1 and fewer than all {num_layers} layers, "
                f"got {list(depth_layers)}",
                layers=depth_layers,
            )

    kept = [i for i in range(num_layers) if i not in removed]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    # The KV cache is indexed by layer_idx, so the remaining layers are renumbered 0..len-1.
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    config = own_config(model)
    config.num_hidden_layers = len(kept)
    for attr in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(config, attr, [values[i] for i in kept])
    return {**details, "removed_layers": removed, "num_hidden_layers": len(kept)}


def _block_similarities(
    model: nn.Module, layers: nn.ModuleList, calibration: list[torch.Tensor]
) -> torch.Tensor:
    """Per layer, the cosine similarity of its input and output hidden state, mean over tokens."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += cosine.sum().item()
            counts[i] += cosine.numel()

        return hook

    handles = [
        layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
    return sums / counts


def _slice_layers(
    layers,
    sq_sums,
    updates,
    heads_removed,
    channels_removed,
    head_unit,
    shape: tuple[int, int, int],
):
    """Keep each layer's most important heads and MLP channels (by the squared L2 norm of their
    outputs over the calibration tokens); returns what was kept, per layer."""
    num_kv, group, head_dim = shape  # key-value heads, query heads per group, head width
    new_intermediate = updates["intermediate_size"]
    kept_kv_heads, kept_query_heads, kept_channels = [], [], []
    new_kv = updates["num_key_value_heads"]
    new_group = updates["num_attention_heads"] // new_kv
    for i, layer in enumerate(layers):
        if heads_removed:
            # A query head's importance: squared L2 norm of its output over all calibration tokens;
            # query head h reads key-value head h // group.
            scores = sq_sums[f"{i}.o_proj"].view(num_kv, group, head_dim).sum(-1)
            if head_unit == "kv_group":
                kept_kv = scores.sum(1).topk(new_kv).indices.sort().values
                within = torch.arange(group).expand(new_kv, group)
            else:
                kept_kv = torch.arange(num_kv)
                within = scores.topk(new_group, dim=1).indices.sort(dim=1).values
            kept_heads = (kept_kv[:, None] * group + within.to(kept_kv.device)).flatten()
            _slice_attention(layer.self_attn, kept_kv, kept_heads, head_dim)
            kept_kv_heads.append(kept_kv.tolist())
            kept_query_heads.append(kept_heads.tolist())
        if channels_removed:
            kept = sq_sums[f"{i}.down_proj"].topk(new_intermediate).indices.sort().values
            _slice_mlp(layer.mlp, kept)
            kept_channels.append(kept.tolist())
    return kept_kv_heads, kept_query_heads, kept_channels
