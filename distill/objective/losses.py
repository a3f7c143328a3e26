"""Distillation objectives: logit divergences, cross-entropy and hidden-state losses.

Everything here is a pure function of tensors (plus one small ``nn.Module`` holding the learned
hidden-state projections). Conventions shared by every function:

- Inputs are flattened and aligned: row ``i`` of the student hidden states (after the final norm)
  predicts ``labels[i]``; ``labels == -100`` marks rows that contribute nothing to any term.
- Losses return SUMS over valid tokens plus the valid-token count; the training loop divides by the
  global token count so gradient accumulation and data parallelism weigh every token equally.
- Head weights are ``[V_rows, H]`` (no bias). Rows at index ``>= vocab_size`` are padding (Qwen pads
  151,936 tokens to 152,064 rows) and are sliced off; student and teacher may be padded differently.
- Softmax and divergence math runs in float32 (float64 when the inputs are float64), whatever the
  dtype of the heads (a bf16 teacher head is fine).

Logit-term conventions:

- ``total = sum over valid tokens of ce_weight * CE + sum_k weight_k * T_k**2 * term_k``. CE is always
  at temperature 1 on the student's logits. The T**2 factor keeps gradient magnitudes comparable across
  temperatures (Hinton et al.); it is applied to every kind, including ``tv`` and ``logit_mse``.
- ``logit_mse`` is the mean over the vocabulary of ``(z_s / T - z_t / T)**2``; with the T**2 factor the
  contribution to ``total`` is the plain logit MSE, independent of T (only the logged, unweighted term
  shrinks by 1/T**2).
- ``jsd`` follows TRL's ``generalized_jsd_loss``: with ``M = beta * P_teacher + (1 - beta) * Q_student``,
  ``JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)`` for ``0 < beta < 1``, and the endpoints are
  defined as the two KLs: ``beta == 0`` gives forward ``KL(P || Q)``, ``beta == 1`` reverse
  ``KL(Q || P)``. The interior is not continuous with them: ``JSD_beta / beta -> KL(P || Q)`` as
  ``beta -> 0`` and ``JSD_beta / (1 - beta) -> KL(Q || P)`` as ``beta -> 1``.
- ``skew_kl`` is ``KL(P || alpha P + (1 - alpha) Q)`` and ``skew_reverse_kl`` is
  ``KL(Q || alpha Q + (1 - alpha) P)`` (DistiLLM); ``alpha == 0`` is the plain KL, ``alpha == 1`` is 0.
- ``tv`` is ``0.5 * sum |P - Q|``.

Top-k teacher (an offline cache): see :func:`topk_bucket_logprobs` for the tail-mass treatment, and
:func:`sampled_tail_kl` for the tail samples that make the forward KL unbiased.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F

from distill.specs import LogitTerm

IGNORE_INDEX = -100
HIDDEN_LOSS_KINDS = ("mse", "cosine")


@dataclass
class ObjectiveOutput:
    """Result of a logit objective: sums over valid tokens, not means."""

    total: torch.Tensor
    """Differentiable scalar: sum over valid tokens of ce_weight*CE + sum_k weight_k*T_k**2*term_k."""
    terms: dict[str, torch.Tensor]
    """Detached, unweighted per-term sums over valid tokens: "ce" and one key per term."""
    num_tokens: torch.Tensor
    """int64 scalar: number of valid (label != -100) tokens."""


# --------------------------------------------------------------------------------------------
# Per-token losses. Each takes logits [N, V] of student and teacher and returns [N] in float32
# (float64 for float64 inputs). Log-probabilities are valid logits too, which is how the top-k
# path reuses these functions on its (k + 1)-bucket distributions.
# --------------------------------------------------------------------------------------------


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 heads are upcast)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _tempered_logprobs(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _math_dtype(student_logits, teacher_logits)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return student, teacher


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities, with 0 * log 0 = 0.

    The ``where`` sits on the log-ratio, not on the product, so rows where ``a`` is exactly 0 give a
    zero gradient instead of ``0 * inf = nan`` in backward.
    """
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b); the endpoints are exact (no log 0)."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(P_teacher || Q_student) per token at temperature T."""
    student, teacher = _tempered_logprobs(student_logits, teacher_logits, temperature)
    return _kl(teacher, student)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(Q_student || P_teacher) per token at temperature T."""
    student, teacher = _tempered_logprobs(student_logits, teacher_logits, temperature)
    return _kl(student, teacher)


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized JSD per token (TRL convention, see the module docstring).

    ``M = beta * P + (1 - beta) * Q``; ``beta * KL(P || M) + (1 - beta) * KL(Q || M)``;
    ``beta == 0`` is defined as KL(P || Q) and ``beta == 1`` as KL(Q || P).
    """
    student, teacher = _tempered_logprobs(student_logits, teacher_logits, temperature)
    if beta == 0.0:
        return _kl(teacher, student)
    if beta == 1.0:
        return _kl(student, teacher)
    mixture = _log_mixture(teacher, student, beta)
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew KL (DistiLLM) per token: KL(P || alpha * P + (1 - alpha) * Q)."""
    student, teacher = _tempered_logprobs(student_logits, teacher_logits, temperature)
    return _kl(teacher, _log_mixture(teacher, student, alpha))


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM) per token: KL(Q || alpha * Q + (1 - alpha) * P)."""
    student, teacher = _tempered_logprobs(student_logits, teacher_logits, temperature)
    return _kl(student, _log_mixture(student, teacher, alpha))


