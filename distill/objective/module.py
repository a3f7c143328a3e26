"""The objective as a module: the student (and hidden-loss projections) with a forward that returns
the loss sums, and the frozen teacher seen as hidden states plus head weight, never logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.models import backbone_of, causal_lm_of, full_weight
from distill.objective.chunked import chunked_logit_objective
from distill.objective.hidden import hidden_state_loss
from distill.objective.losses import naive_logit_objective
from distill.specs import ObjectiveSpec


@dataclass
class TeacherOutput:
    """What the objective sees of the teacher: its final hidden states and head (online), or
    its top-k log-probabilities (an offline cache), and optionally per-layer outputs."""

    hidden: torch.Tensor | None  # [B, S, H_t] final hidden states (after the final norm)
    head_weight: torch.Tensor | None  # [V_t, H_t]
    states: list[torch.Tensor | None] | None  # per-layer outputs, index i = layer i
    topk: tuple[torch.Tensor, ...] | None = None
    """Cache: (log-probabilities at T = 1 [B, S - 1, k], ids [B, S - 1, k]) for positions 0..S-2,
    and with tail samples (their ids [B, S - 1, M], the tail's entropy [B, S - 1])."""


class TeacherTrunk(nn.Module):
    """The frozen teacher as the loop sees it: hidden states and the head weight, never logits.

    A replicated teacher is called through a trunk made on the fly. A partitioned one
    (`teacher.placement: zero3`) is a trunk wrapped by an inference-only ZeRO-3 engine: calling it
    gathers the weights layer by layer, and the head weight (registered with DeepSpeed) only for
    this forward, so a copy of it is handed to the loss.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, want_states: bool, attention_mask=None, position_ids=None
    ):
        """(final hidden states, head weight, per-layer outputs or None): plain tensors and
        tuples, which DeepSpeed's hooks understand. The mask and positions are those of
        left-padded generated batches (None: packed blocks)."""
        out = backbone_of(self.lm)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=want_states,
        )
        head = causal_lm_of(self.lm).get_output_embeddings().weight
        if hasattr(head, "ds_id"):  # ZeRO-3: released (re-partitioned) when this forward ends
            head = head.detach().clone()
        states = tuple(out.hidden_states[1:]) if want_states else None
        return out.last_hidden_state, head, states


@torch.no_grad()
def teacher_forward(
    teacher: nn.Module,
    input_ids: torch.Tensor,
    want_states: bool,
    autocast,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
):
    """The frozen teacher's hidden states; no autograd graph is ever built."""
    trunk = teacher if isinstance(teacher, TeacherTrunk) else TeacherTrunk(teacher)
    with autocast:
        hidden, head, states = trunk(input_ids, want_states, attention_mask, position_ids)
    return TeacherOutput(hidden=hidden, head_weight=head, states=list(states) if states else None)


class DistillModule(nn.Module):
    """Student + hidden-loss projections, with a forward that returns the loss sums.

    The whole objective runs inside `forward`, so DDP's gradient hooks and DeepSpeed's parameter
    gathering see every parameter that gets a gradient. Without a teacher it is plain next-token
    cross-entropy.
    """

    def __init__(
        self,
        student: nn.Module,
        objective: ObjectiveSpec | None,
        vocab_size: int,
        layer_map: list[tuple[int, int]] | None = None,
        projections: nn.Module | None = None,
        chunk_size: int = 1024,
    ):
        super().__init__()
        self.chunk_size = objective.chunk_size if objective is not None else chunk_size
        self.student = student
        self.projections = projections
        self.objective = objective
        self.vocab_size = vocab_size
        self.layer_map = layer_map or []

    def forward(
        self,
        input_ids: torch.Tensor,
        teacher: TeacherOutput | None = None,
        labels=None,
        attention_mask=None,
        position_ids=None,
    ):
        """(total, unweighted term sums, token count). `labels` with IGNORE_INDEX rows and a
        mask mark a generated (on-policy) batch: CE is left out there, its labels being the
        student's own samples."""
        objective = self.objective
        want_states = bool(teacher is not None and objective and objective.hidden)
        out = backbone_of(self.student)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=want_states,
        )
        on_policy = attention_mask is not None
        all_valid = labels is None  # the blocks' own ids: every label is a token of the vocab
        if labels is None:
            labels = input_ids
        # position t predicts token t+1
        shifted = labels[:, 1:].reshape(-1)
        hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        # under ZeRO-3 the engine gathers it (distributed.register_head); an evaluation outside
        # the engine reads a gathered copy
        head = full_weight(causal_lm_of(self.student).get_output_embeddings().weight)
        t_hidden = t_head = t_topk = None
        if teacher is not None and objective is not None and objective.terms:
            if teacher.topk is not None:
                rows = teacher.topk[0].shape[0] * teacher.topk[0].shape[1]
                t_topk = tuple(t.reshape(rows, *t.shape[2:]) for t in teacher.topk)
            else:
                t_hidden = teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1])
                t_head = teacher.head_weight
        result = self.logit_objective(
            hidden, head, shifted, t_hidden, t_head, all_valid, t_topk, on_policy
        )
        total, parts = result.total, dict(result.terms)
        if want_states:
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != -100
            student_states = list(out.hidden_states[1:])
            hidden_sum, _ = hidden_state_loss(
                student_states,
                teacher.states,
                self.layer_map,
                self.projections,
                objective.hidden.kind,
                mask,
            )
            total = total + objective.hidden.weight * hidden_sum
            parts["hidden"] = hidden_sum.detach()
        return total, parts, result.num_tokens

    def logit_objective(
        self,
        hidden: torch.Tensor,
        head: torch.Tensor,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor | None = None,
        teacher_head: torch.Tensor | None = None,
        all_valid: bool = False,
        teacher_topk: tuple[torch.Tensor, ...] | None = None,
        without_ce: bool = False,
    ):
        """CE (unless `without_ce`) + logit terms (sums, a `ObjectiveOutput`) from final hidden states [N, H] and
        aligned labels [N], by the objective's path; the teacher is its final hidden states and
        head, or its cached top-k (log-probabilities, ids) [N, k]. `distill bench` also measures
        it alone."""

        objective = self.objective
        terms, ce_weight = [], 1.0
        if objective is not None and (teacher_hidden is not None or teacher_topk is not None):
            terms = objective.terms  # the recipe's own terms: validated once, at load
            ce_weight = 0.0 if without_ce else objective.ce_weight
        if not terms:
            teacher_hidden = teacher_head = teacher_topk = None
        if objective is not None and objective.path == "naive":
            student_logits = hidden @ head.t()
            teacher_logits = (
                teacher_hidden @ teacher_head.t() if teacher_hidden is not None else None
            )
            return naive_logit_objective(
                student_logits,
                labels,
                terms,
                ce_weight,
                teacher_logits=teacher_logits,
                teacher_topk=teacher_topk,
                vocab_size=self.vocab_size,
            )
        return chunked_logit_objective(
            hidden,
            head,
            labels,
            terms,
            ce_weight,
            teacher_hidden=teacher_hidden,
            teacher_head_weight=teacher_head,
            teacher_topk=teacher_topk,
            vocab_size=self.vocab_size,
            chunk_size=self.chunk_size,
            all_valid=all_valid,
        )
