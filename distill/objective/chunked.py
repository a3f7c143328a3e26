"""The memory-efficient logit objective: CE and distillation terms computed from final hidden states
and both lm_head weights, chunk by chunk, with the gradient computed in the forward pass. No
``[tokens x vocab]`` logits ever exist for either model: peak extra memory is O(chunk x vocab).

Semantics are those of :func:`distill.objective.losses.naive_logit_objective` (the reference the tests
compare against in value and gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from distill.objective.losses import (
    LogitTerm,
    ObjectiveOutput,
    _check_chunk_size,
    _check_index_range,
    _check_labels,
    _make_output,
    _math_dtype,
    _objective_on_rows,
    _resolve_vocab,
    _select_rows,
    _valid_rows,
    check_logit_terms,
    corrects_tail,
    sampled_tail_kl,
    teacher_bucket_logprobs,
    term_per_token,
    valid_topk,
)


def _has_closed_form_gradient(
    terms: Sequence[LogitTerm], teacher_topk: tuple[torch.Tensor, ...] | None
) -> bool:
    """CE plus forward-KL terms on full teacher logits (the default objective): hand-written grad."""
    return teacher_topk is None and all(term.kind == "forward_kl" for term in terms)


def _ce_forward_kl_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    terms: Sequence[LogitTerm],
    ce_weight: float,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of CE + forward-KL terms from hidden states, d(total)/d(logits) in closed form.

    Same values as :func:`_objective_on_rows` on the chunk's logits. d CE / dz = Q - onehot(label)
    and d (T**2 KL(P_T || Q_T)) / dz = T (Q_T - P_T), so the gradient is
    ``(ce_weight + sum of T = 1 weights) Q - ce_weight onehot - sum_k w_k T_k P_k
    + sum over T != 1 terms of w_k T_k Q_k``. No autograd graph; one student log-softmax and one
    exp serve CE and every T = 1 term (about half the full-vocabulary passes of autograd); the
    logits are made here so each [C, V] buffer is freed as soon as it is used (three or four
    alive at most). Returns (total, sums, gradient in the logits' dtype or None).
    """
    logits = hidden @ weight.T
    logits_dtype = logits.dtype
    dtype = _math_dtype(logits)
    if terms:
        dtype = torch.promote_types(dtype, _math_dtype(teacher_hidden, teacher_weight))
    log_q = F.log_softmax(logits.to(dtype), dim=-1)
    del logits
    teacher_logits = teacher_hidden @ teacher_weight.T if terms else None
    label_index = labels.unsqueeze(1)
    ce = -log_q.gather(1, label_index).sum()
    total = ce_weight * ce
    sums = [ce]
    grad_from_terms = None  # the terms' gradient but for their T = 1 student part
    for index, term in enumerate(terms):
        temperature = term.temperature
        last_term = index == len(terms) - 1
        teacher = teacher_logits.to(dtype, copy=not last_term)  # the last term may consume them
        if last_term:
            del teacher_logits
        if temperature != 1.0:
            teacher.div_(temperature)
        log_p = F.log_softmax(teacher, dim=-1)
        del teacher
        # A -inf teacher logit has p = 0: flooring its log-probability at the dtype's lowest finite
        # value keeps p * (log p - log q) at 0 (0 log 0 = 0, as _kl) instead of nan.
        log_p.clamp_min_(torch.finfo(dtype).min)
        # log_softmax(log_q / T) == log_softmax(z / T): the row shift cancels
        log_q_t = log_q if temperature == 1.0 else F.log_softmax(log_q / temperature, dim=-1)
        p = log_p.exp()
        kl = torch.dot(p.flatten(), log_p.sub_(log_q_t).flatten())
        del log_p
        sums.append(kl)
        total = total + term.weight * temperature**2 * kl
        if need_grad and term.weight != 0:
            if temperature != 1.0:
                p.sub_(log_q_t.exp_())
            contribution = p.mul_(-term.weight * temperature)
            if grad_from_terms is None:
                grad_from_terms = contribution
            else:
                grad_from_terms.add_(contribution)
        del p, log_q_t
    grad = None
    if need_grad:
        weight_on_q = ce_weight + sum(t.weight for t in terms if t.temperature == 1.0)
        grad = log_q.exp_().mul_(weight_on_q)
        if grad_from_terms is not None:
            grad.add_(grad_from_terms)
        del grad_from_terms
        grad.scatter_add_(1, label_index, torch.full_like(label_index, -ce_weight, dtype=dtype))
        grad = grad.to(logits_dtype)
    return (
        total,
        torch.stack(sums).detach().to(torch.promote_types(torch.float32, logits_dtype)),
        grad,
    )


