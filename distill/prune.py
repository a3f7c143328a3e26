"""Pruning of a Hugging Face causal LM, in place.

Five methods, all on the Llama layout (`model.model.layers[i].self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`; Llama, Mistral, Qwen2, Qwen3):

- `magnitude`: zero the smallest |W|, per weight matrix or globally across all prunable linears;
- `wanda`: zero the lowest |W_ij| * ||X_j||_2 within each output row (Sun et al. 2023), with X the
  linear's input collected over calibration batches;
- `nm`: N:M semi-structured sparsity (2:4 by default), scored by magnitude or Wanda;
- `width`: remove attention heads, as whole key-value groups (a KV head with all its query heads)
  or as query heads within every group (grouped-query attention), and MLP channels, ranked by the
  activation norm of their outputs (Minitron), the same count in every layer;
- `depth`: remove whole decoder layers, ranked by how little they change the hidden states, or
  given explicitly.

Unstructured and N:M pruning return keep-masks; the training loop calls `apply_masks` after every
optimizer step so recovery training keeps the zeros. Structured pruning makes the modules smaller and
updates the config, so the result saves and reloads with `AutoModelForCausalLM.from_pretrained`.

Calibration data is a list of LongTensor batches [batch, seq] of token ids. Activation statistics
come from one pass of the dense model (not layer by layer on the partly pruned model).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRUNE_METHODS = ("magnitude", "wanda", "nm", "width", "depth")
RECORD_FILE = "distill_prune.json"
"""Written next to a pruned model's weights: `PruneResult.record()` (what was removed, from what)."""
CALIBRATION_BATCH_SIZE = 8
"""Sequences per calibration batch, in recipes and in `distill prune`."""
_SCORINGS = ("wanda", "magnitude")
_SCOPES = ("layer", "global")
_HEAD_UNITS = ("kv_group", "query_head")
_ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
# Config fields holding one entry per decoder layer; depth pruning keeps the entries of kept layers.
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


@dataclass
class PruneResult:
    """What one pruning call did. Parameter counts include embeddings; tied weights count once."""

    method: str
    sparsity: float
    """Unstructured / N:M: fraction of exactly-zero weights over the pruned linears, measured after
    pruning. Width / depth: fraction of the model's parameters removed (1 - after / before)."""
    params_before: int
    params_after: int
    """Parameters left: structured, the real count of the smaller model; unstructured / N:M,
    params_before minus the weights the masks zero."""
    masks: dict[str, torch.Tensor] | None
    """Parameter name -> bool keep-mask (unstructured, N:M); None for width and depth."""
    details: dict
    """Method specifics: per-layer sparsity, kept heads/channels per layer, removed layers, scores."""

    def record(self, source: str) -> dict:
        """JSON-ready summary (masks left out), as saved in RECORD_FILE; `source` names the input."""
        details = json.loads(
            json.dumps(
                self.details, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)
            )
        )
        return {
            "source": source,
            "method": self.method,
            "sparsity": self.sparsity,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "details": details,
        }


