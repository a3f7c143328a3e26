"""Measuring a model while it trains and at a stage's end: held-out perplexity (sharded over
ranks), top-1 agreement with the teacher, generation latency and speed."""

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


def _greedy_generator(model: nn.Module, input_ids: torch.Tensor):
    """generate(count): greedy generation of exactly `count` new tokens after `input_ids`."""
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

    return generate


def _prompt_ids(model: nn.Module, tokenizer_or_prompt_ids, prompt: str) -> torch.Tensor:
    if isinstance(tokenizer_or_prompt_ids, torch.Tensor):
        input_ids = tokenizer_or_prompt_ids.reshape(1, -1)
    else:
        input_ids = tokenizer_or_prompt_ids(prompt, return_tensors="pt").input_ids
    return input_ids.to(next(model.parameters()).device)


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
    input_ids = _prompt_ids(model, tokenizer_or_prompt_ids, prompt)
    generate = _greedy_generator(model, input_ids)
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


@torch.inference_mode()
def generation_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 128) -> dict:
    """Greedy generation of one sequence as served: `tokens_per_s` (new tokens over the whole
    generation), `time_to_first_token_s` (prefill and one token) and `peak_mem_bytes` (CUDA:
    allocated by torch; CPU: the process's peak resident memory, None where Linux cannot reset
    it), after a warm-up."""
    input_ids = _prompt_ids(model, prompt_ids, "")
    generate = _greedy_generator(model, input_ids)
    device = input_ids.device
    was_training = model.training
    model.eval()
    try:
        generate(min(8, new_tokens))
        _reset_peak_memory(device)
        start = time.perf_counter()
        generate(1)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        generate(new_tokens)
        total_s = time.perf_counter() - start
        peak = _peak_memory_bytes(device)
    finally:
        model.train(was_training)
    return {
        "tokens_per_s": new_tokens / total_s,
        "time_to_first_token_s": first_s,
        "new_tokens": new_tokens,
        "peak_mem_bytes": peak,
        "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "device": device.type,
    }


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