def tv(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance per token: 0.5 * sum |P - Q| at temperature T."""
    student, teacher = _tempered_logprobs(student_logits, teacher_logits, temperature)
    return 0.5 * (student.exp() - teacher.exp()).abs().sum(-1)


def logit_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over the vocabulary of (z_s / T - z_t / T)**2 per token (raw logits, not log-probs)."""
    dtype = _math_dtype(student_logits, teacher_logits)
    diff = (student_logits.to(dtype) - teacher_logits.to(dtype)) / temperature
    return diff.square().mean(-1)


LOGIT_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": tv,
    "logit_mse": logit_mse,
}

# The LogitTerm fields, beyond temperature, that each kind's function takes.
_KIND_PARAMS = {"jsd": ("beta",), "skew_kl": ("alpha",), "skew_reverse_kl": ("alpha",)}


def term_per_token(
    term: LogitTerm, student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """The unweighted per-token value [N] of one term (no T**2, no weight)."""
    params = {name: getattr(term, name) for name in _KIND_PARAMS.get(term.kind, ())}
    return LOGIT_LOSSES[term.kind](student_logits, teacher_logits, term.temperature, **params)


def objective_term_names(terms: Sequence[LogitTerm]) -> list[str]:
    """Keys of ``ObjectiveOutput.terms``: "ce", then each kind, suffixed _1, _2... if repeated."""
    counts = Counter(term.kind for term in terms)
    seen: Counter[str] = Counter()
    names = ["ce"]
    for term in terms:
        if counts[term.kind] > 1:
            seen[term.kind] += 1
            names.append(f"{term.kind}_{seen[term.kind]}")
        else:
            names.append(term.kind)
    return names


def topk_bucket_logprobs(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-grain both distributions onto the teacher's top-k tokens plus one tail bucket.

    The cache holds the teacher's top-k log-probabilities at temperature 1. Both distributions are
    mapped, at temperature 1, onto k + 1 buckets: the k cached token ids and a "tail" bucket holding
    all remaining mass. Teacher: ``log p_i`` for the k ids, tail ``1 - sum_i p_i`` (floored at the
    dtype's machine epsilon, since the cache's rounding makes smaller values noise and a zero would
    make reverse divergences infinite). Student: its exact full-vocabulary log-softmax at the k ids
    and the logsumexp of its other logits as the tail. The returned [N, k + 1] log-probabilities are
    then treated as the logits of a (k + 1)-way distribution by every loss kind, so temperature T
    tempers buckets (the tail acts as one token: weight ``tail ** (1 / T)``), identically for both
    sides. Consequences: identical teacher and student give exactly 0 at every T; at T = 1 each
    divergence is the exact divergence between the coarse-grained distributions (a lower bound of the
    full-vocabulary one). The top-k ids of a row must be distinct (as ``torch.topk`` gives).
    """
    dtype = _math_dtype(student_logits, teacher_logprobs)
    logits = student_logits.to(dtype)
    log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
    student_top = logits.gather(-1, teacher_indices) - log_normalizer
    # A finite fill (not -inf) keeps the tail's gradient finite even when k covers the vocabulary.
    outside_topk = logits.scatter(-1, teacher_indices, torch.finfo(dtype).min)
    student_tail = torch.logsumexp(outside_topk, dim=-1, keepdim=True) - log_normalizer
    student_tail = student_tail.clamp_min(math.log(torch.finfo(dtype).tiny))

    return torch.cat([student_top, student_tail], -1), teacher_bucket_logprobs(
        teacher_logprobs, dtype
    )


def teacher_bucket_logprobs(teacher_logprobs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's side of :func:`topk_bucket_logprobs`: [N, k + 1] log-probabilities, the
    tail ``1 - sum_i p_i`` floored at the dtype's machine epsilon."""
    teacher_top = teacher_logprobs.to(dtype)
    teacher_tail_mass = -torch.expm1(torch.logsumexp(teacher_top, dim=-1, keepdim=True))
    teacher_tail = teacher_tail_mass.clamp_min(torch.finfo(dtype).eps).log()
    return torch.cat([teacher_top, teacher_tail], -1)


def sampled_tail_kl(
    student_sample_logprobs: torch.Tensor,
    student_log_tail: torch.Tensor,
    teacher_log_tail: torch.Tensor,
    tail_entropy: torch.Tensor,
) -> torch.Tensor:
    """[N] estimate of what the k + 1 buckets leave out of the forward KL at T = 1.

    By the chain rule of the KL, ``KL(P || Q) = KL over the buckets + P_tail KL(P~ || Q~)``, with
    P~ and Q~ the two distributions restricted to the tail (the ids outside the top k) and
    renormalised. With M tokens s_m drawn from P~ and its entropy ``tail_entropy`` [N],
    ``P_tail (mean_m -log Q~(s_m) - H(P~))`` estimates the second part without bias; so does its
    gradient, ``P_tail (Q~_j - count_j / M)`` on tail logits, which added to the buckets' gives
    ``Q_j - P_j`` in expectation: the full-vocabulary forward KL's gradient.
    ``student_sample_logprobs`` [N, M] are the student's log Q(s_m); ``student_log_tail`` and
    ``teacher_log_tail`` [N] the tail buckets' log-masses (from :func:`topk_bucket_logprobs`).
    """
    dtype = student_sample_logprobs.dtype
    cross_entropy = student_log_tail - student_sample_logprobs.mean(-1)
    return teacher_log_tail.to(dtype).exp() * (cross_entropy - tail_entropy.to(dtype))


def corrects_tail(term: LogitTerm) -> bool:
    """Terms whose tail the cache's samples refine: the forward KL at T = 1 (a sample of P~ says
    nothing about another temperature's tail, nor about the student-weighted divergences)."""
    return term.kind == "forward_kl" and term.temperature == 1.0


def _objective_on_rows(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    terms: Sequence[LogitTerm],
    ce_weight: float,
    teacher_logits: torch.Tensor | None,
    teacher_topk: tuple[torch.Tensor, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted total, detached [1 + len(terms)] unweighted sums) over rows that are all valid.

    Shared by the naive and the chunked path: they differ in how logits and gradients are produced,
    not in the math.
    """
    dtype = _math_dtype(student_logits)
    ce = F.cross_entropy(student_logits.to(dtype), labels, reduction="sum")
    if teacher_topk is not None:
        student_dist, teacher_dist = topk_bucket_logprobs(student_logits, *teacher_topk[:2])
    else:
        student_dist, teacher_dist = student_logits, teacher_logits
    term_sums = [term_per_token(term, student_dist, teacher_dist).sum() for term in terms]
    if teacher_topk is not None and len(teacher_topk) == 4:
        logprobs = F.log_softmax(student_logits.to(student_dist.dtype), dim=-1)
        samples = logprobs.gather(-1, teacher_topk[2])
        tail = sampled_tail_kl(
            samples, student_dist[:, -1], teacher_dist[:, -1], teacher_topk[3]
        ).sum()
        term_sums = [v + tail if corrects_tail(t) else v for t, v in zip(terms, term_sums)]
    total = ce_weight * ce
    for term, term_sum in zip(terms, term_sums):
        total = total + term.weight * term.temperature**2 * term_sum
    return total, torch.stack([ce, *term_sums]).detach().to(dtype)


# --------------------------------------------------------------------------------------------
# Argument checks shared by both paths. Errors name the value and the fix.
# --------------------------------------------------------------------------------------------


def check_logit_terms(terms: Sequence[LogitTerm], ce_weight: float, teacher: str | None) -> None:
    """Raise ValueError if the terms cannot run with this teacher ("logits", "topk" or None).

    Both objectives call it; a trainer can call it at start-up to fail before loading models.
    """
    for term in terms:
        if not isinstance(term, LogitTerm):
            raise ValueError(f"terms must be LogitTerm instances, got {term!r}")
    if not (math.isfinite(ce_weight) and ce_weight >= 0):
        raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight}")
    if terms and teacher is None:
        raise ValueError(
            f"logit terms {[term.kind for term in terms]} need a teacher: pass teacher_hidden and "
            "teacher_head_weight (or teacher_logits), or teacher_topk; for CE-only training pass "
            "terms=()"
        )
    if teacher == "topk" and any(term.kind == "logit_mse" for term in terms):
        raise ValueError(
            "logit_mse needs the teacher's full logits, but only top-k log-probabilities were "
            "given (teacher_topk); use a divergence kind (forward_kl, reverse_kl, jsd, skew_kl, "
            "skew_reverse_kl, tv) with a teacher cache, or run the teacher online"
        )


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _resolve_vocab(vocab_size: int | None, student_rows: int, teacher_rows: int | None) -> int:
    """Number of real vocabulary rows; head rows at index >= this are padding."""
    if vocab_size is None:
        if teacher_rows is not None and teacher_rows != student_rows:
            raise ValueError(
                f"student head has {student_rows} rows and teacher head {teacher_rows}; pass "
                "vocab_size=len(tokenizer) so the padding rows of both are ignored"
            )
        return student_rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    rows = {"student": student_rows}
    if teacher_rows is not None:
        rows["teacher"] = teacher_rows
    for side, side_rows in rows.items():
        if vocab_size > side_rows:
            raise ValueError(
                f"vocab_size={vocab_size} exceeds the {side} head's {side_rows} rows; pass the "
                "tokenizer length shared by both models (heads may only be padded, not shorter)"
            )
    return int(vocab_size)


def _check_labels(labels: torch.Tensor, num_rows: int, what: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != num_rows:
        raise ValueError(
            f"labels must be [N] = [{num_rows}] to match {what}, got {list(labels.shape)}; "
            "flatten [B, S] labels and the hidden states the same way"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")


def _check_topk(
    teacher_topk: tuple[torch.Tensor, ...], num_rows: int, vocab: int
) -> tuple[torch.Tensor, ...]:
    """The top-k teacher: (logprobs [N, k], indices [N, k]), plus (tail sample ids [N, M], tail
    entropy [N]) when the cache holds tail samples."""
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) not in (2, 4):
        raise ValueError(
            "teacher_topk must be a tuple (logprobs [N, k], indices [N, k]), or with the tail "
            "samples (logprobs, indices, tail_ids [N, M], tail_entropy [N])"
        )
    logprobs, indices = teacher_topk[:2]
    if logprobs.dim() != 2 or logprobs.shape != indices.shape or logprobs.shape[0] != num_rows:
        raise ValueError(
            f"teacher_topk logprobs {list(logprobs.shape)} and indices {list(indices.shape)} must "
            f"both be [N, k] with N = {num_rows} rows aligned with labels"
        )
    if not logprobs.dtype.is_floating_point or indices.dtype.is_floating_point:
        raise ValueError(
            f"teacher_topk must be (float logprobs, integer indices), got ({logprobs.dtype}, "
            f"{indices.dtype})"
        )
    k = logprobs.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk has k={k}; k must be in [1, vocab_size={vocab}]")
    if len(teacher_topk) == 2:
        return logprobs, indices
    tail_ids, tail_entropy = teacher_topk[2:]
    if (
        tail_ids.dim() != 2
        or tail_ids.shape[0] != num_rows
        or tail_ids.dtype.is_floating_point
        or tail_entropy.shape != (num_rows,)
        or not tail_entropy.dtype.is_floating_point
    ):
        raise ValueError(
            f"teacher_topk tail samples must be integer ids [N, M] and float entropies [N] with "
            f"N = {num_rows}, got {tail_ids.dtype} {list(tail_ids.shape)} and "
            f"{tail_entropy.dtype} {list(tail_entropy.shape)}"
        )
    return logprobs, indices, tail_ids, tail_entropy


def valid_topk(
    teacher_topk: tuple[torch.Tensor, ...], rows: torch.Tensor, num_rows: int, vocab: int
) -> tuple[torch.Tensor, ...]:
    """The top-k teacher (checked) on the valid rows: values detached, ids as int64."""
    topk = tuple(
        _select_rows(t.detach(), rows)
        if t.dtype.is_floating_point
        else _select_rows(t, rows).long()
        for t in _check_topk(teacher_topk, num_rows, vocab)
    )
    for name, index in zip(("indices", "tail_ids"), topk[1:3]):
        _check_index_range(
            f"teacher_topk {name}", index, vocab, "was the cache written with the same tokenizer?"
        )
    return topk


def _check_index_range(name: str, index: torch.Tensor, vocab: int, fix: str) -> None:
    """One host sync; out-of-range ids would otherwise be a device assert or silent padding reads."""
    if index.numel() == 0:
        return
    low, high = torch.stack([index.min(), index.max()]).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(
            f"{name} must be in [0, {vocab}) on valid tokens, got values in [{low}, {high}]; {fix}"
        )


def _valid_rows(labels: torch.Tensor) -> torch.Tensor:
    """Indices of valid rows (one host sync). Working on these only skips masked tokens entirely."""
    return (labels != IGNORE_INDEX).nonzero().squeeze(1)


def _select_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select(0, rows)``, or ``tensor`` itself when every row is valid (packed
    pretraining batches): no copy of the hidden states or logits, and no scatter in backward."""
    return tensor if rows.numel() == tensor.shape[0] else tensor.index_select(0, rows)


def _make_output(
    total: torch.Tensor, sums: torch.Tensor, terms: Sequence[LogitTerm], rows: torch.Tensor
) -> ObjectiveOutput:
    names = objective_term_names(terms)
    return ObjectiveOutput(
        total=total,
        terms={name: sums[i] for i, name in enumerate(names)},
        num_tokens=torch.tensor(rows.numel(), dtype=torch.int64, device=rows.device),
    )


# --------------------------------------------------------------------------------------------
# The naive reference: full [N, V] logits, plain autograd.
# --------------------------------------------------------------------------------------------


def naive_logit_objective(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    terms: Sequence[LogitTerm],
    ce_weight: float,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, ...] | None = None,
    vocab_size: int | None = None,
) -> ObjectiveOutput:
    """Full-vocabulary reference of :func:`chunked_logit_objective` (same semantics).

    Holds [N, V] logits and several float32 copies: for tests and the benchmark's baseline only.
    """
    terms = tuple(terms)
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("pass either teacher_logits or teacher_topk, not both")
    teacher = (
        "logits" if teacher_logits is not None else "topk" if teacher_topk is not None else None
    )
    check_logit_terms(terms, ce_weight, teacher)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {list(student_logits.shape)}")
    num_rows = student_logits.shape[0]
    _check_labels(labels, num_rows, "student_logits")
    if teacher_logits is not None and (
        teacher_logits.dim() != 2 or teacher_logits.shape[0] != num_rows
    ):
        raise ValueError(
            f"teacher_logits must be [N, V] with N = {num_rows}, got {list(teacher_logits.shape)}"
        )
    teacher_rows = teacher_logits.shape[1] if teacher_logits is not None else None
    vocab = _resolve_vocab(vocab_size, student_logits.shape[1], teacher_rows)

    rows = _valid_rows(labels)
    valid_labels = _select_rows(labels, rows).long()
    _check_index_range("labels", valid_labels, vocab, "labels must be token ids or -100")
    student = _select_rows(student_logits[:, :vocab], rows)
    teacher_logits_valid = None
    if teacher_logits is not None:
        teacher_logits_valid = _select_rows(teacher_logits[:, :vocab], rows).detach()
    topk_valid = None
    if teacher_topk is not None:
        topk_valid = valid_topk(teacher_topk, rows, num_rows, vocab)
    total, sums = _objective_on_rows(
        student, valid_labels, terms, float(ce_weight), teacher_logits_valid, topk_valid
    )
    return _make_output(total, sums, terms, rows)


# --------------------------------------------------------------------------------------------
# The chunked path: loss and gradient computed together in the forward, chunk by chunk.
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Hidden-state losses and layer mapping. Layer indices are 0-based: layer i's output is
# Hugging Face's hidden_states[i + 1] (hidden_states[0] is the embedding output).
# --------------------------------------------------------------------------------------------
