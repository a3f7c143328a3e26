"""compressed-tensors exports: transformers loads them in a process that never imports distill and
generates; they compute what the model fake-quantized on the same grid computes (the codes are the
grid's codes, nothing rounded twice); int4 linears take at most 0.3x their bf16 bytes."""

import json
import subprocess
import sys

import pytest
import torch

from distill.compress.ct_export import quantized_linears
from distill.compress.export import export_model, plan_export

from conftest import SHIP_TEXT, tiny_causal_lm

LOAD_AND_RUN = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
path, ids_path, dtype = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=0)
torch.save({"logits": logits, "generated": generated}, ids_path + ".out")
print(json.dumps({"distill_imported": any(m.split(".")[0] == "distill" for m in sys.modules)}))
"""


def run_without_distill(path, ids, dtype, tmp_path):
    """Load and run an export in a fresh process started outside the repository."""
    ids_path = tmp_path / "ids.pt"
    torch.save(ids, ids_path)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, str(path), str(ids_path), dtype],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info, torch.load(str(ids_path) + ".out")


def fake_quantized(model, grid):
    """A copy of ``model`` whose exported linears hold their fake-quantized weights."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in quantized_linears(model).values():
            module.weight.copy_(grid.fake_quantize(module.weight))
    return model


@pytest.fixture
def llama_dir(tmp_path, ship_tokenizer):
    model = tiny_causal_lm("llama", ship_tokenizer, seed=1)
    path = tmp_path / "model"
    model.save_pretrained(path)
    ship_tokenizer.save_pretrained(path)
    return model, path


@pytest.fixture
def ids(ship_tokenizer):
    return torch.tensor([ship_tokenizer(SHIP_TEXT)["input_ids"][:96]])


@pytest.mark.parametrize(
    "format, group_size", [("ct-w4a16", 32), ("ct-w4a16", 64), ("ct-w8a16", 0)]
)
def test_loads_without_distill_and_equals_the_fake_quantized_model(
    tmp_path, llama_dir, ids, format, group_size
):
    model, path = llama_dir
    plan = plan_export(format, group_size, dtype="float32")
    result = export_model(path, tmp_path / "ct", format, group_size, dtype="float32")
    assert result.grid == plan.grid.name()
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == plan.grid.bits and weights["symmetric"] is True
    assert weights["group_size"] == (group_size or None)

    info, out = run_without_distill(tmp_path / "ct", ids, "float32", tmp_path)
    assert info == {"distill_imported": False}
    with torch.no_grad():
        expected = fake_quantized(model, plan.grid)(ids).logits
    assert torch.allclose(out["logits"], expected, rtol=0, atol=1e-5)
    assert out["generated"].shape == (1, 16)


def test_packed_codes_and_scales_are_the_grid(tmp_path, llama_dir):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    model, path = llama_dir
    plan = plan_export("ct-w4a16", 64)
    export_model(path, tmp_path / "ct", "ct-w4a16", 64)
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    linears = quantized_linears(model)
    assert len(linears) == 14 and "lm_head.weight" in tensors
    for name, module in linears.items():
        codes, scale = plan.grid.quantize(module.weight)
        packed = tensors[f"{name}.weight_packed"]
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        assert torch.equal(unpack_from_int32(packed, 4, shape), codes)
        assert tensors[f"{name}.weight_scale"].dtype == torch.bfloat16
        assert torch.equal(tensors[f"{name}.weight_scale"], scale)


def test_bf16_export_size_and_bf16_serving(tmp_path, llama_dir, ids):
    """Served in bf16, the export computes bit for bit what the fake-quantized model computes
    when transformers loads it in bf16 (the reference goes through from_pretrained too: a model
    cast with .to(bf16) also casts its RoPE frequencies, a loaded one keeps them in float32)."""
    from transformers import AutoModelForCausalLM

    model, path = llama_dir
    result = export_model(path, tmp_path / "ct", "ct-w4a16")
    assert result.linear_bytes_ratio <= 0.3
    assert result.linear_bytes_ratio == pytest.approx((0.5 + 2 / 32) / 2)
    _, out = run_without_distill(tmp_path / "ct", ids, "bfloat16", tmp_path)
    fake_quantized(model, plan_export("ct-w4a16").grid).save_pretrained(tmp_path / "fq")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "fq", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(out["logits"], reference(ids).logits)
