"""Width pruning lands on widths the formats and kernels can use: MLP channels kept at a multiple
of `prune.multiple_of` (default 32, what int4 groups and GGUF blocks need), and a too-small width
is an error naming the setting."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.compress.prune import prune_model
from distill.specs import PruneSpec


def student(intermediate_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def calibration():
    return [torch.randint(128, (4, 16), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("multiple_of, kept", [(1, 264), (32, 256), (64, 256), (8, 264)])
def test_kept_channels_are_a_multiple(multiple_of, kept):
    model = student(352)  # the quickstart student's MLP: a 25 % prune leaves 264 exactly
    spec = PruneSpec(method="width", heads_fraction=0, mlp_fraction=0.25, multiple_of=multiple_of)
    prune_model(model, spec, calibration())
    assert model.config.intermediate_size == kept
    assert all(layer.mlp.down_proj.in_features == kept for layer in model.model.layers)


def test_a_width_too_small_for_the_multiple_names_the_setting():
    spec = PruneSpec(method="width", heads_fraction=0, mlp_fraction=0.25, multiple_of=32)
    with pytest.raises(ValueError, match="multiple_of=32: the MLP has 32 channels"):
        prune_model(student(32), spec, calibration())
