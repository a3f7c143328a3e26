"""A byte-level BPE tokenizer trained on a bounded, streamed sample of the training split."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from distill.config import TokenizerTrainSpec
from distill.data.documents import Document, is_heldout


def training_sample(
    docs: Iterable[Document], eval_fraction: float, max_documents: int | None
) -> Iterator[str]:
    """The training split's texts in order, at most `max_documents` of them.

    When no document is held out, the store holds out the last training document instead, so it
    must not be trained on: each text is yielded only once a later one shows it is not the last.
    """
    pending: str | None = None
    held_seen = False
    taken = 0
    for doc_id, text in docs:
        if is_heldout(doc_id, eval_fraction):
            held_seen = True
            continue
        if pending is not None:
            yield pending
            taken += 1
            if max_documents and taken >= max_documents:
                return
        pending = text
    if pending is not None and held_seen:
        yield pending


def train_tokenizer(texts: Iterable[str], spec: TokenizerTrainSpec):
    """Byte-level BPE trained on the given texts (at most `spec.max_chars` characters of them),
    wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def limited() -> Iterator[str]:
        budget = spec.max_chars
        for text in texts:
            if budget <= 0:
                return
            yield text[:budget]
            budget -= len(text)

    special = ["<|endoftext|>", "<|pad|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(limited(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=1_000_000,
    )