def prune_model(
    model: nn.Module,
    method: str,
    *,
    sparsity: float = 0.5,
    n: int = 2,
    m: int = 4,
    scoring: str = "wanda",
    scope: str = "layer",
    calibration: list[torch.Tensor] | None = None,
    width_heads_fraction: float = 0.25,
    width_mlp_fraction: float = 0.25,
    width_head_unit: str = "kv_group",
    depth_layers: int | list[int] | None = None,
    exclude: Sequence[str] = ("lm_head",),
) -> PruneResult:
    """Prune `model` in place with `method` (one of PRUNE_METHODS) and say what was done.

    `sparsity` and `scope` apply to magnitude/wanda (scope "global" to magnitude only); `n`, `m`,
    `scoring` to nm; `width_*_fraction` (share of heads / MLP channels removed) and
    `width_head_unit` (remove whole "kv_group"s, or "query_head"s within every group) to width;
    `depth_layers` (a count to remove by rank, or explicit indices) to depth. `exclude` skips
    linears whose name contains any of its strings (unstructured and N:M only). Wanda scoring,
    width and ranked depth need `calibration`.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(PRUNE_METHODS)}")
    layers = _decoder_layers(model)
    params_before = count_parameters(model)
    if method in ("magnitude", "wanda", "nm"):
        masks, details = _prune_sparse(
            model, method, sparsity, n, m, scoring, scope, calibration, exclude
        )
        pruned = {name: _linear_weight(model, name) for name in masks}
        zeros = sum(int((w == 0).sum()) for w in pruned.values())
        total = sum(w.numel() for w in pruned.values())
        removed = sum(int((~keep).sum()) for keep in masks.values())
        return PruneResult(
            method, zeros / total, params_before, params_before - removed, masks, details
        )
    if method == "width":
        details = _prune_width(
            model, layers, width_heads_fraction, width_mlp_fraction, width_head_unit, calibration
        )
    else:
        details = _prune_depth(model, layers, depth_layers, calibration)
    params_after = count_parameters(model)
    return PruneResult(
        method, 1 - params_after / params_before, params_before, params_after, None, details
    )


def masks_from_zeros(
    model: nn.Module, exclude: Sequence[str] = ("lm_head",)
) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of all prunable linears, e.g. of a sparse model loaded from disk."""
    return {
        f"{name}.weight": linear.weight.detach() != 0
        for name, linear in prunable_linears(model, exclude).items()
    }


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero the pruned weights in place; call after every optimizer step.

    Mask names may carry a wrapper prefix the model lacks (``module.`` from DDP, ``_orig_mod.``
    from torch.compile) or lack one the model has; keep masks on the parameters' device.
    """
    if not masks:
        return
    params = dict(model.named_parameters())
    to_param_name = _name_mapping(next(iter(masks)), params)
    with torch.no_grad():
        for name, keep in masks.items():
            param = params.get(to_param_name(name))
            if param is None:
                raise KeyError(f"mask {name!r} matches no parameter of the model")
            if param.shape != keep.shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(keep.shape)}, parameter has {tuple(param.shape)}"
                )
            param.masked_fill_(~keep.to(param.device), 0)


def _name_mapping(mask_name: str, params: dict[str, nn.Parameter]) -> Callable[[str], str]:
    """Map mask names to parameter names, adding or stripping the wrapper prefix seen on one name."""
    if mask_name in params:
        return lambda name: name
    for param_name in params:
        if param_name.endswith("." + mask_name):
            prefix = param_name[: -len(mask_name)]
            return lambda name: prefix + name
        if mask_name.endswith("." + param_name):
            cut = len(mask_name) - len(param_name)
            return lambda name: name[cut:]
    raise KeyError(
        f"mask {mask_name!r} matches no parameter of the model, with or without a prefix"
    )


def sparsity_of(model: nn.Module, exclude: Sequence[str] = ("lm_head",)) -> float:
    """Fraction of exactly-zero weights over all prunable linears."""
    weights = [linear.weight for linear in prunable_linears(model, exclude).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def count_parameters(model: nn.Module) -> int:
    """All parameters, embeddings included; tied weights count once."""
    return sum(p.numel() for p in model.parameters())


def prunable_linears(
    model: nn.Module, exclude: Sequence[str] = ("lm_head",)
) -> dict[str, nn.Linear]:
    """Module name -> nn.Linear for every linear inside the decoder layers not matched by exclude."""
    in_layers = {id(module) for module in _decoder_layers(model).modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and id(module) in in_layers
        and not any(pattern in name for pattern in exclude)
    }


# ---------------------------------------------------------------------------------------------
# layout and calibration


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, after checking every one has the Llama layout."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(map(_is_llama_layer, layers)):
        return layers
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"pruning does not support model_type {model_type!r} ({type(model).__name__}): it needs "
        "the Llama layout, model.model.layers[i].self_attn.{q,k,v,o}_proj and "
        "mlp.{gate,up,down}_proj as nn.Linear (Llama, Mistral, Qwen2, Qwen3 have it)"
    )


def _is_llama_layer(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return all(isinstance(getattr(attn, p, None), nn.Linear) for p in _ATTN_PROJS) and all(
        isinstance(getattr(mlp, p, None), nn.Linear) for p in _MLP_PROJS
    )


def _own_config(model: nn.Module):
    """Give the model a private copy of its config before structural edits.

    A config object passed to several models is shared by all of them and by each module's `config`
    attribute; editing it in place would silently change the others.
    """
    shared, private = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = private
    return private


def _linear_weight(model: nn.Module, param_name: str) -> torch.Tensor:
    return model.get_submodule(param_name.removesuffix(".weight")).weight


def _check_calibration(calibration: list[torch.Tensor] | None, needed_by: str) -> None:
    if not calibration:
        raise ValueError(
            f"{needed_by} needs calibration data: pass calibration=[LongTensor [batch, seq] of "
            "token ids, ...]"
        )
    for i, batch in enumerate(calibration):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point():
            raise ValueError(
                f"calibration[{i}] must be an integer tensor [batch, seq] of token ids, got "
                f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}"
            )


def _run_calibration(model: nn.Module, calibration: list[torch.Tensor]) -> None:
    """Run the decoder (no lm_head) over the batches in eval mode; restore every module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for batch in calibration:
                model.model(input_ids=batch.to(device), use_cache=False)
    finally:
        for module, training in modes:
            module.training = training


