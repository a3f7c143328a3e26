"""The offline teacher cache as pieces: the encoding's size and error, every loss kind read from a
cache equal (value and gradient) to the top-k reference on the teacher's own logits, and hidden
states stored exactly as the teacher computed them (bf16)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.config import CacheSpec
from distill.objective.losses import naive_logit_objective, topk_bucket_logprobs
from distill.objective.module import DistillModule, teacher_forward
from distill.run.cache_stage import teacher_outputs
from distill.specs import LogitTerm, ObjectiveSpec
from distill.teacher_cache.encoding import decode_topk, encode_topk, id_dtype, record_dtype
from distill.teacher_cache.store import cache_in_memory

VOCAB = 300


def tiny_llama(width: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).float()


def test_default_encoding_takes_196_bytes_per_token_at_k_64():
    assert record_dtype(64, 4096).itemsize == 196  # uint16 ids + uint8 codes + 2 float16
    assert record_dtype(64, 128_256).itemsize == 324  # uint32 ids past 65,536 tokens
    assert id_dtype(256) == np.uint8 and id_dtype(65_536) == np.uint16
    assert id_dtype(65_537) == np.uint32


def test_decoded_topk_is_close_and_keeps_the_tail_mass():
    torch.manual_seed(0)
    logits = torch.randn(500, VOCAB) * 3
    records = encode_topk(logits, 32, VOCAB)
    logprobs, ids = decode_topk(records)
    exact, exact_ids = torch.topk(torch.log_softmax(logits, -1), 32)
    assert torch.equal(ids, exact_ids)
    probs, exact_probs = logprobs.exp(), exact.exp()
    assert (probs - exact_probs).abs().max() < 5e-3  # absolute error of each p_i
    assert ((probs - exact_probs).abs() / exact_probs).max() < 0.03  # half a step, relative
    tail, exact_tail = 1 - probs.sum(-1), 1 - exact_probs.sum(-1)
    assert ((tail - exact_tail).abs() / exact_tail).max() < 2e-3  # fp16 of log(tail)


def test_a_confident_teacher_keeps_a_tiny_tail():
    logits = torch.full((4, VOCAB), -30.0)
    logits[:, 7] = 0.0
    logprobs, ids = decode_topk(encode_topk(logits, 8, VOCAB))
    assert ids[:, 0].eq(7).all()
    tail = -torch.expm1(torch.logsumexp(logprobs, -1))
    assert (tail < 1e-10).all() and (logprobs[:, 0].abs() < 1e-6).all()


DIVERGENCES = [
    LogitTerm("forward_kl", temperature=1.0),
    LogitTerm("forward_kl", temperature=2.0),
    LogitTerm("reverse_kl", temperature=1.5),
    LogitTerm("jsd", beta=0.3),
    LogitTerm("skew_kl", alpha=0.2),
    LogitTerm("skew_reverse_kl", alpha=0.2),
    LogitTerm("tv", temperature=1.0),
]


@pytest.fixture(scope="module")
def models_and_cache():
    teacher, student = tiny_llama(48, 2, seed=1), tiny_llama(32, 2, seed=2)
    blocks = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    spec = CacheSpec(k=16, tail_samples=0, hidden_layers=[0, 1], batch_size=4)  # buckets only
    from contextlib import nullcontext

    topk, hidden = teacher_outputs(teacher, blocks, spec, VOCAB, nullcontext(), "cpu")
    manifest = {"k": 16, "hidden_layers": [0, 1], "teacher_layers": 2, "hidden_size": 48}
    return teacher, student, blocks, cache_in_memory(manifest, topk, hidden)


@pytest.mark.parametrize("term", DIVERGENCES, ids=lambda t: f"{t.kind}-T{t.temperature}")
def test_loss_from_the_cache_equals_the_topk_reference(models_and_cache, term):
    """The student's step reading the cache computes the naive top-k objective on the cache's
    dequantized values (value and gradient), and that is close to the exact top-k on the
    teacher's own logits."""
    teacher, student, blocks, cache = models_and_cache
    objective = ObjectiveSpec(ce_weight=0.3, terms=[term], chunk_size=40)
    module = DistillModule(student, objective, VOCAB)
    student.zero_grad()
    total, _, _ = module(blocks, cache.read(torch.arange(len(blocks)), torch.device("cpu"), False))
    total.backward()
    grad = student.lm_head.weight.grad.clone()

    def reference(teacher_topk):
        student.zero_grad()
        logits = student(blocks).logits[:, :-1].reshape(-1, VOCAB)
        out = naive_logit_objective(
            logits, blocks[:, 1:].reshape(-1), [term], 0.3, teacher_topk=teacher_topk
        )
        out.total.backward()
        return out.total.detach(), student.lm_head.weight.grad.clone()

    logprobs, ids = cache.read(torch.arange(len(blocks)), torch.device("cpu"), False).topk
    value, ref_grad = reference((logprobs.flatten(0, 1), ids.flatten(0, 1)))
    torch.testing.assert_close(total.detach(), value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        teacher_logits = teacher(blocks).logits[:, :-1].reshape(-1, VOCAB)
    ids = ids.flatten(0, 1)
    exact = torch.log_softmax(teacher_logits, -1).gather(1, ids)  # unquantized, same ids
    exact_value, _ = reference((exact, ids))
    assert abs(float(value - exact_value)) < 0.01 * float(exact_value)
    # the cached ids are the teacher's top 16, but for the token that follows, always among them
    top = torch.topk(teacher_logits, 16).indices
    labels = blocks[:, 1:].reshape(-1)
    assert (ids == labels[:, None]).any(1).all()
    assert torch.equal(ids[:, :15], top[:, :15])
    keeps_top = (top == labels[:, None]).any(1)
    assert torch.equal(ids[keeps_top], top[keeps_top])


def test_bucket_distributions_from_the_cache_sum_to_one(models_and_cache):
    _, student, blocks, cache = models_and_cache
    logprobs, ids = cache.read(torch.arange(2), torch.device("cpu"), False).topk
    with torch.no_grad():
        logits = student(blocks[:2]).logits[:, :-1]
    student_dist, teacher_dist = topk_bucket_logprobs(logits, logprobs, ids)
    for dist in (student_dist, teacher_dist):
        torch.testing.assert_close(dist.exp().sum(-1), torch.ones(dist.shape[:-1]))


def test_cached_hidden_states_equal_the_teachers_in_bf16(models_and_cache):
    teacher, _, blocks, cache = models_and_cache
    from contextlib import nullcontext

    out = teacher_forward(teacher, blocks, True, nullcontext())
    states = cache.read(torch.tensor([4, 1]), torch.device("cpu"), True).states
    for layer in (0, 1):
        assert states[layer].dtype == torch.bfloat16
        assert torch.equal(states[layer], out.states[layer][[4, 1]].to(torch.bfloat16))


# --- tail samples: the forward KL from a cache without the top-k's bias --------------------------


def _tail_problem(rows=6, vocab=40, k=5, samples=8, seed=0, dtype=torch.float64):
    """Student logits, the teacher's full logits, and its top-k with `samples` tail draws."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=gen, dtype=dtype) * 2).requires_grad_(True)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=dtype) * 2
    records = encode_topk(teacher.float(), k, vocab, None, samples, gen)
    logprobs, ids, tail_ids, entropy = decode_topk(records)
    return student, teacher, (logprobs.to(dtype), ids, tail_ids, entropy.to(dtype))


def test_tail_samples_lie_outside_the_top_k_and_follow_the_tail_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 60) * 2
    records = encode_topk(logits, 8, 60, None, 40_000, torch.Generator().manual_seed(1))
    assert records.dtype.itemsize == 8 + 8 + 4 + 40_000 + 2  # uint8 ids for 60 tokens
    _, ids, tail_ids, entropy = decode_topk(records)
    assert not (tail_ids[:, :, None] == ids[:, None, :]).any()
    probs = torch.softmax(logits, -1).scatter(1, ids, 0.0)
    tail = probs / probs.sum(1, keepdim=True)
    counts = torch.zeros_like(tail).scatter_add_(1, tail_ids, torch.ones(tail_ids.shape))
    assert (counts / 40_000 - tail).abs().max() < 0.01
    exact_entropy = -(tail * tail.clamp_min(1e-30).log()).sum(1)
    torch.testing.assert_close(entropy, exact_entropy, rtol=2e-3, atol=1e-3)  # float16
    assert record_dtype(64, 4096, tail_samples=16).itemsize == 196 + 16 * 2 + 2


def test_a_tail_without_mass_is_sampled_outside_the_top_k():
    logits = torch.full((3, 20), -math.inf)
    logits[:, :4] = 0.0  # the top 4 hold all the mass (masked tokens)
    _, ids, tail_ids, entropy = decode_topk(encode_topk(logits, 4, 20, None, 5))
    assert not (tail_ids[:, :, None] == ids[:, None, :]).any() and (entropy == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_objective_with_tail_samples_equals_the_naive_reference(dtype):
    """Value and gradient of every divergence kind, alone and mixed, with tail samples: only the
    forward KL at T = 1 changes (tested against the buckets alone), and the chunked path with
    its hand-written gradient equals the naive one with autograd."""
    from distill.objective.chunked import chunked_logit_objective

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(30, 8, generator=gen, dtype=dtype)
    weight = torch.randn(43, 8, generator=gen, dtype=dtype)  # 3 padding rows past the vocabulary
    labels = torch.randint(0, 40, (30,), generator=gen)
    labels[::7] = -100
    records = encode_topk(
        torch.randn(30, 40, generator=gen) * 2, 6, 40, labels.clamp_min(0), 9, gen
    )
    topk = tuple(t.to(dtype) if t.dtype.is_floating_point else t for t in decode_topk(records))
    mixed = [LogitTerm("forward_kl", weight=0.4), LogitTerm("jsd", weight=0.3, beta=0.3),
             LogitTerm("forward_kl", weight=0.2, temperature=2.0)]  # fmt: skip
    for terms in [[term] for term in DIVERGENCES] + [mixed]:
        results = {}
        for name, teacher in (("tail", topk), ("buckets", topk[:2])):
            for path in ("naive", "chunked"):
                h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
                if path == "naive":
                    out = naive_logit_objective(h @ w.T, labels, terms, 0.3, None, teacher, 40)
                else:
                    out = chunked_logit_objective(
                        h, w, labels, terms, 0.3, teacher_topk=teacher, vocab_size=40, chunk_size=7
                    )
                out.total.backward()
                results[name, path] = (out, h.grad, w.grad)
        rtol = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]
        for name in ("tail", "buckets"):
            (a, *grads_a), (b, *grads_b) = results[name, "chunked"], results[name, "naive"]
            torch.testing.assert_close(a.total, b.total, rtol=rtol, atol=rtol)
            for x, y in zip(grads_a + list(a.terms.values()), grads_b + list(b.terms.values())):
                torch.testing.assert_close(x, y, rtol=rtol, atol=rtol)
        with_tail, buckets = results["tail", "naive"][0], results["buckets", "naive"][0]
        corrected = any(t.kind == "forward_kl" and t.temperature == 1.0 for t in terms)
        assert (with_tail.total != buckets.total) == corrected
        assert with_tail.terms["ce"] == buckets.terms["ce"]


def test_tail_samples_make_the_forward_kl_and_its_gradient_unbiased():
    """With many samples the cache's forward KL (value and gradient) is the full-vocabulary one
    on the teacher's logits; the buckets alone are not (the bias the samples remove)."""
    student, teacher, topk = _tail_problem(samples=200_000, seed=2)
    labels = torch.zeros(len(student), dtype=torch.long)
    terms = [LogitTerm("forward_kl")]
    outs = {}
    for name, args in (
        ("full", {"teacher_logits": teacher}),
        ("tail", {"teacher_topk": topk}),
        ("buckets", {"teacher_topk": topk[:2]}),
    ):
        student.grad = None
        out = naive_logit_objective(student, labels, terms, 0.0, **args)
        out.total.backward()
        outs[name] = (out.total.detach(), student.grad.clone())
    (full, full_grad), (tail, tail_grad), (bucket, bucket_grad) = outs.values()
    assert abs(tail - full) < 0.01 * full  # float16 entropy and 8-bit codes, and sampling noise
    assert (tail_grad - full_grad).abs().max() < 0.004
    assert bucket < 0.9 * full and (bucket_grad - full_grad).abs().max() > 0.02


def test_the_cache_stage_writes_tail_samples_the_student_reads(models_and_cache):
    """Through the writer and the reader: the tail samples reach the loss as written, and the
    draws depend only on the generator's seed (a resumed shard writes the same bytes)."""
    teacher, student, blocks, _ = models_and_cache
    from contextlib import nullcontext

    spec = CacheSpec(k=16, tail_samples=8, batch_size=4)

    def write(seed):
        gen = torch.Generator().manual_seed(seed)
        return teacher_outputs(teacher, blocks, spec, VOCAB, nullcontext(), "cpu", gen)[0]

    records = write(7)
    assert records.tobytes() == write(7).tobytes() and records.tobytes() != write(8).tobytes()
    manifest = {"k": 16, "tail_samples": 8, "hidden_layers": [], "teacher_layers": 2}
    cache = cache_in_memory(manifest, records, None)
    read = cache.read(torch.arange(len(blocks)), torch.device("cpu"), False).topk
    assert len(read) == 4 and read[2].shape == (len(blocks), blocks.shape[1] - 1, 8)
    objective = ObjectiveSpec(ce_weight=0.0, terms=[LogitTerm("forward_kl")], chunk_size=40)
    total, _, _ = DistillModule(student, objective, VOCAB)(blocks, tuple_output(read))
    with torch.no_grad():
        logits = student(blocks).logits[:, :-1].reshape(-1, VOCAB)
    flat = tuple(t.flatten(0, 1) for t in read)
    expected = naive_logit_objective(
        logits, blocks[:, 1:].reshape(-1), objective.terms, 0.0, teacher_topk=flat
    )
    torch.testing.assert_close(total.detach(), expected.total, rtol=1e-5, atol=1e-5)


def tuple_output(topk):
    from distill.objective.module import TeacherOutput

    return TeacherOutput(hidden=None, head_weight=None, states=None, topk=topk)
