"""The decoder layers and linears that pruning works on (the Llama layout: Llama, Mistral, Qwen2,
Qwen3), and the activation statistics of their inputs on calibration batches."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from distill.errors import RecipeError

_ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


_MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def prunable_linears(
    model: nn.Module, exclude: Sequence[str] = ("lm_head",)
) -> dict[str, nn.Linear]:
    """Module name -> nn.Linear for every linear inside the decoder layers not matched by exclude."""
    in_layers = {id(module) for module in decoder_layers(model).modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and id(module) in in_layers
        and not any(pattern in name for pattern in exclude)
    }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
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


def own_config(model: nn.Module):
    """Give the model a private copy of its config before structural edits.

    A config object passed to several models is shared by all of them and by each module's `config`
    attribute; editing it in place would silently change the others.
    """
    shared, private = model.config, copy.deepcopy(model.config)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = private
    return private


def linear_weight(model: nn.Module, param_name: str) -> torch.Tensor:
    return model.get_submodule(param_name.removesuffix(".weight")).weight


def check_calibration(calibration: list[torch.Tensor] | None, needed_by: str) -> None:
    if not calibration:
        raise RecipeError(
            f"{needed_by} needs calibration data: pass calibration=[LongTensor [batch, seq] of "
            "token ids, ...]"
        )
    for i, batch in enumerate(calibration):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point():
            raise ValueError(
                f"calibration[{i}] must be an integer tensor [batch, seq] of token ids, got "
                f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}"
            )


def run_calibration(model: nn.Module, calibration: list[torch.Tensor]) -> None:
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


def input_sq_sums(
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
        run_calibration(model, calibration)
    finally:
        for handle in handles:
            handle.remove()
    return sums