def _input_sq_sums(
    model: nn.Module, linears: dict[str, nn.Linear], calibration: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per input column of each linear, the sum over calibration tokens of its squared input."""
    sums = {
        name: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device)
        for name, lin in linears.items()
    }

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            sums[name] += x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)

        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in linears.items()]
    try:
        _run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
    return sums


# ---------------------------------------------------------------------------------------------
# unstructured and N:M


def _prune_sparse(
    model: nn.Module,
    method: str,
    sparsity: float,
    n: int,
    m: int,
    scoring: str,
    scope: str,
    calibration: list[torch.Tensor] | None,
    exclude: Sequence[str],
) -> tuple[dict[str, torch.Tensor], dict]:
    linears = prunable_linears(model, exclude)
    if not linears:
        raise ValueError(f"exclude={list(exclude)} leaves no linear layer to prune")
    if scope not in _SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(_SCOPES)}")
    if scope == "global" and method != "magnitude":
        raise ValueError(
            f"scope='global' applies to method 'magnitude' only; {method} compares weights "
            "within each row or group, use scope='layer'"
        )
    if method == "nm":
        if scoring not in _SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; allowed: {', '.join(_SCORINGS)}")
        _check_nm(n, m, linears)
        use_wanda = scoring == "wanda"
    else:
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        use_wanda = method == "wanda"
    sq_sums = None
    if use_wanda:
        _check_calibration(calibration, f"{method} with Wanda scoring")
        sq_sums = _input_sq_sums(model, linears, calibration)

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


def _check_nm(n: int, m: int, linears: dict[str, nn.Linear]) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
    for name, linear in linears.items():
        if linear.in_features % m:
            raise ValueError(
                f"N:M sparsity needs m to divide every in_features; {name} has "
                f"in_features={linear.in_features}, m={m}"
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


# ---------------------------------------------------------------------------------------------
# structured width


def _count_removed(fraction: float, available: int, argument: str, what: str) -> int:
    """How many of `available` units a fraction removes: rounded, at least one when above 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"{argument} must be in [0, 1), got {fraction}")
    removed = max(round(fraction * available), 1) if fraction > 0 else 0
    if removed >= available:
        raise ValueError(
            f"{argument}={fraction} removes {removed} of {available} {what}, leaving none; "
            "use a smaller fraction"
        )
    return removed


