"""The pure parts of on-policy distillation: which steps are on-policy, the seed of a step's
samples, the labels of a generated batch (the prompt masked), and the teacher's log-likelihood of
the sampled tokens. Nothing here generates; runtime/generate.py does."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from distill.objective.losses import IGNORE_INDEX


def _ratio(fraction: float) -> Fraction:
    # exact rational arithmetic: 0.1 * 10 steps is exactly one on-policy step, not 0.999...
    return Fraction(fraction).limit_denominator(1_000_000)


def on_policy_steps_before(step: int, fraction: float) -> int:
    """How many of steps 0..step-1 are on-policy: floor(step * lambda)."""
    return math.floor(step * _ratio(fraction))


def is_on_policy_step(step: int, fraction: float) -> bool:
    """Step `step` trains on the student's own samples when floor((s+1) lambda) > floor(s lambda):
    the on-policy steps are spread evenly (lambda = 0.5: steps 1, 3, 5, ...), every prefix of the
    run holds floor(n lambda) of them, and the answer depends on nothing but the step, so every
    rank and every resumed run agrees."""
    return on_policy_steps_before(step + 1, fraction) > on_policy_steps_before(step, fraction)


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the sampling generator of (recipe seed, step, rank): independent streams for
    every step and rank, the same in every run (a hash, not the global RNG)."""
    digest = hashlib.sha256(f"distill-on-policy/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def completion_labels(
    sequences: torch.Tensor, prompt_len: int, eos_id: int | None, vocab_size: int
) -> torch.Tensor:
    """Labels [B, L] of prompt + completion sequences: the completion tokens up to and including
    the first EOS; the prompt and what follows the EOS (padding) are IGNORE_INDEX, so no loss is
    taken where the student did not choose the token."""
    labels = sequences.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    completion = sequences[:, prompt_len:]
    if eos_id is not None and completion.shape[1]:
        is_eos = completion == eos_id
        # positions strictly after the first EOS of each row
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        labels[:, prompt_len:][after] = IGNORE_INDEX
    labels[(labels >= vocab_size)] = IGNORE_INDEX
    return labels


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token (as `generate` uses)."""
    return (attention_mask.long().cumsum(1) - 1).clamp_min(0)


@dataclass
class GeneratedBatch:
    """One on-policy micro-batch: prompt + student completion, its labels (completion only), the
    attention mask of left-padded prompts, and the teacher's outputs on it (scored once)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    teacher: object = None
    """The teacher's `TeacherOutput` on `input_ids`."""

    @property
    def position_ids(self) -> torch.Tensor:
        return positions_of(self.attention_mask)

    def label_count(self) -> torch.Tensor:
        return (self.labels[:, 1:] != IGNORE_INDEX).sum()


@torch.no_grad()
def label_logprob_sum(
    hidden: torch.Tensor,
    head: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label), number of labels) of a model's hidden states [B, L, H] and head
    [V, H] over the positions whose next label is not IGNORE_INDEX; logits exist for
    `chunk_rows` positions at a time, in float32."""
    targets = labels[:, 1:].reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, rows)
    targets = targets.index_select(0, rows)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    weight = head[:vocab_size]
    for r in range(0, len(rows), chunk_rows):
        logits = (flat[r : r + chunk_rows] @ weight.t().to(flat.dtype)).float()
        logp = F.log_softmax(logits, dim=-1)
        total += logp.gather(1, targets[r : r + chunk_rows, None]).sum().double()
    return total, torch.tensor(len(rows), device=hidden.device)
