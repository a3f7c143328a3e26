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


def wide_student(kv_heads: int, group: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=240,  # divisible by every head count below (transformers checks it)
        head_dim=16,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=kv_heads * group,
        num_key_value_heads=kv_heads,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "unit, kv, group, multiple, kept_kv, kept_heads",
    [
        ("kv_group", 8, 1, 1, 6, 6),  # 25 % of 8 KV groups: 6 left
        ("kv_group", 8, 1, 4, 4, 4),  # on 4 GPUs: 4 (the nearest multiple that removes any)
        ("kv_group", 12, 1, 4, 8, 8),  # 9 left rounds to 8
        ("query_head", 2, 8, 2, 2, 12),  # 6 queries per group round to 6: 2 x 6
        ("query_head", 2, 8, 4, 2, 8),  # 6 rounds to 4 (8 would remove none)
    ],
)
def test_kept_heads_are_a_multiple(unit, kv, group, multiple, kept_kv, kept_heads):
    model = wide_student(kv, group)
    spec = PruneSpec(
        method="width",
        heads_fraction=0.25,
        head_unit=unit,
        mlp_fraction=0,
        heads_multiple_of=multiple,
    )
    prune_model(model, spec, calibration())
    assert model.config.num_key_value_heads == kept_kv
    assert model.config.num_attention_heads == kept_heads
    attention = model.model.layers[0].self_attn
    assert attention.o_proj.in_features == kept_heads * 16
    assert model(calibration()[0]).logits.isfinite().all()


def test_too_few_heads_for_the_multiple_names_the_setting():
    spec = PruneSpec(method="width", heads_fraction=0.25, mlp_fraction=0, heads_multiple_of=4)
    with pytest.raises(ValueError, match="heads_multiple_of=4: the model has 4 KV groups"):
        prune_model(wide_student(4, 1), spec, calibration())
