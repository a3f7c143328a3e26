"""distill.compress (fake_quant, packed) on tiny random Llama models: rounding, straight-through, QAT swap, conversion,
the packed on-disk format and its size, and the errors for schemes that cannot work."""

import itertools
import json

import pytest
import torch
from safetensors import safe_open
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
from distill.compress.packed import (
    QuantizedLinear,
    convert_model,
    load_quantized,
    pack_codes,
    quantized_size_bytes,
    save_quantized,
    set_kernels_enabled,
    unpack_codes,
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


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_roundtrip(bits):
    scheme = QuantSpec(bits=bits)
    q = torch.randint(scheme.qmin, scheme.qmax + 1, (7, 13), dtype=torch.int8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (q.numel() * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, q.numel()).reshape(q.shape), q)


def test_int4_nibble_layout():
    q = torch.tensor([-8, 7, 0, -1], dtype=torch.int8)  # stored as q + 8: 0, 15, 8, 7
    assert pack_codes(q, 4).tolist() == [0 | 15 << 4, 8 | 7 << 4]


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


def test_errors_for_out_of_order_calls(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="prepare_qat"):
        set_fake_quant_enabled(model, True)
    with pytest.raises(ValueError, match="convert_model"):
        save_quantized(model, None, tmp_path, QuantSpec())
    prepare_qat(model, QuantSpec(bits=4))
    with pytest.raises(ValueError, match="prepared for QAT with int4-g32-sym"):
        convert_model(model, QuantSpec(bits=3))
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        load_quantized(tmp_path)


# --- conversion, export, reload ------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme_name,dtype,via_remove",
    [
        ("int4-g32-sym", torch.float32, True),
        ("int3-pc-asym", torch.float32, False),
        ("int4-g32-asym", torch.bfloat16, False),
        ("int8-pc-sym+a8", torch.float32, True),
    ],
)
def test_converted_equals_fake_quant_and_reloads(tmp_path, ids, scheme_name, dtype, via_remove):
    scheme = QuantSpec.parse(scheme_name)
    model = tiny_llama(dtype=dtype, tie=dtype == torch.bfloat16)
    names = prepare_qat(model, scheme)
    fake_logits = logits(model, ids)
    if via_remove:
        remove_fake_quant(model)
    assert convert_model(model, scheme) == names
    assert all(isinstance(model.get_submodule(name), QuantizedLinear) for name in names)
    set_kernels_enabled(model, False)
    # The converted weights are the fake-quantized ones, bit for bit; so are the logits.
    torch.testing.assert_close(logits(model, ids), fake_logits, rtol=0, atol=0)
    set_kernels_enabled(model, True)
    converted_logits = logits(model, ids)  # int4/int8 CPU kernels: same weights, other rounding
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(converted_logits, fake_logits, rtol=tolerance, atol=tolerance)

    save_quantized(model, None, tmp_path, scheme)
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert meta["scheme_name"] == scheme_name and meta["modules"] == sorted(names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "distill-intx-packed"

    reloaded = load_quantized(tmp_path)
    assert torch.equal(logits(reloaded, ids), converted_logits)
    if dtype == torch.bfloat16:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    # Importing distill.compress.packed registers the format: plain from_pretrained gives the same model.
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert all(isinstance(via_transformers.get_submodule(n), QuantizedLinear) for n in names)
    assert torch.equal(logits(via_transformers, ids), converted_logits)
    prompt = ids[:1, :4]
    generated = reloaded.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10) and torch.equal(generated, expected)


@pytest.mark.parametrize(
    "scheme_name,kernel",
    [("int4-g32-sym", "int4pack"), ("int4-g64-asym", "int4pack"), ("int8-pc-sym", "int8pack")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_match_reference_path(scheme_name, kernel, dtype):
    scheme = QuantSpec.parse(scheme_name)
    linear = nn.Linear(128, 48).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(random_weight(48, 128, dtype))
    module = QuantizedLinear.from_linear(linear, scheme)
    assert module.kernel == kernel
    x = torch.randn(2, 5, 128).to(dtype)
    fast = module(x)
    module.use_kernel = False
    reference = module(x)
    assert torch.equal(reference, FakeQuantLinear.from_linear(linear, scheme)(x))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        fast, reference, rtol=tolerance, atol=tolerance * reference.abs().max()
    )
    # No kernel where it cannot serve: 3 bits, int8 groups, +a8, out_features % 16 != 0.
    for other in ("int3-g32-sym", "int8-g32-sym", "int4-g32-sym+a8"):
        assert QuantizedLinear(128, 48, QuantSpec.parse(other)).kernel is None
    assert QuantizedLinear(128, 40, scheme).kernel is (None if kernel == "int4pack" else kernel)


def quantized_linear_bytes(path, names):
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        return sum(
            weights.get_tensor(key).nbytes
            for key in weights.keys()  # noqa: SIM118 (safe_open has no __iter__)
            if key.rpartition(".")[0] in names and not key.endswith(".bias")
        )


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_bytes_under_0_3x_bf16(tmp_path, symmetric):
    scheme = QuantSpec(bits=4, group_size=32, symmetric=symmetric)
    model = tiny_llama(dtype=torch.bfloat16, hidden=128)
    bf16_bytes = {
        name: module.weight.nbytes
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name != "lm_head"
    }
    bf16_dir = tmp_path / "bf16"
    model.save_pretrained(bf16_dir)
    names = convert_model(model, scheme)
    assert sorted(names) == sorted(bf16_bytes)
    save_quantized(model, None, tmp_path / "int4", scheme)

    int4_bytes = quantized_linear_bytes(tmp_path / "int4", set(names))
    ratio = int4_bytes / sum(bf16_bytes.values())
    # 0.5 byte per weight + a bf16 scale per 32 (+ an int8 zero point): 0.281 / 0.297
    assert ratio <= 0.3, ratio
    assert quantized_size_bytes(tmp_path / "int4") < 0.6 * quantized_size_bytes(bf16_dir)


def test_generate_latency_s(ids):
    model = tiny_llama()
    convert_model(model, QuantSpec())
    latency_s = generate_latency_s(model, ids[0, :4], new_tokens=4)
    assert isinstance(latency_s, float) and latency_s > 0
