"""On-policy steps of the training loop, and the on-policy evaluation.

An on-policy step (objective/on_policy.py says which) replaces the step's blocks by completions the
live student samples for the step's prompts: each rank its own prompts (the prompt order is a
BatchOrder like the blocks'), its own generator seeded from (seed, step, rank). The teacher scores
prompt + completion once; the logit terms see the completion tokens only. What it cost and what
the teacher thought of the samples is summed here and logged by the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distill.data.order import BatchOrder
from distill.objective.module import teacher_forward
from distill.objective.on_policy import (
    GeneratedBatch,
    completion_labels,
    is_on_policy_step,
    label_logprob_sum,
    on_policy_steps_before,
    positions_of,
    sampling_seed,
)
from distill.runtime.generate import HFGenerator
from distill.specs import OnPolicySpec

_WINDOW_KEYS = ("steps", "gen_s", "step_s", "gen_tokens", "completions", "logp", "logp_tokens")


def _zeros() -> dict:
    return dict.fromkeys(_WINDOW_KEYS, 0.0)


@dataclass
class OnPolicy:
    """What a training stage's on-policy steps need: the settings, the prompts, the generator."""

    spec: OnPolicySpec
    prompts: object
    """A PromptSets.train: `len()` and `take(indices) -> (ids, mask)`."""
    generator: HFGenerator
    eos_id: int | None
    vocab_size: int
    want_states: bool = False
    window: dict = field(default_factory=_zeros)
    """Sums since the last logged step (this rank's)."""
    totals: dict = field(default_factory=_zeros)
    """Sums over the stage (saved in checkpoints, so they survive a resume)."""

    def wants(self, step: int) -> bool:
        return is_on_policy_step(step, self.spec.fraction)

    def batches(self, acc, teacher, step: int, spec, seed: int, autocast) -> list[GeneratedBatch]:
        """The step's micro-batches: prompts completed by the student, scored by the teacher."""
        order = self._order(spec, acc.num_processes, seed)
        out, gen_s = [], 0.0
        for micro in range(spec.grad_accum):
            ids, mask = self.prompts.take(order.indices(step, micro, acc.process_index))
            ids, mask = ids.to(acc.device), mask.to(acc.device)
            t0 = time.perf_counter()
            seqs = self.generator.generate(
                ids,
                mask,
                self.spec.max_new_tokens,
                self.spec.temperature,
                self.spec.top_p,
                seed=sampling_seed(seed, step * spec.grad_accum + micro, acc.process_index),
            )
            gen_s += time.perf_counter() - t0
            full_mask = torch.ones_like(seqs)
            full_mask[:, : mask.shape[1]] = mask
            labels = completion_labels(seqs, ids.shape[1], self.eos_id, self.vocab_size)
            batch = GeneratedBatch(seqs, labels, full_mask)
            batch.teacher = teacher_forward(
                teacher, seqs, self.want_states, autocast, full_mask, batch.position_ids
            )
            logp, count = label_logprob_sum(
                batch.teacher.hidden, batch.teacher.head_weight, labels, self.vocab_size
            )
            self._add(gen_tokens=count, completions=len(seqs), logp=logp, logp_tokens=count)
            out.append(batch)
        self._add(gen_s=gen_s)
        return out

    def _order(self, spec, world: int, seed: int) -> BatchOrder:
        """The prompt order (kept: it caches the epoch's permutation)."""
        key = (spec.batch_size, spec.grad_accum, world, seed)
        if getattr(self, "_order_key", None) != key:
            self._order_key = key
            self._prompt_order = BatchOrder(len(self.prompts), *key)
        return self._prompt_order

    def _add(self, **values) -> None:
        for key, value in values.items():
            value = float(value)
            self.window[key] += value
            self.totals[key] += value

    def step_started(self) -> None:
        self._t0 = time.perf_counter()

    def step_done(self, on_policy: bool) -> None:
        """Counts the step (and its wall time, from `step_started`)."""
        self._add(steps=float(on_policy), step_s=time.perf_counter() - self._t0)

    def restore(self, meta: dict) -> None:
        """The stage's sums from a checkpoint's state (absent: a checkpoint of before)."""
        self.totals.update((meta.get("on_policy") or {}).get("totals") or {})

    def state(self) -> dict:
        return {"totals": self.totals}

    def log_row(self, acc, step: int) -> dict:
        """The window's numbers (summed over ranks, times averaged), and a fresh window."""
        values = torch.tensor([self.window[k] for k in _WINDOW_KEYS], dtype=torch.float64)
        if acc.num_processes > 1:
            values = acc.reduce(values.to(acc.device), "sum").cpu()
        w = dict(zip(_WINDOW_KEYS, values.tolist()))
        world = acc.num_processes
        self.window = _zeros()
        row = {
            # the logged loss is this step's: say which kind it was (lambda = 0.5 and an even
            # log_every log on-policy steps only)
            "on_policy_step": int(is_on_policy_step(step - 1, self.spec.fraction)),
            "on_policy_fraction": on_policy_steps_before(step, self.spec.fraction) / max(step, 1),
            "gen_tokens": w["gen_tokens"],
            "gen_s": w["gen_s"] / world,
            "train_s": (w["step_s"] - w["gen_s"]) / world,
        }
        if w["completions"]:  # the window held an on-policy step
            row["mean_completion_len"] = w["gen_tokens"] / w["completions"]
            row["teacher_logp"] = w["logp"] / max(w["logp_tokens"], 1)
        return row

    def summary(self, steps: int) -> dict:
        """The stage's on-policy numbers for its summary entry (this rank's times)."""
        t = self.totals
        return {
            "fraction": self.spec.fraction,
            "on_policy_steps": on_policy_steps_before(steps, self.spec.fraction),
            "generated_tokens": int(t["gen_tokens"]),
            "generation_s": t["gen_s"],
            "training_s": t["step_s"] - t["gen_s"],
            "generation_share": t["gen_s"] / t["step_s"] if t["step_s"] else 0.0,
            "mean_completion_len": t["gen_tokens"] / t["completions"] if t["completions"] else 0,
            "teacher_logp": t["logp"] / t["logp_tokens"] if t["logp_tokens"] else None,
        }


