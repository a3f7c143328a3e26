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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distill.compress.layers import _decoder_layers, _linear_weight, prunable_linears
from distill.compress.prune_sparse import _prune_sparse
from distill.compress.prune_structured import _prune_depth, _prune_width

PRUNE_METHODS = ("magnitude", "wanda", "nm", "width", "depth")
RECORD_FILE = "distill_prune.json"
"""Written next to a pruned model's weights: `PruneResult.record()` (what was removed, from what)."""
CALIBRATION_BATCH_SIZE = 8
"""Sequences per calibration batch, in recipes and in `distill prune`."""
# Config fields holding one entry per decoder layer; depth pruning keeps the entries of kept layers.


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
    width_multiple_of: int = 1,
    depth_layers: int | list[int] | None = None,
    exclude: Sequence[str] = ("lm_head",),
) -> PruneResult:
    """Prune `model` in place with `method` (one of PRUNE_METHODS) and say what was done.

    `sparsity` and `scope` apply to magnitude/wanda (scope "global" to magnitude only); `n`, `m`,
    `scoring` to nm; `width_*_fraction` (share of heads / MLP channels removed) and
    `width_head_unit` (remove whole "kv_group"s, or "query_head"s within every group) and
    `width_multiple_of` (MLP channels kept rounded to a multiple of it) to width;
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
            model,
            layers,
            width_heads_fraction,
            width_mlp_fraction,
            width_head_unit,
            calibration,
            width_multiple_of,
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


# ---------------------------------------------------------------------------------------------
# layout and calibration


# ---------------------------------------------------------------------------------------------
# unstructured and N:M


# ---------------------------------------------------------------------------------------------
# structured width


# ---------------------------------------------------------------------------------------------
# structured depth
