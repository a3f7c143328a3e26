"""Measuring a model: held-out perplexity, agreement with the teacher, size, generation latency;
and the run report that puts every stage side by side."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
from torch import nn

from distill.models import backbone_of, causal_lm_of
from distill.objective.module import DistillModule


@torch.no_grad()
def heldout_metrics(
    model,
    blocks: torch.Tensor,
    batch_size: int,
    vocab_size: int,
    autocast=None,
    accelerator=None,
    max_batches: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Next-token loss and perplexity over held-out blocks, sharded over ranks when an
    accelerator with several processes is given."""

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(blocks) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    # Every rank runs the same number of forwards (ZeRO-3 gathers are collectives); a rank
    # without data left runs a fully masked batch that counts nothing.
    per_rank = math.ceil(n_batches / world)
    plain = DistillModule(model, None, vocab_size, chunk_size=chunk_size)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(per_rank):
        b = i * world + rank
        ids = blocks[b * batch_size : (b + 1) * batch_size] if b < n_batches else blocks[:1]
        ids = ids.to(device)
        labels = ids if b < n_batches else torch.full_like(ids, -100)
        with autocast or nullcontext():
            total, _, n = plain(ids, None, labels=labels)
        loss_sum += total.double()
        count += n.double()
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
        count = accelerator.reduce(count, "sum")
    model.train(was_training)
    loss = float(loss_sum / count.clamp(min=1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


@torch.no_grad()
def teacher_agreement(
    student, teacher, blocks: torch.Tensor, batch_size: int, vocab_size: int, max_batches: int = 4
) -> float:
    """Fraction of held-out positions where the student's top-1 token equals the teacher's."""

    agree = total = 0
    for b in range(min(max_batches, math.ceil(len(blocks) / batch_size))):
        ids = blocks[b * batch_size : (b + 1) * batch_size]
        picks = []
        for model in (student, teacher):
            device = next(model.parameters()).device
            hidden = backbone_of(model)(input_ids=ids.to(device)).last_hidden_state
            head = causal_lm_of(model).get_output_embeddings()
            flat = hidden.reshape(-1, hidden.shape[-1])
            # chunked so a large vocabulary never needs [all tokens x vocab] at once
            picks.append(
                torch.cat(
                    [
                        head(flat[i : i + 1024])[:, :vocab_size].argmax(-1).cpu()
                        for i in range(0, len(flat), 1024)
                    ]
                )
            )
        agree += int((picks[0] == picks[1]).sum())
        total += picks[0].numel()
    return agree / max(total, 1)


@torch.inference_mode()
def generate_latency_s(
    model: nn.Module,
    tokenizer_or_prompt_ids,
    new_tokens: int = 128,
    prompt: str = "def main():\n",
) -> float:
    """Wall seconds of greedy generation of exactly ``new_tokens`` tokens (after a short warm-up).

    Give a tokenizer (``prompt`` is encoded) or a tensor of prompt token ids ([seq] or [1, seq]).
    """
    if isinstance(tokenizer_or_prompt_ids, torch.Tensor):
        input_ids = tokenizer_or_prompt_ids.reshape(1, -1)
    else:
        input_ids = tokenizer_or_prompt_ids(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    generation_config = getattr(model, "generation_config", None)
    pad_token_id = getattr(generation_config, "pad_token_id", None)
    if pad_token_id is None:
        eos = getattr(generation_config, "eos_token_id", None)
        pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    def generate(count: int) -> torch.Tensor:
        return model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=count,
            min_new_tokens=count,  # no early stop at EOS: always the same amount of work
            pad_token_id=pad_token_id,
        )

    was_training = model.training
    model.eval()
    try:
        generate(min(8, new_tokens))
        start = time.perf_counter()
        output = generate(new_tokens)
        elapsed_s = time.perf_counter() - start
    finally:
        model.train(was_training)
    assert output.shape[1] - input_ids.shape[1] == new_tokens
    return elapsed_s


# ----------------------------------------------------------------------------------------------
# Report
