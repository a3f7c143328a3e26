"""Tests of distill.objective (losses, chunked, hidden): the chunked path against the naive reference, the naive reference against
hand-written formulas, divergence identities, memory, layer maps and hidden-state losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.objective.chunked import chunked_logit_objective
from distill.objective.hidden import (
    HiddenProjections,
    hidden_state_loss,
    resolve_layer_map,
    uniform_layer_map,
)
from distill.objective.losses import (
    LOGIT_LOSSES,
    forward_kl,
    jsd,
    naive_logit_objective,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
)
from distill.specs import LOGIT_LOSS_KINDS, LogitTerm

DIVERGENCE_KINDS = tuple(kind for kind in LOGIT_LOSS_KINDS if kind != "logit_mse")
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class Problem:
    """A small random distillation batch. Heads are padded past `vocab` differently."""

    hidden: torch.Tensor  # [N, Hs]
    weight: torch.Tensor  # [vocab + 3, Hs]
    teacher_hidden: torch.Tensor  # [N, Ht]
    teacher_weight: torch.Tensor  # [vocab + 5, Ht]
    labels: torch.Tensor  # [N], -100 on masked rows
    topk: tuple[torch.Tensor, torch.Tensor]  # teacher top-k at T = 1, over the first `vocab` rows
    vocab: int


def make_problem(
    dtype=torch.float64, n=37, hs=8, ht=12, vocab=50, k=6, seed=0, masked_fraction=0.3
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hs, generator=gen, dtype=dtype)
    weight = torch.randn(vocab + 3, hs, generator=gen, dtype=dtype) * 0.7
    teacher_hidden = torch.randn(n, ht, generator=gen, dtype=dtype)
    teacher_weight = torch.randn(vocab + 5, ht, generator=gen, dtype=dtype) * 0.7
    # Padding rows would dominate any loss that forgot to slice them off.
    weight[vocab:] *= 30
    teacher_weight[vocab:] *= 30
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < masked_fraction] = -100
    labels[0] = -100
    teacher_logprobs = F.log_softmax((teacher_hidden @ teacher_weight[:vocab].T).double(), -1)
    top_logprobs, top_indices = teacher_logprobs.topk(k, dim=-1)
    return Problem(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        labels,
        (top_logprobs.to(dtype), top_indices),
        vocab,
    )


def run_chunked(problem, terms, ce_weight, teacher, chunk_size, weight_grad=True, grad_scale=1.0):
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(weight_grad)
    teacher_args = (
        {"teacher_hidden": problem.teacher_hidden, "teacher_head_weight": problem.teacher_weight}
        if teacher == "logits"
        else {"teacher_topk": problem.topk}
        if teacher == "topk"
        else {}
    )
    out = chunked_logit_objective(
        hidden, weight, problem.labels, terms, ce_weight, vocab_size=problem.vocab,
        chunk_size=chunk_size, **teacher_args,
    )  # fmt: skip
    (out.total * grad_scale).backward()
    return out, hidden.grad, weight.grad


def run_naive(problem, terms, ce_weight, teacher, weight_grad=True, grad_scale=1.0):
    hidden = problem.hidden.clone().requires_grad_(True)
    weight = problem.weight.clone().requires_grad_(weight_grad)
    teacher_args = (
        {"teacher_logits": problem.teacher_hidden @ problem.teacher_weight.T}
        if teacher == "logits"
        else {"teacher_topk": problem.topk}
        if teacher == "topk"
        else {}
    )
    out = naive_logit_objective(
        hidden @ weight.T,
        problem.labels,
        terms,
        ce_weight,
        vocab_size=problem.vocab,
        **teacher_args,
    )
    (out.total * grad_scale).backward()
    return out, hidden.grad, weight.grad


def assert_rel_close(actual, expected, rtol):
    """Equal within rtol relative to the largest magnitude of `expected` (elementwise-safe near 0)."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def assert_outputs_match(chunked, naive, rtol):
    assert chunked[0].terms.keys() == naive[0].terms.keys()
    assert chunked[0].num_tokens.item() == naive[0].num_tokens.item()
    assert chunked[0].num_tokens.dtype == torch.int64
    assert_rel_close(chunked[0].total.detach(), naive[0].total.detach(), rtol)
    for name in naive[0].terms:
        assert_rel_close(chunked[0].terms[name], naive[0].terms[name], rtol)
    assert_rel_close(chunked[1], naive[1], rtol)
    if naive[2] is None:
        assert chunked[2] is None
    else:
        assert_rel_close(chunked[2], naive[2], rtol)


