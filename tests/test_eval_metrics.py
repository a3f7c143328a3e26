"""The one-pass evaluation on a tiny model: its perplexity equals the training loop's held-out
number, the position buckets split that same loss, teacher agreement and KL match a naive
computation from full logits, generation speed is measured, and a stage's `eval` overrides only
the keys it sets."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.config import EvalSpec
from distill.run.stage_output import _eval_spec
from distill.runtime.eval_metrics import position_spans, score_blocks
from distill.runtime.evaluate import generation_speed, heldout_metrics

VOCAB = 96


def _tiny(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, VOCAB, (10, 32), generator=torch.Generator().manual_seed(0))


def test_perplexity_equals_the_loops_heldout_and_buckets_split_it(blocks):
    model = _tiny(0)
    scored = score_blocks(model, blocks, batch_size=4, vocab_size=VOCAB, buckets=4, chunk_rows=7)
    reference = heldout_metrics(model, blocks, 4, VOCAB)
    assert scored["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert scored["tokens"] == reference["tokens"] == 10 * 31
    assert scored["position_buckets"] == [[0, 8], [8, 16], [16, 24], [24, 32]]
    # the buckets' token-weighted mean loss is the overall loss (bucket 0 has 7 predictions)
    counts = [7 * 10, 8 * 10, 8 * 10, 8 * 10]
    mean = sum(c * math.log(p) for c, p in zip(counts, scored["position_perplexity"])) / sum(counts)
    assert mean == pytest.approx(scored["loss"], rel=1e-9)


def test_position_spans_cover_the_block():
    assert position_spans(128, 4) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert position_spans(10, 3) == [(0, 3), (3, 7), (7, 10)]


def test_teacher_agreement_and_kl_match_full_logits(blocks):
    student, teacher = _tiny(0), _tiny(1)
    same = score_blocks(student, blocks, 4, VOCAB, teacher=student, teacher_blocks=10)
    assert same["teacher"]["top1_agreement"] == 1.0
    assert same["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    scored = score_blocks(student, blocks, 4, VOCAB, teacher=teacher, teacher_blocks=8)
    ids = blocks[:8]
    with torch.no_grad():
        s_logp = F.log_softmax(student(ids).logits[:, :-1].float(), -1).flatten(0, 1)
        t_logp = F.log_softmax(teacher(ids).logits[:, :-1].float(), -1).flatten(0, 1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    agree = (t_logp.argmax(-1) == s_logp.argmax(-1)).double().mean()
    assert scored["teacher"]["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert scored["teacher"]["top1_agreement"] == pytest.approx(float(agree))


def test_generation_speed(blocks):
    speed = generation_speed(_tiny(0), blocks[0, :4], new_tokens=4)
    assert speed["tokens_per_s"] > 0 and speed["time_to_first_token_s"] > 0
    assert speed["new_tokens"] == 4 and speed["device"] == "cpu"
    assert speed["peak_mem_bytes"] is None or speed["peak_mem_bytes"] > 0


def test_stage_eval_overrides_only_the_keys_it_sets():
    class Recipe:
        eval = EvalSpec(sets={"licence": ["LICENSE"]}, teacher="t", latency_tokens=8)

    class Ctx:
        recipe = Recipe()

    class Stage:
        eval = EvalSpec(latency=True)

    merged = _eval_spec(Ctx(), Stage())
    assert merged.latency and merged.latency_tokens == 8 and merged.teacher == "t"
    assert list(merged.sets) == ["licence"]


def test_eval_section_errors_name_the_key():
    with pytest.raises(ValueError, match="`heldout` is the training data's held-out split"):
        EvalSpec(sets={"heldout": ["x"]})
    assert EvalSpec(sets={"wiki": "wikitext"}).sets["wiki"].hub == "wikitext"
