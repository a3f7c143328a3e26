"""distill.compress.fake_quant on tiny random Llama models: rounding, straight-through, the QAT
swap, target grids, and the errors for schemes that cannot work."""

import copy
import itertools

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from distill.compress.fake_quant import (
    FakeQuantLinear,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    prepare_qat,
    quantize_weight,
    remove_fake_quant,
    set_fake_quant_enabled,
    torchao_config,
)
from distill.runtime.evaluate import generate_latency_s
from distill.specs import QuantSpec


def tiny_llama(seed=0, tie=False, dtype=torch.float32, hidden=64):
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def random_weight(out_features=8, in_features=64, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Rows with very different magnitudes, as in trained models.
    row_scale = torch.randn(out_features, 1, generator=generator).exp()
    return (torch.randn(out_features, in_features, generator=generator) * row_scale).to(dtype)


# --- rounding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size,symmetric", list(itertools.product((2, 3, 4, 8), (None, 32), (True, False)))
)
def test_fake_quant_is_dequantized_codes_on_the_grid(bits, group_size, symmetric):
    scheme = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    w = random_weight()
    q, scale, zero_point = quantize_weight(w, scheme)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    assert torch.equal(
        fake_quantize_weight(w, scheme), dequantize_weight(q, scale, zero_point, scheme, w.shape)
    )
    if symmetric:
        assert not zero_point.any()
    group = group_size or w.shape[1]
    fq_groups = fake_quantize_weight(w, scheme).reshape(w.shape[0], -1, group)
    q_groups = q.reshape(w.shape[0], -1, group)
    for row, col in itertools.product(range(w.shape[0]), range(fq_groups.shape[1])):
        assert fq_groups[row, col].unique().numel() <= 2**bits
        assert q_groups[row, col].unique().numel() <= 2**bits
    # The grid is fine enough: error at most half a step (plus the clamped top half step).
    step = scale.float().repeat_interleave(group, dim=1)
    assert ((fake_quantize_weight(w, scheme) - w).abs() <= step * 1.01).all()


@pytest.mark.parametrize(
    "scheme_name,dtype",
    [
        ("int4-g32-sym", torch.float32),
        ("int4-g32-asym", torch.bfloat16),
        ("int3-pc-asym", torch.float32),
        ("int8-pc-sym", torch.bfloat16),
        ("int2-g32-sym", torch.float32),
        ("int4-g32-sym+a8", torch.float32),
    ],
)
def test_rounding_is_torchao_bit_for_bit(scheme_name, dtype):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_

    scheme = QuantSpec.parse(scheme_name)
    linear = nn.Linear(64, 16).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(random_weight(16, 64, dtype))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(dtype) * 3
    expected_output = FakeQuantLinear.from_linear(linear, scheme)(x)
    float_weight = linear.weight.detach().clone()
    q, scale, zero_point = quantize_weight(float_weight, scheme)

    quantize_(linear, torchao_config(scheme))
    torchao_weight = linear.weight
    assert torch.equal(torchao_weight.qdata, q)
    assert torch.equal(torchao_weight.scale.reshape(scale.shape), scale)
    if not scheme.symmetric:
        assert torch.equal(torchao_weight.zero_point.reshape(zero_point.shape), zero_point)
    assert torch.equal(torchao_weight.dequantize(), fake_quantize_weight(float_weight, scheme))
    assert torch.equal(linear(x), expected_output)


@pytest.mark.parametrize("scheme_name", ["int4-g32-sym", "int3-g32-sym", "int8-pc-sym"])
def test_torchao_qat_fake_quant_agrees_for_symmetric_schemes(scheme_name):
    pytest.importorskip("torchao")
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    scheme = QuantSpec.parse(scheme_name)
    config = IntxFakeQuantizeConfig(
        getattr(torch, f"int{scheme.bits}"),
        PerGroup(scheme.group_size) if scheme.group_size else PerAxis(0),
        is_symmetric=True,
        scale_precision=torch.bfloat16,
    )
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight.copy_(random_weight(16, 64))
    weight = model[0].weight.detach().clone()
    quantize_(model, QATConfig(weight_config=config, step="prepare"))
    torchao_fake = model[0].weight_fake_quantizer(model[0].weight)
    assert torch.equal(torchao_fake, fake_quantize_weight(weight, scheme))


def test_straight_through_gradient_is_identity_including_the_clamped_top():
    scheme = QuantSpec(bits=4, group_size=32)
    w = random_weight(4, 64)
    with torch.no_grad():
        w[0, 5] = w[0, :32].abs().max() * 1.5  # the group's absmax, positive: clamped to code 7
    q, scale, _ = quantize_weight(w, scheme)
    unclamped = torch.round(w[0, 5] * (1.0 / scale[0, 0]))
    assert unclamped > scheme.qmax and q[0, 5] == scheme.qmax  # clipping did happen

    w.requires_grad_(True)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (fake_quantize_weight(w, scheme) * g).sum().backward()
    assert torch.equal(w.grad, g)

    x = torch.randn(3, 5, 64, requires_grad=True)
    gx = torch.randn(x.shape)
    (fake_quantize_activation(x) * gx).sum().backward()
    assert torch.equal(x.grad, gx)


