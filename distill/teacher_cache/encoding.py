"""How one position of the teacher cache is stored: the top-k token ids and log-probabilities at
T = 1, and the tail mass, in `k * id_bytes + k + 4` bytes (196 at k = 64 with a vocabulary of at
most 65,536 tokens).

Per position (a numpy structured record, no padding):

- ``ids``: the k token ids in descending probability, in the smallest unsigned integer type that
  holds the vocabulary (uint8 up to 256 tokens, uint16 up to 65,536, else uint32). The token that
  actually follows is always one of them: when it is not in the teacher's top k it takes the k-th
  place (the teacher's probability of the real next token is what a perplexity is made of, and a
  top-k alone leaves it in the undifferentiated tail);
- ``codes``: uint8, ``round((log p_1 - log p_i) / scale)``: each id's log-probability below the
  top-1's, on a per-position linear scale spanning the k-th (so codes end at 255);
- ``scale``: float16, that step in nats;
- ``log_tail``: float16, ``log(1 - sum_i p_i)``, the mass outside the top k;
- with ``tail_samples = M > 0`` (2M + 2 bytes more): ``tail_ids``, M tokens drawn with replacement
  from the teacher's distribution restricted to the tail (the ids outside the k), and
  ``tail_entropy``, float16, the entropy in nats of that restricted distribution.

Why this shape: the divergences' gradients are differences of probabilities, so what matters is
the absolute error of each p_i. Storing ratios to the top-1 on a per-position scale gives every
id the same relative error in p (half a step, about 2 % for a 10-nat span), which is small in
absolute terms where p is large; the stored tail then fixes the top-k's total mass exactly, so a
rounding error never leaks into the tail bucket (for a confident teacher, 1 - sum p_i computed from
8-bit log-probabilities would be mostly rounding noise). Decoding rescales the top-k to
``1 - tail``, so :func:`distill.objective.losses.topk_bucket_logprobs` recovers the stored tail.

Why tail samples: a top-k alone tells the student how much mass lies outside the k, not where, so
the tail's shape is learnt from the one-hot labels only and the student ends worse than one
distilled online (more so the smaller k). M samples of the tail make the forward KL's gradient
unbiased for the whole vocabulary (Anshumann et al. 2025, "Sparse logit sampling", use samples for
all of it; here the head stays exact, which leaves less variance), and the tail entropy makes its
value an unbiased estimate of the full forward KL (see
:func:`distill.objective.losses.sampled_tail_kl`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

ENCODING = "topk-label-u8-logratio-f16tail-v2"
CODE_MAX = 255


def id_dtype(vocab_size: int) -> np.dtype:
    """The fewest bytes that hold every token id of the vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def record_dtype(k: int, vocab_size: int, tail_samples: int = 0) -> np.dtype:
    """The structured dtype of one cached position."""
    fields = [
        ("ids", id_dtype(vocab_size), (k,)),
        ("codes", np.uint8, (k,)),
        ("scale", np.float16),
        ("log_tail", np.float16),
    ]
    if tail_samples:
        fields += [
            ("tail_ids", id_dtype(vocab_size), (tail_samples,)),
            ("tail_entropy", np.float16),
        ]
    return np.dtype(fields)


def encode_topk(
    logits: torch.Tensor,
    k: int,
    vocab_size: int,
    labels: torch.Tensor | None = None,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Records [N] of the teacher's top-k at T = 1 from its logits [N, V_rows] (rows past
    `vocab_size` are head padding and never chosen); `labels` [N], the tokens that follow, take
    the k-th place where they are not in the top k. `tail_samples` tokens per position are drawn
    from the tail with `generator`."""
    if tail_samples and k >= vocab_size:
        raise ValueError(f"k={k} covers the vocabulary ({vocab_size}): there is no tail to sample")
    logprobs = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
    top, ids = torch.topk(logprobs, k, dim=-1)  # descending
    if labels is not None:
        missing = ~(ids == labels[:, None]).any(1)
        ids[missing, -1] = labels[missing]
        top[missing, -1] = logprobs[missing, labels[missing]]  # below the k-th: still descending
    below_top = top[:, :1] - top
    span = below_top[:, -1]
    scale = (span / CODE_MAX).to(torch.float16)
    # float16 rounding may make the step a hair short of span/255: codes are clipped at 255
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(below_top / step.unsqueeze(1)).clamp_(0, CODE_MAX).to(torch.uint8)
    top_mass_log = torch.logsumexp(top, dim=-1)
    log_tail = torch.log((-torch.expm1(top_mass_log)).clamp_min(0)).clamp_min(-60000.0)
    out = np.empty(len(logits), dtype=record_dtype(k, vocab_size, tail_samples))
    out["ids"] = ids.cpu().numpy()
    out["codes"] = codes.cpu().numpy()
    out["scale"] = scale.cpu().numpy()
    out["log_tail"] = log_tail.to(torch.float16).cpu().numpy()
    if tail_samples:
        tail_ids, tail_entropy = _sample_tail(logprobs, ids, tail_samples, generator)
        out["tail_ids"] = tail_ids.cpu().numpy()
        out["tail_entropy"] = tail_entropy.to(torch.float16).cpu().numpy()
    return out


def _sample_tail(
    logprobs: torch.Tensor, ids: torch.Tensor, count: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` draws per row from the distribution restricted to the ids outside `ids`, and that
    restricted distribution's entropy. A row whose tail has no mass (every logit outside the top k
    is -inf, as with masked tokens) draws uniformly from it: its tail weight (the stored log_tail)
    is 0, so the draws do not matter, but they must still lie outside the top k."""
    weights = logprobs.exp().scatter_(1, ids, 0.0)  # multinomial takes unnormalised weights
    mass = weights.sum(1)
    # H(p / m) = log m - sum(p log p) / m over the tail
    finite = logprobs.clamp_min(torch.finfo(logprobs.dtype).min)  # 0 * -inf would be nan
    entropy = mass.log() - (weights * finite).sum(1) / mass
    empty = mass <= 0
    if empty.any():
        weights[empty] = torch.ones_like(weights[empty]).scatter_(1, ids[empty], 0.0)
        entropy[empty] = 0.0
    samples = torch.multinomial(weights, count, replacement=True, generator=generator)
    return samples, entropy


def decode_topk(records: np.ndarray) -> tuple[torch.Tensor, ...]:
    """(log-probabilities float32 [..., k], ids int64 [..., k]) from records of any shape, and
    (tail sample ids int64 [..., M], tail entropy float32 [...]) when the records have them."""
    ids = torch.from_numpy(records["ids"].astype(np.int64))
    codes = torch.from_numpy(np.ascontiguousarray(records["codes"]))
    scale = torch.from_numpy(records["scale"].astype(np.float32))
    below_top = codes.float() * scale.unsqueeze(-1)
    log_tail = torch.from_numpy(records["log_tail"].astype(np.float32))
    # the top-k's total mass is 1 - tail: rescale the ratios to it
    top_mass_log = torch.log(-torch.expm1(log_tail)).clamp_min(math.log(1e-30))
    normalizer = top_mass_log - torch.logsumexp(-below_top, dim=-1)
    top = (normalizer.unsqueeze(-1) - below_top, ids)
    if "tail_ids" not in records.dtype.names:
        return top
    tail_ids = torch.from_numpy(records["tail_ids"].astype(np.int64))
    return *top, tail_ids, torch.from_numpy(records["tail_entropy"].astype(np.float32))