def _topk_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    terms: Sequence[LogitTerm],
    ce_weight: float,
    teacher: tuple[torch.Tensor, ...],
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of CE + any divergence terms against a top-k teacher (the cache), with
    d(total)/d(logits) by hand.

    Same values as :func:`_objective_on_rows` with ``teacher_topk``. The terms only see the
    [C, k + 1] bucket log-probabilities s, so autograd runs on those alone; with g = d terms / d s,
    the chain rule through s_i = z_i - lse(z) (top-k ids) and s_tail = log(sum of q outside the
    top k) gives d/dz_j = g_j [j in top k] + g_tail q_j / Q_tail [j outside] - q_j sum_b g_b. One
    [C, V] buffer (q, which becomes the gradient) instead of autograd's graph over the vocabulary.
    With tail samples, the forward-KL terms' :func:`sampled_tail_kl` adds
    w P_tail (q_j / Q_tail [j outside] - count_j / M).
    """
    teacher_logprobs, teacher_indices = teacher[:2]
    logits = hidden @ weight.T
    logits_dtype = logits.dtype
    dtype = _math_dtype(logits, teacher_logprobs)
    log_q = F.log_softmax(logits.to(dtype), dim=-1)
    del logits
    label_index = labels.unsqueeze(1)
    ce = -log_q.gather(1, label_index).sum()
    student_top = log_q.gather(1, teacher_indices)
    tail_ids = teacher[2] if len(teacher) == 4 else None
    student_samples = log_q.gather(1, tail_ids) if tail_ids is not None else None
    q = log_q.exp_()
    del log_q
    # The tail's mass summed over the ids outside the top k, not 1 - sum(top k) (that cancels
    # catastrophically for a confident student): zeroed in place and restored, no [C, V] copy.
    q_top = q.gather(1, teacher_indices)
    tail_mass = q.scatter_(1, teacher_indices, 0.0).sum(1, keepdim=True)
    q.scatter_(1, teacher_indices, q_top)
    tiny = torch.finfo(dtype).tiny
    student = torch.cat([student_top, tail_mass.clamp_min(tiny).log()], 1)
    buckets = teacher_bucket_logprobs(teacher_logprobs, dtype)
    student.requires_grad_(need_grad)
    with torch.enable_grad():
        sums = [term_per_token(term, student, buckets).sum() for term in terms]
        zero = torch.zeros((), dtype=dtype, device=student.device)
        terms_total = sum((t.weight * t.temperature**2 * v for t, v in zip(terms, sums)), zero)
    sums = [v.detach() for v in sums]
    total = ce_weight * ce + terms_total.detach()
    teacher_tail = buckets[:, -1:].exp()  # P_tail [C, 1]
    tail_weight = 0.0  # sum of the weights of the terms the samples correct
    if tail_ids is not None:
        tail = sampled_tail_kl(
            student_samples, student[:, -1].detach(), buckets[:, -1], teacher[3]
        ).sum()
        sums = [v + tail if corrects_tail(t) else v for t, v in zip(terms, sums)]
        tail_weight = sum(t.weight for t in terms if corrects_tail(t))
        total = total + tail_weight * tail
    grad = None
    if need_grad:
        g = torch.autograd.grad(terms_total, student)[0] if terms_total.requires_grad else None
        if g is None:
            g = torch.zeros_like(student)
        outside = g[:, -1:] + tail_weight * teacher_tail if tail_weight else g[:, -1:]
        outside = outside / tail_mass.clamp_min(tiny)  # d/dz_j per unit q_j, j outside the top k
        grad = q.mul_(ce_weight - g.sum(1, keepdim=True) + outside)
        grad.scatter_add_(1, teacher_indices, g[:, :-1] - outside * q_top)
        if tail_weight:
            per_sample = teacher_tail * (-tail_weight / tail_ids.shape[1])
            grad.scatter_add_(1, tail_ids, per_sample.expand(tail_ids.shape).to(dtype))
        grad.scatter_add_(1, label_index, torch.full_like(label_index, -ce_weight, dtype=dtype))
        grad = grad.to(logits_dtype)
    stacked = torch.stack([ce, *sums])
    return total, stacked.to(torch.promote_types(torch.float32, logits_dtype)), grad


class _ChunkedLogitObjective(torch.autograd.Function):
    """Fused head + objective over valid rows (Liger-style fused linear loss).

    Forward walks the rows in chunks; per chunk it applies both heads, computes the objective with
    autograd on the chunk's logits only, and turns d(loss)/d(logits) into the chunk's share of the
    hidden-state and head-weight gradients right away. Only one chunk's [C, V] tensors are ever alive.
    Backward just scales the stored gradients by grad_output.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        teacher_topk: tuple[torch.Tensor, ...] | None,
        terms: tuple[LogitTerm, ...],
        ce_weight: float,
        chunk_size: int,
        need_hidden_grad: bool,
        need_weight_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Accumulate in float32 (float64 for float64 heads) even when the head is bf16: summing
        # many chunks' weight gradients in bf16 would lose precision.
        acc_dtype = _math_dtype(weight)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        sums = torch.zeros(1 + len(terms), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
            if need_weight_grad
            else None
        )
        need_grad = need_hidden_grad or need_weight_grad

        closed_form = _has_closed_form_gradient(terms, teacher_topk)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            chunk_hidden = hidden[start:end].to(weight.dtype)
            chunk_teacher_hidden = None
            if teacher_hidden is not None:
                chunk_teacher_hidden = teacher_hidden[start:end].to(teacher_weight.dtype)
            if teacher_topk is not None:
                topk = tuple(t[start:end] for t in teacher_topk)
                chunk_total, chunk_sums, grad_logits = _topk_chunk(
                    chunk_hidden, weight, labels[start:end], terms, ce_weight, topk, need_grad
                )
            elif closed_form:
                chunk_total, chunk_sums, grad_logits = _ce_forward_kl_chunk(
                    chunk_hidden,
                    weight,
                    labels[start:end],
                    terms,
                    ce_weight,
                    chunk_teacher_hidden,
                    teacher_weight,
                    need_grad,
                )
            else:
                teacher_logits = None
                if chunk_teacher_hidden is not None:
                    teacher_logits = chunk_teacher_hidden @ teacher_weight.T
                # The logits are a leaf: autograd stops here and the head matmuls are done by hand.
                logits = (chunk_hidden @ weight.T).requires_grad_(need_grad)
                with torch.enable_grad():
                    chunk_total, chunk_sums = _objective_on_rows(
                        logits, labels[start:end], terms, ce_weight, teacher_logits, None
                    )
                if need_grad:
                    (grad_logits,) = torch.autograd.grad(chunk_total, logits)
                del logits, teacher_logits
            if need_grad:
                if need_hidden_grad:
                    grad_hidden[start:end] = grad_logits @ weight
                if need_weight_grad:
                    if grad_logits.dtype == acc_dtype:
                        grad_weight.addmm_(grad_logits.T, chunk_hidden)
                    else:
                        grad_weight += (grad_logits.T @ chunk_hidden).to(acc_dtype)
            total += chunk_total.detach()
            sums += chunk_sums
            grad_logits = None  # free this chunk's [C, V] gradient before the next chunk's logits

        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor, _grad_sums: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return (grad_hidden, grad_weight) + (None,) * 9