def test_activation_fake_quant_is_per_token_int8():
    x = torch.randn(2, 3, 64) * torch.arange(1, 7).reshape(2, 3, 1)
    xq = fake_quantize_activation(x)
    assert xq.shape == x.shape and not torch.equal(xq, x)
    for token in xq.reshape(-1, 64):
        assert token.unique().numel() <= 256
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    assert ((xq - x).abs() <= step * 0.51).all()


# --- the scheme ----------------------------------------------------------------------------------


def test_scheme_names_and_parse():
    assert QuantSpec().name() == "int4-g32-sym"
    assert QuantSpec(bits=8, group_size=None).name() == "int8-pc-sym"
    assert QuantSpec(activations="int8_dynamic").name() == "int4-g32-sym+a8"
    for scheme in (
        QuantSpec(bits=3, group_size=64, symmetric=False),
        QuantSpec(bits=8, group_size=None, activations="int8_dynamic"),
    ):
        assert QuantSpec.parse(scheme.name()) == scheme
    assert QuantSpec(exclude=["lm_head", "*.down_proj"]).exclude == ("lm_head", "*.down_proj")
    assert QuantSpec.model_validate(QuantSpec(exclude=("x",)).model_dump(mode="json")) == QuantSpec(
        exclude=("x",)
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 1}, "from 2 to 8"),
        ({"bits": 9}, "from 2 to 8"),
        ({"group_size": 0}, "divides in_features"),
        ({"activations": "int4_dynamic"}, "int8_dynamic"),
        ({"scale_dtype": "int8"}, "bfloat16"),
    ],
)
def test_bad_scheme_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_bad_scheme_text_and_group_size_not_dividing():
    with pytest.raises(ValueError, match="int4-g32-sym"):
        QuantSpec.parse("int4-group32")
    model = tiny_llama(hidden=64)  # in_features 64 (attention, up/gate) and 128 (down_proj)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(
        ValueError, match=r"group_size 256 does not divide in_features 64 \(.*q_proj"
    ):
        prepare_qat(model, QuantSpec(group_size=256))
    message = (
        r"in_features 64 \(model.layers.0.self_attn.q_proj and 11 more\); .* \(8, 16, 32, 64\)"
    )
    with pytest.raises(ValueError, match=message):
        prepare_qat(model, QuantSpec(group_size=128))
    assert {name: type(m) for name, m in model.named_modules()} == before  # nothing swapped
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 64), QuantSpec(group_size=128))


# --- QAT preparation -----------------------------------------------------------------------------


def test_prepare_qat_keeps_parameters_and_excludes_lm_head_and_embeddings(ids):
    model = tiny_llama()
    keys = list(model.state_dict())
    parameters = dict(model.named_parameters())
    reference = logits(model, ids)

    names = prepare_qat(model, QuantSpec())
    assert len(names) == 2 * 7 and all("layers." in name for name in names)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert list(model.state_dict()) == keys
    assert all(p is parameters[n] for n, p in model.named_parameters())  # optimizer still valid
    assert isinstance(model.model.layers[0].self_attn.q_proj, FakeQuantLinear)

    quantized = logits(model, ids)
    assert not torch.equal(quantized, reference)
    set_fake_quant_enabled(model, False)
    assert torch.equal(logits(model, ids), reference)  # exactly the float forward
    set_fake_quant_enabled(model, True)
    assert torch.equal(logits(model, ids), quantized)

    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(model.get_submodule(name).weight.grad is not None for name in names)

    assert remove_fake_quant(model) == names
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert torch.equal(logits(model.eval(), ids), reference)


def test_exclude_patterns_and_tied_lm_head():
    model = tiny_llama(tie=True)
    names = prepare_qat(model, QuantSpec(exclude=("*.mlp.down_proj", "layers.0.self_attn")))
    assert not any(name.endswith("down_proj") or "layers.0.self_attn" in name for name in names)
    assert len(names) == 2 * 7 - 2 - 4
    remove_fake_quant(model)
    # With nothing excluded a tied lm_head is still left alone: it is the embedding.
    names = prepare_qat(model, QuantSpec(exclude=()))
    assert "lm_head" not in names and type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="already prepared"):
        prepare_qat(model, QuantSpec())


def test_errors_for_out_of_order_calls():
    model = tiny_llama()
    with pytest.raises(ValueError, match="prepare_qat"):
        set_fake_quant_enabled(model, True)


# --- target grids ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["gguf-q4_0", "gguf-q8_0", "compressed-tensors"])
def test_a_target_scheme_fake_quantizes_on_the_target_grid(ids, target):
    """prepare_qat with a target rounds as distill.compress.grids (checked there bit for bit
    against the format's own quantizer), not with torchao's formula."""
    from distill.compress.grids import target_grid

    scheme = QuantSpec(bits=8 if target == "gguf-q8_0" else 4, target=target)
    grid = target_grid(target, scheme.bits)
    assert scheme.name() == grid.name()
    model = tiny_llama()
    reference = copy.deepcopy(model)
    prepare_qat(model, scheme)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if type(module) is nn.Linear and name != "lm_head":
                module.weight.copy_(grid.fake_quantize(module.weight))
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_generate_latency_s(ids):
    model = tiny_llama()
    latency_s = generate_latency_s(model, ids[0, :4], new_tokens=4)
    assert isinstance(latency_s, float) and latency_s > 0