def _prune_width(
    model: nn.Module,
    layers: nn.ModuleList,
    heads_fraction: float,
    mlp_fraction: float,
    head_unit: str,
    calibration: list[torch.Tensor] | None,
) -> dict:
    config = model.config
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    group = num_heads // num_kv
    head_dim = layers[0].self_attn.head_dim
    intermediate = layers[0].mlp.down_proj.in_features
    if head_unit not in _HEAD_UNITS:
        raise ValueError(
            f"unknown width_head_unit {head_unit!r}; allowed: {', '.join(_HEAD_UNITS)}"
        )
    if head_unit == "query_head" and group == 1 and heads_fraction > 0:
        raise ValueError(
            "width_head_unit='query_head' removes query heads within key-value groups, but this "
            f"model has one query head per key-value head ({num_heads} of each); use 'kv_group'"
        )

    def head_counts(removed: int) -> dict:  # config sizes after removing `removed` units
        kv, per_group = (
            (num_kv - removed, group) if head_unit == "kv_group" else (num_kv, group - removed)
        )
        return {"num_attention_heads": kv * per_group, "num_key_value_heads": kv}

    available = num_kv if head_unit == "kv_group" else group
    heads_removed = _count_removed(
        heads_fraction,
        available,
        "width_heads_fraction",
        "key-value head groups" if head_unit == "kv_group" else "query heads of each group",
    )
    channels_removed = _count_removed(
        mlp_fraction, intermediate, "width_mlp_fraction", "MLP channels"
    )
    if heads_removed == 0 and channels_removed == 0:
        raise ValueError("width pruning with both fractions 0 removes nothing")
    new_intermediate = intermediate - channels_removed
    # head_dim is written explicitly: configs without it derive hidden_size // num_attention_heads.
    updates = {
        **head_counts(heads_removed),
        "head_dim": head_dim,
        "intermediate_size": new_intermediate,
    }
    _check_config_accepts(config, updates, head_counts, available, head_unit)
    _check_calibration(calibration, "width pruning")

    stats = {}
    for i, layer in enumerate(layers):
        stats[f"{i}.o_proj"] = layer.self_attn.o_proj
        stats[f"{i}.down_proj"] = layer.mlp.down_proj
    sq_sums = _input_sq_sums(model, stats, calibration)

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
    config = _own_config(model)
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
    raise ValueError(
        f"{type(config).__name__} rejects the pruned sizes {updates}: {err}. "
        f"width_heads_fraction values it accepts: {', '.join(allowed) or 'none besides 0'}"
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


# ---------------------------------------------------------------------------------------------
# structured depth


def _prune_depth(
    model: nn.Module,
    layers: nn.ModuleList,
    depth_layers: int | list[int] | None,
    calibration: list[torch.Tensor] | None,
) -> dict:
    num_layers = len(layers)
    details: dict = {}
    if isinstance(depth_layers, int) and not isinstance(depth_layers, bool):
        if not 1 <= depth_layers < num_layers:
            raise ValueError(
                f"depth_layers={depth_layers} must remove at least 1 and fewer than all "
                f"{num_layers} layers"
            )
        _check_calibration(calibration, "depth pruning by rank (depth_layers as a count)")
        similarity = _block_similarities(model, layers, calibration)
        removed = sorted(similarity.topk(depth_layers).indices.tolist())
        details["input_output_cosine"] = similarity.tolist()
    elif isinstance(depth_layers, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in depth_layers):
            raise ValueError(f"depth_layers must hold integer layer indices, got {depth_layers!r}")
        removed = sorted(depth_layers)
        out_of_range = [i for i in removed if not 0 <= i < num_layers]
        if out_of_range:
            raise ValueError(
                f"depth_layers {out_of_range} out of range: the model has layers "
                f"0..{num_layers - 1}"
            )
        if len(set(removed)) != len(removed):
            raise ValueError(f"depth_layers {list(depth_layers)} repeats an index")
        if not 1 <= len(removed) < num_layers:
            raise ValueError(
                f"depth_layers must remove at least 1 and fewer than all {num_layers} layers, "
                f"got {list(depth_layers)}"
            )
    else:
        raise ValueError(
            "depth pruning needs depth_layers: a count of layers to remove (ranked on "
            f"calibration data) or a list of layer indices, got {depth_layers!r}"
        )

    kept = [i for i in range(num_layers) if i not in removed]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    # The KV cache is indexed by layer_idx, so the remaining layers are renumbered 0..len-1.
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    config = _own_config(model)
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
        _run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
    return sums / counts