def chunked_logit_objective(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    labels: torch.Tensor,
    terms: Sequence[LogitTerm],
    ce_weight: float,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, ...] | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    all_valid: bool = False,
) -> ObjectiveOutput:
    """CE plus logit-distillation terms from hidden states, never holding [N, V] logits.

    ``student_hidden`` [N, Hs] (after the final norm), ``student_head_weight`` [Vs_rows, Hs],
    ``labels`` [N] with -100 for masked rows. Teacher: ``teacher_hidden`` [N, Ht] with
    ``teacher_head_weight`` [Vt_rows, Ht] (no gradient), or ``teacher_topk`` = (logprobs [N, k] at
    T = 1, indices [N, k]), optionally followed by (tail sample ids [N, M], tail entropy [N]), or
    neither (CE only: ``terms`` must be empty). Rows of either head at index >= ``vocab_size`` are
    ignored. Masked rows are dropped up front (one host sync), so only
    valid tokens cost compute; peak extra memory is O(chunk_size x vocab_size). Gradients reach
    ``student_hidden`` and ``student_head_weight`` (when they require grad) only. ``all_valid``
    promises that every label is a token id below ``vocab_size`` (packed training blocks): the
    masking and the range check, the two reads back to the host, are then skipped.
    """
    terms = tuple(terms)
    has_teacher_head, teacher_rows = _check_inputs(
        student_hidden,
        student_head_weight,
        labels,
        terms,
        ce_weight,
        teacher_hidden,
        teacher_head_weight,
        teacher_topk,
        chunk_size,
    )
    vocab = _resolve_vocab(vocab_size, student_head_weight.shape[0], teacher_rows)

    if all_valid:
        rows = torch.arange(labels.shape[0], device=labels.device)  # no host read: shape only
        valid_labels = labels.long()
    else:
        rows = _valid_rows(labels)
        valid_labels = _select_rows(labels, rows).long()
        _check_index_range("labels", valid_labels, vocab, "labels must be token ids or -100")
    # index_select is differentiable: autograd scatters the valid rows' gradient back, zeros elsewhere.
    hidden = _select_rows(student_hidden, rows)
    weight = student_head_weight[:vocab]
    teacher_hidden_valid = teacher_weight = topk = None
    if has_teacher_head:
        teacher_hidden_valid = _select_rows(teacher_hidden.detach(), rows)
        teacher_weight = teacher_head_weight.detach()[:vocab]
    if teacher_topk is not None:
        topk = valid_topk(teacher_topk, rows, student_hidden.shape[0], vocab)
    grad_enabled = torch.is_grad_enabled()
    total, sums = _ChunkedLogitObjective.apply(
        hidden,
        weight,
        valid_labels,
        teacher_hidden_valid,
        teacher_weight,
        topk,
        terms,
        float(ce_weight),
        int(chunk_size),
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
    )
    return _make_output(total, sums, terms, rows)