# ---------------------------------------------------------------------------------------------
# Chunked == naive, in value and gradient.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("teacher", ["logits", "topk"])
@pytest.mark.parametrize("kind", LOGIT_LOSS_KINDS)
def test_chunked_matches_naive_per_kind(kind, teacher, dtype):
    if kind == "logit_mse" and teacher == "topk":
        pytest.skip("logit_mse needs full teacher logits (tested as an error below)")
    problem = make_problem(dtype)
    terms = [LogitTerm(kind, weight=0.7, temperature=2.0, beta=0.3, alpha=0.2)]
    naive = run_naive(problem, terms, 0.5, teacher)
    assert naive[0].total.item() > 0
    # 5 leaves an uneven last chunk (37 = 7 * 5 + 2 rows, fewer after masking); 1000 > N.
    for chunk_size in (1, 5, 16, 1000):
        chunked = run_chunked(problem, terms, 0.5, teacher, chunk_size)
        assert_outputs_match(chunked, naive, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("teacher", ["logits", "topk"])
def test_chunked_matches_naive_mixed_terms(teacher, dtype):
    problem = make_problem(dtype, n=64, seed=1)
    terms = [
        LogitTerm("forward_kl", weight=0.5, temperature=2.0),
        LogitTerm("reverse_kl", weight=0.3, temperature=1.5),
        LogitTerm("jsd", weight=0.2, beta=0.7),
        LogitTerm("forward_kl", weight=0.1, temperature=0.5),
        LogitTerm("tv", weight=1.0, temperature=3.0),
    ]
    naive = run_naive(problem, terms, 0.5, teacher, grad_scale=3.0)
    assert list(naive[0].terms) == ["ce", "forward_kl_1", "reverse_kl", "jsd", "forward_kl_2", "tv"]
    for chunk_size in (3, 64, 100):
        chunked = run_chunked(problem, terms, 0.5, teacher, chunk_size, grad_scale=3.0)
        assert_outputs_match(chunked, naive, RTOL[dtype])
    # total is the documented weighted sum of the unweighted terms.
    expected = 0.5 * naive[0].terms["ce"] + sum(
        term.weight * term.temperature**2 * naive[0].terms[name]
        for term, name in zip(terms, list(naive[0].terms)[1:])
    )
    assert_rel_close(naive[0].total.detach(), expected, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_matches_naive_ce_only(dtype):
    problem = make_problem(dtype)
    naive = run_naive(problem, [], 1.0, None)
    assert list(naive[0].terms) == ["ce"]
    chunked = run_chunked(problem, [], 1.0, None, 4)
    assert_outputs_match(chunked, naive, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("need_grad", [True, False])
def test_closed_form_ce_forward_kl_matches_autograd(dtype, need_grad):
    """The chunked path's hand-written CE + forward-KL gradient equals autograd on the same
    logits, with several temperatures, a zero-weight term and teacher logits of -inf (0 log 0)."""
    from distill.objective.chunked import _ce_forward_kl_chunk
    from distill.objective.losses import _objective_on_rows

    gen = torch.Generator().manual_seed(3)
    n, width, vocab = 9, 6, 11
    hidden = torch.randn(n, width, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, width, generator=gen, dtype=dtype)
    # A column of ones times a row holding -inf gives the teacher exact zeros of probability.
    teacher_hidden = torch.cat([torch.randn(n, 4, generator=gen, dtype=dtype), torch.ones(n, 1)], 1)
    teacher_weight = torch.randn(vocab, 5, generator=gen, dtype=dtype)
    teacher_weight[:, 4] = 0.0
    teacher_weight[[2, 7], :] = 0.0
    teacher_weight[[2, 7], 4] = float("-inf")
    labels = torch.randint(0, vocab, (n,), generator=gen)
    terms = [
        LogitTerm("forward_kl", weight=0.5, temperature=1.0),
        LogitTerm("forward_kl", weight=0.3, temperature=2.5),
        LogitTerm("forward_kl", weight=0.0, temperature=0.7),
    ]
    total, sums, grad = _ce_forward_kl_chunk(
        hidden, weight, labels, terms, 0.4, teacher_hidden, teacher_weight, need_grad
    )
    logits = (hidden @ weight.T).requires_grad_(True)
    ref_total, ref_sums = _objective_on_rows(
        logits, labels, terms, 0.4, teacher_hidden @ teacher_weight.T, None
    )
    (ref_grad,) = torch.autograd.grad(ref_total, logits)
    assert torch.isfinite(sums).all() and sums.dtype == ref_sums.dtype
    assert_rel_close(total, ref_total.detach(), RTOL[dtype])
    assert_rel_close(sums, ref_sums, RTOL[dtype])
    if need_grad:
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        assert_rel_close(grad, ref_grad, RTOL[dtype])
    else:
        assert grad is None


def test_frozen_head_and_frozen_hidden():
    problem = make_problem()
    terms = [LogitTerm("forward_kl", temperature=2.0)]
    naive = run_naive(problem, terms, 0.5, "logits", weight_grad=False)
    chunked = run_chunked(problem, terms, 0.5, "logits", 8, weight_grad=False)
    assert chunked[2] is None
    assert_outputs_match(chunked, naive, 1e-10)

    # Only the head trains (hidden is a constant): its gradient still matches.
    weight = problem.weight.clone().requires_grad_(True)
    out = chunked_logit_objective(
        problem.hidden, weight, problem.labels, terms, 0.5, problem.teacher_hidden,
        problem.teacher_weight, vocab_size=problem.vocab, chunk_size=8,
    )  # fmt: skip
    out.total.backward()
    assert_rel_close(weight.grad, run_naive(problem, terms, 0.5, "logits")[2], 1e-10)


def test_teacher_gets_no_gradient_and_no_grad_mode_works():
    problem = make_problem()
    teacher_hidden = problem.teacher_hidden.clone().requires_grad_(True)
    teacher_weight = problem.teacher_weight.clone().requires_grad_(True)
    hidden = problem.hidden.clone().requires_grad_(True)
    args = (hidden, problem.weight, problem.labels, [LogitTerm("reverse_kl")], 1.0, teacher_hidden)
    out = chunked_logit_objective(*args, teacher_weight, vocab_size=problem.vocab, chunk_size=4)
    out.total.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert hidden.grad is not None
    with torch.no_grad():
        evaluated = chunked_logit_objective(*args, teacher_weight, vocab_size=problem.vocab)
    assert not evaluated.total.requires_grad
    assert_rel_close(evaluated.total, out.total.detach(), 1e-12)


def test_masked_rows_contribute_nothing():
    problem = make_problem()
    terms = [LogitTerm(kind) for kind in LOGIT_LOSS_KINDS]
    reference = run_chunked(problem, terms, 1.0, "logits", 4)
    masked = problem.labels == -100
    # Garbage (even nan/inf) in masked rows must not leak into the loss or the gradients.
    problem.hidden[masked] = float("nan")
    problem.teacher_hidden[masked] = float("inf")
    out, grad_hidden, grad_weight = run_chunked(problem, terms, 1.0, "logits", 4)
    assert_rel_close(out.total.detach(), reference[0].total.detach(), 1e-12)
    assert torch.all(grad_hidden[masked] == 0)
    assert_rel_close(grad_weight, reference[2], 1e-12)

    # The naive path takes logits: garbage logits in masked rows get a zero gradient.
    student, teacher = full_logits(make_problem())
    student = student.detach().clone()
    student[masked] = float("nan")
    teacher[masked] = float("inf")
    student.requires_grad_(True)
    naive = naive_logit_objective(
        student, problem.labels, terms, 1.0, teacher_logits=teacher, vocab_size=problem.vocab
    )
    naive.total.backward()
    assert_rel_close(naive.total.detach(), reference[0].total.detach(), 1e-12)
    assert torch.all(student.grad[masked] == 0) and torch.isfinite(student.grad).all()

    # A teacher cache may hold anything on masked rows (ids out of range, nan log-probs).
    topk_problem = make_problem()
    topk_reference = run_chunked(topk_problem, [LogitTerm("jsd")], 1.0, "topk", 4)
    topk_problem.topk[0][masked] = float("nan")
    topk_problem.topk[1][masked] = -1
    garbage = run_chunked(topk_problem, [LogitTerm("jsd")], 1.0, "topk", 4)
    assert_outputs_match(garbage, topk_reference, 1e-12)


@pytest.mark.parametrize("teacher", ["logits", "topk", None])
@pytest.mark.parametrize("path", ["chunked", "naive"])
def test_all_masked_batch_gives_zero_and_finite_zero_gradients(path, teacher):
    problem = make_problem(torch.float32)
    problem.labels[:] = -100
    terms = [] if teacher is None else [LogitTerm("forward_kl", temperature=2.0), LogitTerm("tv")]
    if path == "chunked":
        out, grad_hidden, grad_weight = run_chunked(problem, terms, 0.5, teacher, 8)
    else:
        out, grad_hidden, grad_weight = run_naive(problem, terms, 0.5, teacher)
    assert out.total.item() == 0.0 and out.num_tokens.item() == 0
    assert all(value.item() == 0.0 for value in out.terms.values())
    for grad in (grad_hidden, grad_weight):
        assert torch.isfinite(grad).all() and torch.all(grad == 0)


def test_bf16_teacher_head_and_bf16_student():
    problem = make_problem(torch.float32)
    terms = [LogitTerm("forward_kl", temperature=2.0)]
    reference = run_chunked(problem, terms, 0.5, "logits", 8)

    # bf16 teacher with an fp32 student: the math runs in float32, only the teacher logits round.
    problem_bf16_teacher = make_problem(torch.float32)
    problem_bf16_teacher.teacher_hidden = problem.teacher_hidden.bfloat16()
    problem_bf16_teacher.teacher_weight = problem.teacher_weight.bfloat16()
    chunked = run_chunked(problem_bf16_teacher, terms, 0.5, "logits", 8)
    naive = run_naive(problem_bf16_teacher, terms, 0.5, "logits")
    assert chunked[0].total.dtype == torch.float32
    assert_outputs_match(chunked, naive, 1e-5)
    assert_rel_close(chunked[0].total.detach(), reference[0].total.detach(), 5e-2)

    # A bf16 student gets bf16 gradients close to the float32 ones.
    hidden = problem.hidden.bfloat16().requires_grad_(True)
    weight = problem.weight.bfloat16().requires_grad_(True)
    out = chunked_logit_objective(
        hidden, weight, problem.labels, terms, 0.5, problem.teacher_hidden.bfloat16(),
        problem.teacher_weight.bfloat16(), vocab_size=problem.vocab, chunk_size=8,
    )  # fmt: skip
    out.total.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    assert_rel_close(hidden.grad.float(), reference[1], 5e-2)
    assert_rel_close(weight.grad.float(), reference[2], 5e-2)


def test_autocast_fp32_master_weights():
    problem = make_problem(torch.float32)
    terms = [LogitTerm("jsd", temperature=2.0)]
    reference = run_chunked(problem, terms, 0.5, "logits", 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_chunked(problem, terms, 0.5, "logits", 8)
    assert out[2].dtype == torch.float32 and torch.isfinite(out[2]).all()
    assert_rel_close(out[0].total.detach(), reference[0].total.detach(), 5e-2)
    assert_rel_close(out[2], reference[2], 5e-2)


# ---------------------------------------------------------------------------------------------
# The naive reference against hand-written float64 formulas.
# ---------------------------------------------------------------------------------------------


def full_logits(problem):
    return problem.hidden @ problem.weight.T, problem.teacher_hidden @ problem.teacher_weight.T


def test_naive_forward_kl_and_ce_match_torch_formulas():
    problem = make_problem()
    student, teacher = full_logits(problem)
    temperature = 2.0
    out = naive_logit_objective(
        student, problem.labels, [LogitTerm("forward_kl", weight=0.25, temperature=temperature)],
        0.5, teacher_logits=teacher, vocab_size=problem.vocab,
    )  # fmt: skip
    valid = problem.labels != -100
    ce = F.cross_entropy(
        student[:, : problem.vocab], problem.labels, ignore_index=-100, reduction="sum"
    )
    kl_per_token = F.kl_div(
        F.log_softmax(student[:, : problem.vocab] / temperature, -1),
        F.log_softmax(teacher[:, : problem.vocab] / temperature, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    kl = kl_per_token[valid].sum()
    torch.testing.assert_close(out.terms["ce"], ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.terms["forward_kl"], kl, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.total, 0.5 * ce + 0.25 * 4.0 * kl, rtol=1e-12, atol=0)
    assert out.num_tokens.item() == valid.sum().item()


def hand_written(kind, p, q, temperature_logits=None, beta=0.3, alpha=0.2):
    """Per-token float64 divergences from probabilities p (teacher) and q (student)."""

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    student, teacher = temperature_logits
    return ((student - teacher) ** 2).mean(-1)


@pytest.mark.parametrize("kind", LOGIT_LOSS_KINDS)
def test_naive_every_kind_matches_hand_written_formula(kind):
    problem = make_problem()
    student, teacher = full_logits(problem)
    temperature = 1.7
    out = naive_logit_objective(
        student, problem.labels, [LogitTerm(kind, temperature=temperature, beta=0.3, alpha=0.2)],
        0.0, teacher_logits=teacher, vocab_size=problem.vocab,
    )  # fmt: skip
    valid = problem.labels != -100
    scaled_student = student[valid, : problem.vocab] / temperature
    scaled_teacher = teacher[valid, : problem.vocab] / temperature
    expected = hand_written(
        kind,
        scaled_teacher.softmax(-1),
        scaled_student.softmax(-1),
        (scaled_student, scaled_teacher),
    ).sum()
    torch.testing.assert_close(out.terms[kind], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.total, temperature**2 * expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_naive_topk_matches_hand_written_bucket_formula(kind):
    """Buckets: the k cached ids plus one tail holding the rest, tempered as (k + 1)-way logits."""
    problem = make_problem()
    student, _ = full_logits(problem)
    temperature = 2.5
    out = naive_logit_objective(
        student, problem.labels, [LogitTerm(kind, temperature=temperature, beta=0.3, alpha=0.2)],
        0.0, teacher_topk=problem.topk, vocab_size=problem.vocab,
    )  # fmt: skip
    valid = problem.labels != -100
    top_logprobs, top_indices = (part[valid] for part in problem.topk)
    student_probs = student[valid, : problem.vocab].softmax(-1)
    student_top = student_probs.gather(-1, top_indices)
    student_buckets = torch.cat([student_top, 1 - student_top.sum(-1, keepdim=True)], -1)
    teacher_top = top_logprobs.exp()
    teacher_buckets = torch.cat([teacher_top, 1 - teacher_top.sum(-1, keepdim=True)], -1)

    def temper(buckets):
        powered = buckets ** (1 / temperature)
        return powered / powered.sum(-1, keepdim=True)

    expected = hand_written(kind, temper(teacher_buckets), temper(student_buckets)).sum()
    torch.testing.assert_close(out.terms[kind], expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# Identities.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", LOGIT_LOSS_KINDS)
def test_divergence_of_identical_distributions_is_zero(kind, temperature):
    logits = torch.randn(9, 40, dtype=torch.float64) * 3
    per_token = LOGIT_LOSSES[kind](logits, logits.clone(), temperature)
    assert per_token.shape == (9,)
    torch.testing.assert_close(per_token, torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)
    # Logits shifted by a constant are the same distribution (not for logit_mse, which sees logits).
    if kind != "logit_mse":
        shifted = LOGIT_LOSSES[kind](logits, logits + 5.0, temperature)
        torch.testing.assert_close(shifted, torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_topk_of_the_student_itself_gives_zero_at_any_temperature(kind):
    """The tail treatment is consistent: a teacher equal to the student gives 0 even at T != 1."""
    problem = make_problem()
    student, _ = full_logits(problem)
    own_topk = F.log_softmax(student[:, : problem.vocab], -1).topk(6, dim=-1)
    out = naive_logit_objective(
        student, problem.labels, [LogitTerm(kind, temperature=3.0)], 0.0,
        teacher_topk=tuple(own_topk), vocab_size=problem.vocab,
    )  # fmt: skip
    assert abs(out.terms[kind].item()) < 1e-12


def test_jsd_symmetric_at_half_and_endpoints_follow_trl():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(11, 30, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(11, 30, generator=gen, dtype=torch.float64) * 2
    torch.testing.assert_close(
        jsd(student, teacher, 1.5, beta=0.5), jsd(teacher, student, 1.5, beta=0.5)
    )
    # Not symmetric away from 0.5 (the test above could fail).
    assert not torch.allclose(jsd(student, teacher, beta=0.2), jsd(teacher, student, beta=0.2))
    # TRL convention: beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher).
    torch.testing.assert_close(
        jsd(student, teacher, 2.0, beta=0.0), forward_kl(student, teacher, 2.0)
    )
    torch.testing.assert_close(
        jsd(student, teacher, 2.0, beta=1.0), reverse_kl(student, teacher, 2.0)
    )
    # The interior approaches them after dividing by the vanishing mixture weight.
    eps = 1e-6
    torch.testing.assert_close(
        jsd(student, teacher, 2.0, beta=eps) / eps,
        forward_kl(student, teacher, 2.0),
        rtol=1e-4,
        atol=0,
    )
    torch.testing.assert_close(
        jsd(student, teacher, 2.0, beta=1 - eps) / eps,
        reverse_kl(student, teacher, 2.0),
        rtol=1e-4,
        atol=0,
    )
    assert torch.all(jsd(student, teacher, beta=eps) < 1e-4)


def test_skew_alpha_zero_is_plain_kl_and_alpha_one_is_zero():
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(7, 25, generator=gen, dtype=torch.float64)
    teacher = torch.randn(7, 25, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        skew_kl(student, teacher, 2.0, alpha=0.0), forward_kl(student, teacher, 2.0)
    )
    torch.testing.assert_close(
        skew_reverse_kl(student, teacher, 2.0, alpha=0.0), reverse_kl(student, teacher, 2.0)
    )
    # Continuous at 0 (the logaddexp branch) and zero at alpha = 1.
    torch.testing.assert_close(
        skew_kl(student, teacher, alpha=1e-9), forward_kl(student, teacher), rtol=1e-6, atol=0
    )
    zeros = torch.zeros(7, dtype=torch.float64)
    torch.testing.assert_close(skew_kl(student, teacher, alpha=1.0), zeros)
    torch.testing.assert_close(skew_reverse_kl(student, teacher, alpha=1.0), zeros)


def test_logit_mse_temperature_cancels_in_total():
    problem = make_problem()
    student, teacher = full_logits(problem)
    totals = [
        naive_logit_objective(
            student,
            problem.labels,
            [LogitTerm("logit_mse", temperature=t)],
            0.0,
            teacher_logits=teacher,
            vocab_size=problem.vocab,
        )  # fmt: skip
        for t in (1.0, 3.0)
    ]
    torch.testing.assert_close(totals[0].total, totals[1].total)
    torch.testing.assert_close(totals[1].terms["logit_mse"] * 9, totals[0].terms["logit_mse"])


def test_divergences_have_finite_gradients_with_zero_probabilities():
    """A teacher putting exactly zero mass on some tokens must not produce nan gradients."""
    student = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 10, dtype=torch.float64)
    teacher[:, :3] = float("-inf")
    for kind in ("forward_kl", "jsd", "skew_kl", "tv"):
        student.grad = None
        value = LOGIT_LOSSES[kind](student, teacher, 1.0).sum()
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all(), kind


# ---------------------------------------------------------------------------------------------
# Memory: the chunked path never allocates an [N x V] tensor.
# ---------------------------------------------------------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """Records the largest new storage (in elements) any op allocates, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            # Views and in-place ops return an input's storage: not an allocation.
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                numel = t.untyped_storage().nbytes() // t.element_size()
                self.largest_numel = max(self.largest_numel, numel)
        return out


@pytest.mark.parametrize("teacher", ["logits", "topk"])
def test_chunked_path_never_allocates_tokens_by_vocab(teacher):
    n, vocab, chunk_size = 2048, 8000, 256
    width = 16
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(n, width, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, width, generator=gen) * 0.3).requires_grad_(True)
    teacher_hidden = torch.randn(n, width, generator=gen)
    teacher_weight = torch.randn(vocab + 64, width, generator=gen) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    terms = [LogitTerm("forward_kl", temperature=2.0), LogitTerm("jsd")]
    if teacher == "logits":
        teacher_args = {"teacher_hidden": teacher_hidden, "teacher_head_weight": teacher_weight}
    else:
        with torch.no_grad():
            logprobs = F.log_softmax(teacher_hidden @ teacher_weight[:vocab].T, -1)
            teacher_args = {"teacher_topk": tuple(logprobs.topk(16, dim=-1))}

    with LargestAllocation() as chunked_mode:
        out = chunked_logit_objective(
            hidden,
            weight,
            labels,
            terms,
            0.5,
            vocab_size=vocab,
            chunk_size=chunk_size,
            **teacher_args,
        )
        out.total.backward()
    assert torch.isfinite(hidden.grad).all()
    assert chunked_mode.largest_numel <= chunk_size * (vocab + 64)
    assert chunked_mode.largest_numel < n * vocab

    # The same recorder sees the naive path allocate [N x V]: the assertion above can fail.
    naive_args = (
        {"teacher_logits": teacher_hidden @ teacher_weight.T}
        if teacher == "logits"
        else teacher_args
    )
    with LargestAllocation() as naive_mode:
        naive = naive_logit_objective(
            hidden @ weight.T, labels, terms, 0.5, vocab_size=vocab, **naive_args
        )
        naive.total.backward()
    assert naive_mode.largest_numel >= (labels != -100).sum().item() * vocab
    assert_rel_close(out.total.detach(), naive.total.detach(), 1e-5)


# ---------------------------------------------------------------------------------------------
# Errors name the problem, the value and the fix.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, "unknown logit loss kind 'kl'.*forward_kl, reverse_kl, jsd"),
        ({"kind": "forward_kl", "temperature": 0.0}, "temperature must be .* > 0, got 0.0"),
        ({"kind": "forward_kl", "temperature": -2.0}, "temperature must be .* > 0, got -2.0"),
        ({"kind": "jsd", "beta": 1.5}, r"beta must be in \[0, 1\], got 1.5"),
        ({"kind": "skew_kl", "alpha": -0.1}, r"alpha must be in \[0, 1\], got -0.1"),
        ({"kind": "tv", "weight": -1.0}, "weight must be .* >= 0, got -1.0"),
    ],
)
def test_logit_term_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogitTerm(**kwargs)


def test_objective_argument_errors():
    problem = make_problem()
    h, w, labels, vocab = problem.hidden, problem.weight, problem.labels, problem.vocab
    teacher = {
        "teacher_hidden": problem.teacher_hidden,
        "teacher_head_weight": problem.teacher_weight,
    }
    kl = [LogitTerm("forward_kl")]
    cases = [
        (lambda: chunked_logit_objective(h, w, labels, kl, 1.0), "need a teacher.*terms=\\(\\)"),
        (
            lambda: chunked_logit_objective(h, w, labels, [LogitTerm("logit_mse")], 1.0, teacher_topk=problem.topk, vocab_size=vocab),
            "logit_mse needs the teacher's full logits",
        ),
        (lambda: chunked_logit_objective(h, w, labels[:-1], [], 1.0), r"labels must be \[N\] = \[37\]"),
        (lambda: chunked_logit_objective(h, w[:, :-1], labels, [], 1.0), "hidden width 8 does not match"),
        (lambda: chunked_logit_objective(h, w, labels, kl, 1.0, **teacher), "pass vocab_size=len\\(tokenizer\\)"),
        (
            lambda: chunked_logit_objective(h, w, labels, kl, 1.0, vocab_size=54, **teacher),
            "vocab_size=54 exceeds the student head's 53 rows",
        ),
        (
            lambda: chunked_logit_objective(h, w, labels.clamp_min(0) + 45, [], 1.0, vocab_size=vocab),
            r"labels must be in \[0, 50\) on valid tokens, got values in \[45, ",
        ),
        (
            lambda: chunked_logit_objective(h, w, labels, kl, 1.0, teacher_topk=(problem.topk[0], problem.topk[1] + 49), vocab_size=vocab),
            "teacher_topk indices must be in",
        ),
        (lambda: chunked_logit_objective(h, w, labels, [], 1.0, chunk_size=0), "chunk_size must be an integer >= 1, got 0"),
        (
            lambda: chunked_logit_objective(h, w, labels, kl, 1.0, teacher_topk=problem.topk, vocab_size=vocab, **teacher),
            "not both",
        ),
        (lambda: chunked_logit_objective(h, w, labels, [], -1.0), "ce_weight must be .* >= 0, got -1.0"),
        (lambda: naive_logit_objective(h @ w.T, labels, kl, 1.0), "need a teacher"),
        (
            lambda: naive_logit_objective(h @ w.T, labels, kl, 1.0, teacher_logits=problem.teacher_hidden @ problem.teacher_weight.T),
            "pass vocab_size",
        ),
    ]  # fmt: skip
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ---------------------------------------------------------------------------------------------
# Layer maps, projections and hidden-state losses.
# ---------------------------------------------------------------------------------------------


def test_uniform_layer_map_values():
    assert uniform_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert uniform_layer_map(3, 28) == [(0, 8), (1, 18), (2, 27)]
    assert uniform_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    teacher_24_28 = [
        0,
        1,
        3,
        4,
        5,
        6,
        7,
        8,
        10,
        11,
        12,
        13,
        14,
        15,
        17,
        18,
        19,
        20,
        21,
        22,
        24,
        25,
        26,
        27,
    ]
    assert uniform_layer_map(24, 28) == list(enumerate(teacher_24_28))
    # Python's banker's round maps 10.5 -> 10 and 24.5 -> 24; the map rounds half up.
    bankers = [round((i + 1) * 28 / 24) - 1 for i in range(24)]
    assert bankers != teacher_24_28
    assert uniform_layer_map(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert uniform_layer_map(4, 1) == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_resolve_layer_map():
    assert resolve_layer_map("uniform", 3, 28) == uniform_layer_map(3, 28)
    assert resolve_layer_map([[0, 5], (2, 27)], 3, 28) == [(0, 5), (2, 27)]
    with pytest.raises(
        ValueError, match=r"pair \[3, 5\] is out of range.*0\.\.2.*0\.\.27.*'uniform'"
    ):
        resolve_layer_map([[0, 1], [3, 5]], 3, 28)
    with pytest.raises(ValueError, match=r"pair \[0, 28\] is out of range"):
        resolve_layer_map([[0, 28]], 3, 28)
    with pytest.raises(ValueError, match=r"pair \[-1, 2\] is out of range"):
        resolve_layer_map([[-1, 2]], 3, 28)
    with pytest.raises(ValueError, match="not a \\[student_layer, teacher_layer\\] pair"):
        resolve_layer_map([[0, 1, 2]], 3, 28)
    with pytest.raises(ValueError, match="'linear' is not known.*'uniform'"):
        resolve_layer_map("linear", 3, 28)
    with pytest.raises(ValueError, match="empty"):
        resolve_layer_map([], 3, 28)


def test_projection_width_mismatch_and_identity():
    layer_map = uniform_layer_map(2, 4)
    with pytest.raises(ValueError, match="width 8 differs from teacher width 12.*projection: true"):
        HiddenProjections(layer_map, 8, 12, enabled=False)
    identity = HiddenProjections(layer_map, 8, 8, enabled=False)
    assert len(list(identity.parameters())) == 0
    state = torch.randn(3, 8)
    assert identity(state, 1) is state
    projected = HiddenProjections(layer_map, 8, 12)
    assert projected(state, 0).shape == (3, 12)
    assert len(projected.projections) == len(layer_map)


def make_states(num_layers, width, batch=2, seq=5, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, seq, width, generator=gen).requires_grad_(requires_grad)
        for _ in range(num_layers)
    ]


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_zero_for_identical_states(kind):
    layer_map = uniform_layer_map(2, 2)
    states = make_states(2, 8)
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    total, count = hidden_state_loss(states, [s.clone() for s in states], layer_map,
                                     HiddenProjections(layer_map, 8, 8), kind, mask)  # fmt: skip
    assert abs(total.item()) < 1e-6 and count.item() == 7 and count.dtype == torch.int64


def test_hidden_mse_matches_formula_and_ignores_masked_tokens():
    layer_map = [(0, 1), (1, 3)]
    student = make_states(2, 8, seed=1)
    teacher = make_states(4, 8, seed=2)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    identity = HiddenProjections(layer_map, 8, 8)
    total, count = hidden_state_loss(student, teacher, layer_map, identity, "mse", mask)
    expected = sum(((student[s] - teacher[t]) ** 2).mean(-1)[mask].sum() for s, t in layer_map)
    torch.testing.assert_close(total, expected)
    assert count.item() == mask.sum().item()
    student[0][~mask] = float("nan")
    assert torch.isfinite(hidden_state_loss(student, teacher, layer_map, identity, "mse", mask)[0])
    cosine, _ = hidden_state_loss(student, teacher, layer_map, identity, "cosine", mask)
    expected_cosine = sum(
        (1 - F.cosine_similarity(student[s][mask], teacher[t][mask], dim=-1)).sum()
        for s, t in layer_map
    )
    torch.testing.assert_close(cosine, expected_cosine)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_gradients_flow_to_projections_and_student_only(kind):
    layer_map = uniform_layer_map(2, 4)
    student = make_states(2, 8, seed=4, requires_grad=True)
    teacher = make_states(4, 12, seed=5, requires_grad=True)
    projections = HiddenProjections(layer_map, 8, 12)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    total, _ = hidden_state_loss(student, teacher, layer_map, projections, kind, mask)
    total.backward()
    for projection in projections.projections:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert torch.all(student[0].grad[0, 0] == 0)
    assert all(t.grad is None for t in teacher)
    with pytest.raises(ValueError, match="unknown hidden loss kind 'l1'.*mse, cosine"):
        hidden_state_loss(student, teacher, layer_map, projections, "l1", mask)
    with pytest.raises(ValueError, match=r"layer pair \[1, 7\] is out of range"):
        bad_map = [(0, 1), (1, 7)]
        hidden_state_loss(student, teacher, bad_map, HiddenProjections(bad_map, 8, 12), kind, mask)


def test_bucket_tail_floor_keeps_reverse_divergences_finite():
    """A cache whose top-k sums to >= 1 (bf16 rounding) must not make reverse KL infinite."""
    student = torch.randn(3, 20, dtype=torch.float32, requires_grad=True)
    indices = torch.arange(4).expand(3, 4).contiguous()
    logprobs = torch.full((3, 4), math.log(0.26))  # sums to 1.04
    out = naive_logit_objective(
        student, torch.zeros(3, dtype=torch.int64), [LogitTerm("reverse_kl", temperature=2.0)], 0.0,
        teacher_topk=(logprobs, indices),
    )  # fmt: skip
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(student.grad).all()
