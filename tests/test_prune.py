"""Pruning on tiny random Llama and Qwen2 models: exact sparsity, masks, structured equivalence."""

import copy
import re

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.compress.prune import (
    apply_masks,
    masks_from_zeros,
    prune_model,
    sparsity_of,
)
from distill.models import count_params as count_parameters
from distill.specs import PRUNE_METHODS, PruneSpec


def prune(model, method, calibration=None, exclude=("lm_head",), **settings):
    """prune_model with the settings of a `prune` section (PruneSpec)."""
    return prune_model(model, PruneSpec(method=method, **settings), calibration, exclude)


VOCAB = 256
SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    # Larger than the default 0.02 so that every head and channel visibly moves the logits.
    initializer_range=0.2,
)


def tiny_llama(num_key_value_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(num_key_value_heads=num_key_value_heads, **SIZES)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2 has q/k/v biases; the upper layers use sliding-window attention (layer_types)."""
    torch.manual_seed(0)
    config = Qwen2Config(
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
        **SIZES,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()  # initialized to zero; random values make slicing visible
    return model


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def calibration(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(2)]


PROMPT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT, use_cache=False).logits


def greedy(model: nn.Module, use_cache: bool = True) -> torch.Tensor:
    return model.generate(
        PROMPT[:1, :4], max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0
    )


def linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight
        for name, module in model.model.layers.named_modules()
        if isinstance(module, nn.Linear)
    }


def reload(model: nn.Module, tmp_path) -> nn.Module:
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path).eval()


# --- unstructured ---------------------------------------------------------------------------------


def test_magnitude_per_layer_prunes_exact_share_of_each_matrix():
    model = tiny_llama().train()
    embeddings = model.model.embed_tokens.weight.clone()
    result = prune(model, "magnitude", sparsity=0.3)

    for weight in linears(model).values():
        assert int((weight == 0).sum()) == round(0.3 * weight.numel())
    assert result.sparsity == pytest.approx(0.3, abs=1e-4)
    assert sparsity_of(model) == result.sparsity
    assert len(result.masks) == 4 * 7
    zeroed = sum(int((~keep).sum()) for keep in result.masks.values())
    assert result.params_after == result.params_before - zeroed == count_parameters(model) - zeroed
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.training  # calibration-free, but the mode must survive anyway


def test_magnitude_global_uses_one_threshold_across_layers():
    original = tiny_llama()
    with torch.no_grad():
        original.model.layers[0].mlp.up_proj.weight.mul_(3)  # one layer of larger weights
    model = copy.deepcopy(original)
    result = prune(model, "magnitude", sparsity=0.6, scope="global")

    before, after = linears(original), linears(model)
    total = sum(w.numel() for w in after.values())
    assert sum(int((w == 0).sum()) for w in after.values()) == round(0.6 * total)
    pruned = torch.cat([before[n][after[n] == 0].abs() for n in after])
    kept = torch.cat([before[n][after[n] != 0].abs() for n in after])
    assert pruned.max() <= kept.min()
    assert result.details["per_layer_sparsity"]["model.layers.0.mlp.up_proj.weight"] < 0.3


def test_wanda_prunes_each_row_by_weight_times_input_norm():
    model = tiny_llama().train()
    batches = calibration()
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # the input of layer 0's q_proj, computed by hand
        inputs = [
            model.model.layers[0].input_layernorm(model.model.embed_tokens(b)) for b in batches
        ]
    input_norm = torch.cat([x.reshape(-1, 64) for x in inputs]).norm(dim=0)
    expected_scores = q_proj.weight.detach().abs() * input_norm
    result = prune(model, "wanda", sparsity=0.5, calibration=batches)

    for weight in linears(model).values():
        assert ((weight == 0).sum(dim=1) == round(0.5 * weight.shape[1])).all()
    pruned = result.masks["model.layers.0.self_attn.q_proj.weight"] == 0
    keep_top = expected_scores.topk(32, dim=1).indices
    assert torch.equal(~pruned, torch.zeros_like(pruned).scatter_(1, keep_top, True))
    assert model.training


def test_wanda_keeps_a_small_weight_column_with_huge_activations():
    model = tiny_llama()
    layer = model.model.layers[0]
    column = 5
    with torch.no_grad():
        layer.input_layernorm.weight[column] = 1000.0  # column 5 of q/k/v inputs gets huge
        layer.self_attn.q_proj.weight[:, column] = 0.01  # while its weights get small
    by_magnitude = prune(copy.deepcopy(model), "magnitude", sparsity=0.5)
    by_wanda = prune(model, "wanda", sparsity=0.5, calibration=calibration())

    name = "model.layers.0.self_attn.q_proj.weight"
    assert not by_magnitude.masks[name][:, column].any()
    assert by_wanda.masks[name][:, column].all()


@pytest.mark.parametrize("scoring", ["magnitude", "wanda"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 8)])
def test_nm_keeps_n_in_every_group_of_m(scoring, n, m):
    model = tiny_llama()
    result = prune(model, "nm", n=n, m=m, scoring=scoring, calibration=calibration())

    for weight in linears(model).values():
        nonzero_per_group = (weight != 0).view(weight.shape[0], -1, m).sum(-1)
        assert (nonzero_per_group == n).all()
    assert result.sparsity == pytest.approx(1 - n / m)
    assert result.details["scoring"] == scoring


# --- masks for recovery training ----------------------------------------------------------------


class Wrapper(nn.Module):
    """Stands in for DDP, whose parameter names carry a "module." prefix."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def perturb_all(model: nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))


def test_apply_masks_restores_zeros_after_an_optimizer_step():
    model = tiny_llama()
    masks = prune(model, "wanda", sparsity=0.5, calibration=calibration()).masks
    perturb_all(model)
    stepped = {name: w.clone() for name, w in linears(model).items()}
    apply_masks(model, masks)

    for name, weight in linears(model).items():
        keep = masks[f"model.layers.{name}.weight"]
        assert (weight[~keep] == 0).all()
        assert torch.equal(weight[keep], stepped[name][keep])
    assert sparsity_of(model) == 0.5


def test_apply_masks_handles_a_wrapper_prefix_either_way():
    model = tiny_llama()
    masks = prune(model, "magnitude", sparsity=0.5).masks
    wrapped = Wrapper(model)
    perturb_all(model)
    apply_masks(wrapped, masks)  # plain names, wrapped model
    assert sparsity_of(model) == 0.5

    perturb_all(model)
    apply_masks(model, {f"module.{name}": keep for name, keep in masks.items()})
    assert sparsity_of(model) == 0.5

    with pytest.raises(KeyError, match="matches no parameter"):
        apply_masks(model, {"model.layers.9.mlp.up_proj.weight": masks[next(iter(masks))]})


def test_masks_from_zeros_recovers_masks_of_a_saved_model(tmp_path):
    model = tiny_llama()
    result = prune(model, "nm", scoring="magnitude")
    loaded = reload(model, tmp_path)

    assert sparsity_of(loaded) == result.sparsity == 0.5
    recovered = masks_from_zeros(loaded)
    assert recovered.keys() == result.masks.keys()
    for name, keep in result.masks.items():
        assert torch.equal(recovered[name], keep)


# --- structured width ---------------------------------------------------------------------------


def zero_removed_heads(model: nn.Module, kept_kv_heads: list[list[int]]) -> None:
    """Zero the q/k/v rows and o_proj columns of every query head of the removed KV groups."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    head_dim = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for layer, kept in zip(model.model.layers, kept_kv_heads):
            attn = layer.self_attn
            for kv in set(range(config.num_key_value_heads)) - set(kept):
                kv_rows = slice(kv * head_dim, (kv + 1) * head_dim)
                q_rows = slice(kv * group * head_dim, (kv + 1) * group * head_dim)
                for proj, rows in (
                    (attn.q_proj, q_rows),
                    (attn.k_proj, kv_rows),
                    (attn.v_proj, kv_rows),
                ):
                    proj.weight[rows] = 0
                    if proj.bias is not None:
                        proj.bias[rows] = 0
                attn.o_proj.weight[:, q_rows] = 0


@pytest.mark.parametrize(
    ("make", "fraction"),
    [(tiny_llama, 0.5), (tiny_qwen2, 0.5), (lambda: tiny_llama(num_key_value_heads=4), 0.5)],
    ids=["llama-gqa", "qwen2-bias", "llama-mha"],
)
def test_width_heads_equal_zeroing_those_heads(make, fraction):
    original = make()
    model = copy.deepcopy(original)
    result = prune(
        model,
        "width",
        heads_fraction=fraction,
        mlp_fraction=0,
        calibration=calibration(),
    )

    kept = result.details["kept_kv_heads"]
    num_kv = original.config.num_key_value_heads
    assert all(len(k) == num_kv // 2 for k in kept)
    reference = copy.deepcopy(original)
    zero_removed_heads(reference, kept)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)
    assert (logits(model) - logits(original)).abs().max() > 1e-3  # the test can see a difference
    assert model.config.num_key_value_heads == num_kv // 2
    assert model.model.layers[0].self_attn.q_proj.out_features == 2 * 16  # half of 4 heads


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_width_query_heads_within_groups_equal_zeroing_those_heads(name, tmp_path):
    original = MODELS[name]()  # 4 query heads in 2 key-value groups
    model = copy.deepcopy(original)
    result = prune(
        model,
        "width",
        heads_fraction=0.5,
        mlp_fraction=0,
        head_unit="query_head",
        calibration=calibration(),
    )

    kept = result.details["kept_query_heads"]
    assert result.details["kept_kv_heads"] == [[0, 1]] * 4  # every KV head stays
    assert all(len(k) == 2 and k[0] // 2 == 0 and k[1] // 2 == 1 for k in kept)  # 1 per group
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for layer, kept_heads in zip(reference.model.layers, kept):
            attn = layer.self_attn
            for head in set(range(4)) - set(kept_heads):
                rows = slice(head * 16, (head + 1) * 16)
                attn.q_proj.weight[rows] = 0
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[rows] = 0
                attn.o_proj.weight[:, rows] = 0
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)
    assert (logits(model) - logits(original)).abs().max() > 1e-3
    loaded = reload(model, tmp_path)
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (2, 2)
    torch.testing.assert_close(logits(loaded), logits(model))
    assert torch.equal(greedy(loaded), greedy(loaded, use_cache=False))


def test_width_mlp_channels_equal_zeroing_down_proj_columns():
    original = tiny_llama()
    model = copy.deepcopy(original)
    result = prune(model, "width", heads_fraction=0, mlp_fraction=0.25, calibration=calibration())

    reference = copy.deepcopy(original)
    with torch.no_grad():
        for layer, kept in zip(reference.model.layers, result.details["kept_mlp_channels"]):
            removed = sorted(set(range(128)) - set(kept))
            assert len(removed) == 32
            layer.mlp.down_proj.weight[:, removed] = 0
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)
    assert model.config.intermediate_size == 96
    assert result.details["kept_kv_heads"] is None


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_width_pruned_model_reloads_smaller_and_generates(name, tmp_path):
    model = MODELS[name]().train()
    shared_config = model.config
    result = prune(model, "width", calibration=calibration())  # 1 of 2 groups, 25 % channels

    assert model.training
    assert shared_config.num_attention_heads == 4  # a config shared with other models is untouched
    loaded = reload(model, tmp_path)
    config = loaded.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert (config.head_dim, config.intermediate_size) == (16, 96)
    assert count_parameters(loaded) == result.params_after < result.params_before
    assert result.sparsity == pytest.approx(1 - result.params_after / result.params_before)
    torch.testing.assert_close(logits(loaded), logits(model.eval()))
    tokens = greedy(loaded)
    assert tokens.shape == (1, 10)
    assert torch.equal(tokens, greedy(loaded, use_cache=False))


# --- structured depth ---------------------------------------------------------------------------


class Skip(nn.Module):
    """A decoder layer that passes the hidden states through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipping(original: nn.Module, removed: list[int]) -> nn.Module:
    reference = copy.deepcopy(original)
    for i in removed:
        reference.model.layers[i] = Skip()
    return reference


def test_depth_explicit_layers_equal_skipping_them():
    original = tiny_llama()
    model = copy.deepcopy(original)
    result = prune(model, "depth", layers=[2, 1])

    assert result.details["removed_layers"] == [1, 2]
    assert model.config.num_hidden_layers == len(model.model.layers) == 2
    torch.testing.assert_close(logits(model), logits(skipping(original, [1, 2])), atol=1e-5, rtol=0)
    assert result.params_after == count_parameters(model) < result.params_before


def test_depth_by_rank_removes_the_layers_that_change_hidden_states_least():
    original = tiny_llama()
    model = copy.deepcopy(original)
    result = prune(model, "depth", layers=2, calibration=calibration())

    cosine = torch.tensor(result.details["input_output_cosine"])
    assert result.details["removed_layers"] == sorted(cosine.argsort(descending=True)[:2].tolist())
    expected = logits(skipping(original, result.details["removed_layers"]))
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_depth_keeps_kv_cache_and_layer_types_consistent(tmp_path):
    original = tiny_qwen2()
    model = copy.deepcopy(original)
    assert original.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    prune(model, "depth", layers=[0])

    assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    expected = greedy(skipping(original, [0]), use_cache=False)
    assert torch.equal(greedy(model), expected)
    loaded = reload(model, tmp_path)
    assert loaded.config.num_hidden_layers == 3
    assert loaded.config.layer_types == model.config.layer_types
    assert torch.equal(greedy(loaded), expected)


# --- bad arguments ------------------------------------------------------------------------------

CALIBRATION = calibration()
BAD_ARGUMENTS = [
    ("magnitude", dict(sparsity=0.0), "sparsity must be in (0, 1), got 0.0"),
    ("wanda", dict(sparsity=1.0, calibration=CALIBRATION), "sparsity must be in (0, 1), got 1.0"),
    ("magnitude", dict(sparsity=-0.2), "sparsity must be in (0, 1), got -0.2"),
    ("nm", dict(n=4, m=4, scoring="magnitude"), "N:M sparsity needs 0 < n < m, got n=4, m=4"),
    ("nm", dict(n=5, m=4, scoring="magnitude"), "N:M sparsity needs 0 < n < m, got n=5, m=4"),
    ("nm", dict(n=2, m=5, scoring="magnitude"), "has in_features=64, m=5"),
    ("nm", dict(scoring="random"), "unknown scoring 'random'; allowed: wanda, magnitude"),
    ("prune", {}, "unknown pruning method 'prune'; allowed: " + ", ".join(PRUNE_METHODS)),
    ("magnitude", dict(scope="row"), "unknown scope 'row'; allowed: layer, global"),
    ("wanda", dict(scope="global", calibration=CALIBRATION), "applies to method 'magnitude' only"),
    ("magnitude", dict(exclude=("layers",)), "leaves no linear layer to prune"),
    ("wanda", {}, "wanda with Wanda scoring needs calibration data"),
    ("nm", {}, "nm with Wanda scoring needs calibration data"),
    ("width", {}, "width pruning needs calibration data"),
    ("depth", dict(layers=1), "layers as a count) needs calibration data"),
    ("wanda", dict(calibration=[torch.rand(2, 16)]), "calibration[0] must be an integer tensor"),
    ("width", dict(heads_fraction=1.0), "heads_fraction must be in [0, 1), got 1.0"),
    ("width", dict(heads_fraction=0.8), "removes 2 of 2 key-value head groups, leaving none"),
    ("width", dict(mlp_fraction=0.999), "removes 128 of 128 MLP channels, leaving none"),
    ("width", dict(heads_fraction=0, mlp_fraction=0), "removes nothing"),
    ("width", dict(head_unit="head"), "unknown head_unit 'head'; allowed: kv_group"),
    (
        "width",
        dict(head_unit="query_head", heads_fraction=0.9),
        "removes 2 of 2 query heads of each group, leaving none",
    ),
    ("depth", dict(layers=4), "layers=4 must remove at least 1 and fewer than all 4"),
    ("depth", dict(layers=0), "layers=0 must remove at least 1"),
    (
        "depth",
        dict(layers=[0, 4]),
        "layers [4] out of range: the model has layers 0..3",
    ),
    ("depth", dict(layers=[-1]), "layers [-1] out of range"),
    ("depth", dict(layers=[1, 1]), "layers [1, 1] repeats an index"),
    ("depth", dict(layers=[0, 1, 2, 3]), "fewer than all 4 layers, got [0, 1, 2, 3]"),
    ("depth", dict(layers=[0.5]), "layers must hold integer layer indices"),
    ("depth", {}, "depth pruning needs layers"),
]


@pytest.mark.parametrize(("method", "kwargs", "message"), BAD_ARGUMENTS)
def test_bad_arguments_fail_before_touching_the_model(method, kwargs, message):
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape(message)):
        prune(model, method, **kwargs)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


def test_width_rejects_head_counts_the_config_class_rejects():
    model = tiny_llama(num_key_value_heads=4)  # removing 1 of 4 heads leaves 3; 64 % 3 != 0
    with pytest.raises(ValueError, match=re.escape("accepts: 0.5 (2 groups), 0.75 (3 groups)")):
        prune(model, "width", heads_fraction=0.25, calibration=CALIBRATION)


def test_width_query_heads_need_grouped_query_attention():
    model = tiny_llama(num_key_value_heads=4)
    with pytest.raises(ValueError, match="one query head per key-value head .*use 'kv_group'"):
        prune(model, "width", head_unit="query_head", calibration=CALIBRATION)


def test_unsupported_architecture_names_its_model_type():
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        prune(GPT2LMHeadModel(config), "magnitude")
