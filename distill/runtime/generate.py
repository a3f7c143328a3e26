"""The generator of on-policy distillation and of its evaluation: completions of token prompts by
the live student. One small class: Hugging Face `generate` (KV cache, EOS handling) today; a serving
engine can take its place by offering the same `generate` method.

Sampling never touches the global RNG: `generate` runs greedy search over logits that a processor
has already turned into one sampled token per row, drawn with a `torch.Generator` seeded by the
caller (the step's seed), so a resumed or relaunched run draws the same completions.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from distill.models import causal_lm_of, is_partitioned


class _SampleWith:
    """A logits processor that samples the next token itself (temperature, top-p, only ids below
    `vocab_size`) with its own generator and leaves only that token finite, so greedy search
    picks it."""

    def __init__(self, generator, temperature: float, top_p: float, vocab_size: int):
        self.generator, self.temperature, self.top_p = generator, temperature, top_p
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores[:, : self.vocab_size].float() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # drop a token when the mass before it already reaches top_p (the first always stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        token = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class _KeepVocab:
    """Greedy decoding restricted to the tokenizer's ids (the head may have padding rows)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size :] = float("-inf")
        return scores


class HFGenerator:
    """Completions by a causal LM through `transformers`' `generate`.

    `model` is the live student: its weights change between calls, the generator holds no copy.
    Under ZeRO-3 each call gathers the whole student on every rank for the call's duration (one
    all-gather of its parameters, and its full size in memory on every device).
    """

    def __init__(self, model, eos_id: int | None, pad_id: int | None, vocab_size: int):
        self.model = model
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.vocab_size = vocab_size

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> torch.Tensor:
        """[B, P + n] prompt + completion ids (n <= max_new_tokens; rows that ended with EOS
        are padded). Left-padded `prompts` [B, P] with their `attention_mask`; `seed` None is
        greedy decoding, else sampling with a generator seeded by it."""
        from transformers import GenerationConfig, LogitsProcessorList

        lm = causal_lm_of(self.model)
        device = prompts.device
        if seed is None:
            processor = _KeepVocab(self.vocab_size)
        else:
            generator = torch.Generator(device=device).manual_seed(seed)
            processor = _SampleWith(generator, temperature, top_p, self.vocab_size)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        was_training, own_config = self.model.training, lm.generation_config
        # eval: no dropout (LoRA's included); gradient checkpointing would turn the cache off
        self.model.eval()
        # `generate` fills settings left at their defaults from the model's own generation config
        # (a repetition penalty, suppressed tokens): with ours in its place the samples are the
        # student's plain distribution
        lm.generation_config = config
        try:
            with self._gathered():
                return self.model.generate(
                    input_ids=prompts,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([processor]),
                    synced_gpus=self._partitioned,
                )
        finally:
            lm.generation_config = own_config
            self.model.train(was_training)

    @property
    def _partitioned(self) -> bool:
        return is_partitioned(self.model)

    def _gathered(self):
        if not self._partitioned:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