def _check_inputs(
    student_hidden,
    student_head_weight,
    labels,
    terms,
    ce_weight,
    teacher_hidden,
    teacher_head_weight,
    teacher_topk,
    chunk_size,
) -> tuple[bool, int | None]:
    """Shapes and arguments of :func:`chunked_logit_objective`; (teacher head given, its rows)."""
    has_teacher_head = teacher_hidden is not None or teacher_head_weight is not None
    if has_teacher_head and (teacher_hidden is None or teacher_head_weight is None):
        raise ValueError("pass teacher_hidden and teacher_head_weight together (or teacher_topk)")
    if has_teacher_head and teacher_topk is not None:
        raise ValueError(
            "pass either teacher_hidden + teacher_head_weight or teacher_topk, not both"
        )
    teacher = "logits" if has_teacher_head else "topk" if teacher_topk is not None else None
    check_logit_terms(terms, ce_weight, teacher)
    _check_chunk_size(chunk_size)
    if student_hidden.dim() != 2 or student_head_weight.dim() != 2:
        raise ValueError(
            f"student_hidden must be [N, H] and student_head_weight [V, H], got "
            f"{list(student_hidden.shape)} and {list(student_head_weight.shape)}; flatten [B, S, H]"
        )
    if student_hidden.shape[1] != student_head_weight.shape[1]:
        raise ValueError(
            f"student hidden width {student_hidden.shape[1]} does not match the student head's "
            f"{student_head_weight.shape[1]} columns; pass the student's own lm_head weight"
        )
    num_rows = student_hidden.shape[0]
    _check_labels(labels, num_rows, "student_hidden")
    teacher_rows = None
    if has_teacher_head:
        if (
            teacher_hidden.dim() != 2
            or teacher_head_weight.dim() != 2
            or (
                teacher_hidden.shape[0] != num_rows
                or teacher_hidden.shape[1] != teacher_head_weight.shape[1]
            )
        ):
            raise ValueError(
                f"teacher_hidden must be [N, Ht] with N = {num_rows} and teacher_head_weight "
                f"[V, Ht], got {list(teacher_hidden.shape)} and {list(teacher_head_weight.shape)}"
            )
        teacher_rows = teacher_head_weight.shape[0]
    return has_teacher_head, teacher_rows
