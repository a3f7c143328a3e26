"""The target grids round bit for bit as each format's own quantizer: gguf.quants (llama.cpp's
reference Q4_0/Q8_0) and compressed-tensors' calculate_qparams + quantize, on random weights with
awkward blocks and on trained weights; and a scheme a format cannot hold is a clear error."""

import numpy as np
import pytest
import torch

from distill.compress.grids import check_widths, target_grid
from distill.errors import RecipeError

# The subnormal block overflows 1/d to inf in gguf's numpy code as in llama.cpp's C: both give
# codes that do not matter, since the fp16 scale is 0; numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def awkward_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Random rows of very different scales, plus the blocks where rounding rules show."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w *= torch.logspace(-4, 1, out_features)[:, None]
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = 0.37  # all equal, positive
    w[2, :32] = -0.37  # all equal, negative
    w[3, :32] = torch.linspace(-1, 1, 32)  # +1 and -1 tie for the largest magnitude
    w[4, 7] = 50.0  # an outlier
    w[5, :32] = torch.arange(32) * 0.125 - 2.0  # exact multiples: halfway cases after scaling
    w[6, :32] = 1e-39  # subnormal float32: fp16 scales underflow
    w[7, :] *= 1e3
    return w


SHAPES = [(16, 64), (64, 256), (8, 4096)]


def gguf_type(target):
    import gguf

    return {
        "gguf-q4_0": gguf.GGMLQuantizationType.Q4_0,
        "gguf-q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[target]


def assert_gguf_exact(w: torch.Tensor, target: str) -> None:
    import gguf

    grid = target_grid(target)
    qtype = gguf_type(target)
    packed = gguf.quants.quantize(w.to(torch.float32).numpy(), qtype)
    reference = torch.from_numpy(gguf.quants.dequantize(packed, qtype))
    codes, scale = grid.quantize(w)
    # The stored fp16 scale is the first 2 bytes of every block, bit for bit.
    block_bytes = packed.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    stored_scale = torch.from_numpy(block_bytes[:, :2].copy().view(np.float16)).reshape(scale.shape)
    assert torch.equal(scale.view(torch.int16), stored_scale.view(torch.int16))
    assert torch.equal(grid.dequantize(codes, scale), reference)
    assert torch.equal(grid.fake_quantize(w), reference.to(w.dtype))


@pytest.mark.parametrize("target", ["gguf-q4_0", "gguf-q8_0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gguf_grids_are_gguf_quants_bit_for_bit(target, shape):
    assert_gguf_exact(awkward_weight(*shape), target)


@pytest.mark.parametrize("target", ["gguf-q4_0", "gguf-q8_0"])
def test_gguf_grids_on_bf16_weights(target):
    """bf16 weights are rounded from their exact float32 value, as the exporter rounds them."""
    w = awkward_weight(32, 128, seed=3).to(torch.bfloat16)
    grid = target_grid(target)
    assert_gguf_exact(w.to(torch.float32), target)
    assert grid.fake_quantize(w).dtype == torch.bfloat16


def test_q4_0_codes_use_the_signed_extreme():
    """The block's largest magnitude lands on code -8 with its sign; the other end is one step
    short of it (the asymmetry that differs from a max|w|/7.5 grid)."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 0.8, -0.4
    codes, scale = target_grid("gguf-q4_0").quantize(w)
    assert codes[0, 0] == -8 and scale[0, 0] == torch.tensor(-0.1, dtype=torch.float16)
    assert codes[0, 1] == 4


def ct_reference(w: torch.Tensor, bits: int, group_size: int | None, scale_dtype: torch.dtype):
    """compressed-tensors' own scale, codes and fake-quantized weight for ``w``."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(
        num_bits=bits,
        symmetric=True,
        strategy="group" if group_size else "channel",
        group_size=group_size,
        scale_dtype=scale_dtype,
    )
    groups = w.reshape(w.shape[0], -1, group_size or w.shape[1])
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    codes = quantize(w, scale, zero_point, args, dtype=torch.int8)
    return scale, codes, fake_quantize(w, scale, zero_point, args)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float16"])
def test_compressed_tensors_grid_is_its_quantizer_bit_for_bit(bits, group_size, scale_dtype):
    grid = target_grid("compressed-tensors", bits, group_size, scale_dtype=scale_dtype)
    for shape in [s for s in SHAPES if s[1] % (group_size or 1) == 0]:
        w = awkward_weight(*shape, seed=bits)
        ref_scale, ref_codes, ref_fake = ct_reference(
            w, bits, group_size, getattr(torch, scale_dtype)
        )
        codes, scale = grid.quantize(w)
        assert scale.dtype == getattr(torch, scale_dtype)
        assert torch.equal(scale.to(torch.float32), ref_scale.reshape(scale.shape))
        assert torch.equal(codes, ref_codes)
        assert torch.equal(grid.fake_quantize(w), ref_fake)


def test_grids_on_trained_weights(trained_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained_llama_dir, dtype=torch.float32)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(weights) == 15
    for w in weights:
        assert_gguf_exact(w, "gguf-q4_0")
        assert_gguf_exact(w, "gguf-q8_0")
        for group_size in (32, None):
            _, ref_codes, ref_fake = ct_reference(w, 4, group_size, torch.bfloat16)
            grid = target_grid("compressed-tensors", 4, group_size)
            assert torch.equal(grid.quantize(w)[0], ref_codes)
            assert torch.equal(grid.fake_quantize(w), ref_fake)


@pytest.mark.parametrize("target", ["gguf-q4_0", "gguf-q8_0", "compressed-tensors"])
def test_straight_through_gradient(target):
    w = awkward_weight(16, 64).requires_grad_(True)
    grad = torch.randn(16, 64)
    target_grid(target).fake_quantize(w).backward(grad)
    assert torch.equal(w.grad, grad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "gguf-q4_0", "bits": 3}, "use gguf-q4_0 (4 bits)"),
        ({"target": "gguf-q8_0", "bits": 4}, "use gguf-q4_0"),
        ({"target": "gguf-q4_0", "symmetric": False}, "use symmetric"),
        ({"target": "gguf-q4_0", "group_size": 64}, "use group_size 32"),
        ({"target": "gguf-q8_0", "group_size": None}, "per-channel scales cannot be represented"),
        ({"target": "compressed-tensors", "bits": 3}, "use bits=4"),
        ({"target": "compressed-tensors", "bits": 2}, "use bits=4"),
        ({"target": "compressed-tensors", "symmetric": False}, "symmetric only"),
        ({"target": "compressed-tensors", "group_size": 256}, "nearest: 128"),
        ({"target": "compressed-tensors", "group_size": 16}, "nearest: 32"),
        ({"target": "compressed-tensors", "scale_dtype": "float32"}, "use bfloat16 or float16"),
        ({"target": "gguf-q5_k"}, "supported are gguf-q4_0, gguf-q8_0, compressed-tensors"),
    ],
)
def test_schemes_a_format_cannot_hold_name_the_nearest_choice(kwargs, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        target_grid(**kwargs)


def test_widths_not_a_multiple_of_the_group_name_the_fix():
    grid = target_grid("gguf-q4_0")
    check_widths(grid, {"layers.0.mlp.down_proj": 256})
    with pytest.raises(
        RecipeError, match=r"264 of layers.0.mlp.down_proj and 1 more.*multiple_of: 32"
    ):
        check_widths(grid, {"layers.0.mlp.down_proj": 264, "layers.1.mlp.down_proj": 264})
    with pytest.raises(RecipeError, match="or use group_size 32"):
        check_widths(target_grid("compressed-tensors", 4, 128), {"down_proj": 96})