@torch.no_grad()
def completion_nll(model, teacher, prompts, spec, vocab_size: int, eos_id, pad_id) -> dict:
    """The teacher's mean per-token NLL of `model`'s greedy and sampled completions of the first
    `spec.prompts` prompts (an OnPolicyEvalSpec), and the completions' mean length."""
    from distill.models import backbone_of, causal_lm_of

    device = next(model.parameters()).device
    generator = HFGenerator(model, eos_id, pad_id, vocab_size)
    count = min(spec.prompts, len(prompts))
    head = causal_lm_of(teacher).get_output_embeddings().weight
    teacher_was_training = teacher.training
    teacher.eval()
    out = {"prompts": count}
    for mode in ("greedy", "sampled"):
        logp = tokens = 0.0
        for start in range(0, count, spec.batch_size):
            ids, mask = prompts.take(torch.arange(start, min(start + spec.batch_size, count)))
            ids, mask = ids.to(device), mask.to(device)
            seed = None if mode == "greedy" else sampling_seed(spec.seed, start, -1)
            seqs = generator.generate(
                ids, mask, spec.max_new_tokens, spec.temperature, spec.top_p, seed
            )
            full = torch.ones_like(seqs)
            full[:, : mask.shape[1]] = mask
            labels = completion_labels(seqs, ids.shape[1], eos_id, vocab_size)
            hidden = backbone_of(teacher)(
                input_ids=seqs, attention_mask=full, position_ids=positions_of(full)
            ).last_hidden_state
            s, n = label_logprob_sum(hidden, head.to(hidden.device), labels, vocab_size)
            logp, tokens = logp + float(s), tokens + float(n)
        out[f"{mode}_nll"] = -logp / tokens if tokens else None
        out[f"{mode}_len"] = tokens / count if count else 0.0
    teacher.train(teacher_was_training)
    out.update(spec.model_dump(mode="json", exclude={"prompts", "batch_size"}))
    return out
