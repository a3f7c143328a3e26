"""Prompts for on-policy distillation, tokenized once per run: the first `prompt_tokens` of the
token store's blocks (read by index, nothing copied up front), or the records of prompt files or a
hub dataset (each kept to its last `prompt_tokens` tokens, left-padded), split into training and
held-out prompts by a stable hash of each record's id."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.config import DataSpec
from distill.data.documents import BadInput, is_heldout, iter_documents
from distill.errors import RecipeError
from distill.prompts_spec import PromptsSpec


class BlockPrompts:
    """Prompt i is the first `length` tokens of block i (no padding)."""

    def __init__(self, blocks, length: int):
        self.blocks, self.length = blocks, length

    def __len__(self) -> int:
        return len(self.blocks)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.blocks[indices][:, : self.length]
        return ids, torch.ones_like(ids)


class TokenPrompts:
    """Left-padded prompt ids [N, P] and their attention mask (1 on real tokens)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[indices], self.mask[indices]


@dataclass
class PromptSets:
    train: BlockPrompts | TokenPrompts
    heldout: BlockPrompts | TokenPrompts
    length: int
    """Tokens of every (padded) prompt."""
    where: str
    """What they are, for messages."""


def left_padded(encoded: list[list[int]], length: int, pad_id: int) -> TokenPrompts:
    """Each prompt's last `length` ids, left-padded to `length`."""
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        tokens = tokens[-length:]
        if tokens:
            ids[row, length - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, length - len(tokens) :] = 1
    return TokenPrompts(ids, mask)


def build_prompt_sets(spec: PromptsSpec, data_spec: DataSpec, packed, tokenizer) -> PromptSets:
    """The run's prompts as `spec` says; `packed` is the run's PackedData (blocks prompts)."""
    if spec.source == "blocks":
        if spec.prompt_tokens >= packed.seq_len:
            raise RecipeError(
                f"data.prompts.prompt_tokens={spec.prompt_tokens} leaves no room in a block of "
                f"data.seq_len={packed.seq_len}; lower it below the block length"
            )
        return PromptSets(
            BlockPrompts(packed.train, spec.prompt_tokens),
            BlockPrompts(packed.eval, spec.prompt_tokens),
            spec.prompt_tokens,
            "the first data.prompts.prompt_tokens of the token store's blocks",
        )
    where = f"data.prompts.{spec.source} ({spec.files or spec.hub}, field {spec.field!r})"
    source = DataSpec(
        files=spec.files,
        hub=spec.hub,
        hub_config=spec.hub_config,
        split=spec.split,
        format=spec.format,
        text_field=spec.field,
        max_documents=spec.max_prompts,
        on_error=data_spec.on_error,
        seq_len=data_spec.seq_len,
    )
    try:
        records = list(iter_documents(source, BadInput(data_spec.on_error)))
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from None
    texts = {True: [], False: []}
    for doc_id, text in records:
        texts[is_heldout(doc_id, spec.eval_fraction)].append(text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sets = []
    for heldout in (False, True):
        encoded = tokenizer(texts[heldout], add_special_tokens=False)["input_ids"]
        encoded = [e for e in encoded if e] if texts[heldout] else []
        if not encoded:
            split = "held-out" if heldout else "training"
            raise RecipeError(
                f"{where}: the {split} prompt set is empty ({len(records)} records read, "
                f"data.prompts.eval_fraction={spec.eval_fraction}); add prompts or change "
                "`eval_fraction`"
            )
        sets.append(left_padded(encoded, spec.prompt_tokens, pad if pad is not None else 0))
    return PromptSets(sets[0], sets[1], spec.prompt_tokens, where)
