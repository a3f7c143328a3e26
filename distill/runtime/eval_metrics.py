"""Quality of a model on blocks of token ids, in one pass: next-token perplexity, perplexity by
position within the block, and agreement with a teacher (top-1 and KL(teacher || model))."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.models import backbone_of, causal_lm_of


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return backbone_of(model)(input_ids=ids.to(device)).last_hidden_state


def _log_probs(model, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
    head = causal_lm_of(model).get_output_embeddings()
    return F.log_softmax(head(hidden)[:, :vocab_size].float(), dim=-1)


def position_spans(seq_len: int, buckets: int) -> list[tuple[int, int]]:
    """[start, end) token positions of each bucket; a bucket holds the predictions of the tokens
    at those positions (position 0 is never predicted)."""
    edges = [round(i * seq_len / buckets) for i in range(buckets + 1)]
    return [(edges[i], edges[i + 1]) for i in range(buckets)]


@torch.no_grad()
def score_blocks(
    model,
    blocks: torch.Tensor,
    batch_size: int,
    vocab_size: int,
    buckets: int = 4,
    teacher=None,
    teacher_blocks: int = 0,
    chunk_rows: int = 1024,
) -> dict:
    """Perplexity, perplexity per position bucket and, on the first `teacher_blocks` blocks,
    top-1 agreement and mean KL(teacher || model) per token in nats.

    Logits exist for `chunk_rows` positions at a time (memory O(chunk x vocab)), in float32."""
    seq_len = blocks.shape[1]
    target_pos = torch.arange(1, seq_len).repeat(batch_size)  # the position each prediction is for
    spans = position_spans(seq_len, buckets)
    bucket_of = torch.bucketize(target_pos, torch.tensor([s for s, _ in spans[1:]]), right=True)
    nll = torch.zeros(buckets, dtype=torch.float64)
    count = torch.zeros(buckets, dtype=torch.float64)
    agree = kl = compared = 0.0
    models = [model] if teacher is None else [model, teacher]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        with_teacher = teacher is not None and start < teacher_blocks
        hidden = _final_hidden(model, ids)[:, :-1].flatten(0, 1)
        t_hidden = _final_hidden(teacher, ids)[:, :-1].flatten(0, 1) if with_teacher else None
        targets = ids[:, 1:].reshape(-1)
        where = bucket_of[: len(targets)]
        for r in range(0, len(targets), chunk_rows):
            logp = _log_probs(model, hidden[r : r + chunk_rows], vocab_size)
            tgt = targets[r : r + chunk_rows].to(logp.device)
            token_nll = -logp.gather(1, tgt[:, None])[:, 0].double().cpu()
            nll.index_add_(0, where[r : r + chunk_rows], token_nll)
            count.index_add_(0, where[r : r + chunk_rows], torch.ones_like(token_nll))
            if t_hidden is not None:
                t_logp = _log_probs(teacher, t_hidden[r : r + chunk_rows], vocab_size)
                t_logp = t_logp.to(logp.device)
                agree += float((t_logp.argmax(-1) == logp.argmax(-1)).sum())
                kl += float((t_logp.exp() * (t_logp - logp)).sum().double())
                compared += len(tgt)
    for m, training in zip(models, was_training):
        m.train(training)
    loss = float(nll.sum() / count.sum().clamp(min=1))
    out = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": int(count.sum()),
        "position_buckets": [list(span) for span in spans],
        "position_perplexity": [
            math.exp(min(float(n / max(c, 1)), 50.0)) for n, c in zip(nll, count)
        ],
    }
    if compared:
        out["teacher"] = {"top1_agreement": agree / compared, "kl": kl / compared}
    return out
