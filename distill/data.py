"""Text in, packed token blocks out: loading, the held-out split, tokenizer training, packing, and
a deterministic batch order that any step of any rank can be computed from (exact resume)."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.config import DataSpec, TokenizerTrainSpec
from distill.errors import RecipeError

Document = tuple[str, str]  # (stable id used for the held-out split, text)

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ".log"}
FORMAT_BY_SUFFIX = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


# ----------------------------------------------------------------------------------------------
# Documents


def load_documents(spec: DataSpec) -> list[Document]:
    """Read every document of the data source, in a stable order."""
    if spec.stdlib:
        docs = _stdlib_documents(spec.stdlib_exclude, spec.max_documents)
    elif spec.files:
        docs = _file_documents(spec)
    else:
        docs = _hub_documents(spec)
    docs = [(doc_id, text) for doc_id, text in docs if text and text.strip()]
    if not docs:
        raise RecipeError(
            "data: the data source holds no non-empty text; check `data.files` / `data.hub` "
            f"and `data.text_field` (currently {spec.text_field!r})"
        )
    return docs


def _stdlib_documents(exclude: list[str], limit: int | None) -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(root.rglob("*.py"))
    docs = []
    for path in paths:
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in exclude or "test" in rel.parts or "tests" in rel.parts:
            continue
        try:
            docs.append((rel.as_posix(), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        if limit and len(docs) >= limit:
            break
    return docs


def _file_documents(spec: DataSpec) -> list[Document]:
    paths: list[str] = []
    for pattern in spec.files or []:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise RecipeError(f"data.files: {pattern!r} matches no file; check the path or glob")
        paths.extend(matches)
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return _disk_documents(paths[0], spec)
    paths = [p for p in paths if os.path.isfile(p)]
    fmt = spec.format
    if fmt == "auto":
        kinds = {FORMAT_BY_SUFFIX.get(Path(p).suffix.lower(), "text") for p in paths}
        if len(kinds) > 1:
            raise RecipeError(
                f"data.files mixes formats {sorted(kinds)}; list files of one format, or set "
                "`data.format`"
            )
        fmt = kinds.pop()
    if fmt == "text":
        docs = []
        for path in paths:
            try:
                docs.append((path, Path(path).read_text(encoding="utf-8", errors="replace")))
            except OSError as err:
                raise RecipeError(f"data.files: cannot read {path!r}: {err}") from err
            if spec.max_documents and len(docs) >= spec.max_documents:
                break
        return docs
    if fmt == "disk":
        return _disk_documents(paths[0], spec)
    import datasets

    dataset = datasets.load_dataset(fmt, data_files=paths, split="train")
    return _records(dataset, spec, source=",".join(paths))


def _disk_documents(path: str, spec: DataSpec) -> list[Document]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise RecipeError(
            f"data.files: {path!r} is a directory but not one written by "
            "`datasets.save_to_disk`; list its files (e.g. `{path}/*.jsonl`) instead"
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        if spec.split not in dataset:
            raise RecipeError(
                f"data.split: {spec.split!r} is not in {path!r} (splits: {list(dataset)})"
            )
        dataset = dataset[spec.split]
    return _records(dataset, spec, source=path)


def _hub_documents(spec: DataSpec) -> list[Document]:
    import datasets

    try:
        dataset = datasets.load_dataset(spec.hub, spec.hub_config, split=spec.split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the fix is the same
        raise RecipeError(
            f"data.hub: could not load {spec.hub!r} (split {spec.split!r}): {err}. Check the id, "
            "`data.hub_config` and your network; offline, download it once and use "
            "`data.files` with the saved directory."
        ) from err
    return _records(dataset, spec, source=spec.hub or "")


def _records(dataset, spec: DataSpec, source: str) -> list[Document]:
    if spec.text_field not in dataset.column_names:
        raise RecipeError(
            f"data.text_field: column {spec.text_field!r} is not in {source!r} (columns: "
            f"{dataset.column_names}); set `data.text_field` to the column holding the text"
        )
    texts = dataset[spec.text_field]
    if spec.max_documents:
        texts = texts[: spec.max_documents]
    # Records have no path; the text itself is a stable id for the held-out split.
    return [(text, text) for text in texts if isinstance(text, str)]


def is_heldout(doc_id: str, eval_fraction: float) -> bool:
    """A stable split: the same document is held out on every machine and in every run."""
    digest = int(hashlib.md5(doc_id.encode("utf-8")).hexdigest(), 16)
    # md5 % 1000 sets the first three digits (so a fraction of 0.035 holds out exactly the files
    # with md5 % 1000 < 35, the quickstart's split); the next three refine it.
    position = (digest % 1000 + (digest // 1000) % 1000 / 1000) / 1000
    return position < eval_fraction


def split_documents(docs: list[Document], eval_fraction: float) -> tuple[list[str], list[str]]:
    if len(docs) < 2:
        raise RecipeError(
            f"data: found {len(docs)} document; at least 2 are needed (one to train on, one held "
            "out for evaluation); add text files or records"
        )
    train, held = [], []
    for doc_id, text in docs:
        (held if is_heldout(doc_id, eval_fraction) else train).append(text)
    if not held:
        # Tiny corpora can hash every document into train; hold out the last one instead.
        held.append(train.pop())
    if not train:
        raise RecipeError("data: every document fell into the held-out split; lower eval_fraction")
    return train, held


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], spec: TokenizerTrainSpec):
    """Byte-level BPE trained on the given texts, wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def limited() -> Iterable[str]:
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


# ----------------------------------------------------------------------------------------------
# Packing


def pack_documents(texts: list[str], tokenizer, seq_len: int, what: str) -> torch.Tensor:
    """Tokenize, append EOS to each document, concatenate, cut into full `seq_len` blocks."""
    if tokenizer.eos_token_id is None:
        raise RecipeError(
            "the tokenizer has no eos_token; set one (tokenizer.eos_token) so documents can be "
            "separated when packed"
        )
    ids: list[int] = []
    batch = 256
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        for doc in encoded:
            ids.extend(doc)
            ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise RecipeError(
            f"data: the {what} split yields {len(ids)} tokens, not one full block of "
            f"data.seq_len={seq_len}; add text or lower `data.seq_len`"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@dataclass
class PackedData:
    train: torch.Tensor  # [n_train_blocks, seq_len] token ids
    eval: torch.Tensor  # [n_eval_blocks, seq_len]

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def build_packed_data(spec: DataSpec, docs: list[Document], tokenizer) -> PackedData:
    train_texts, eval_texts = split_documents(docs, spec.eval_fraction)
    train = pack_documents(train_texts, tokenizer, spec.seq_len, "training")
    held = pack_documents(eval_texts, tokenizer, spec.seq_len, "held-out")
    return PackedData(train=train, eval=held[: spec.eval_max_blocks])


def save_packed(data: PackedData, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"train": data.train, "eval": data.eval}, tmp)
    os.replace(tmp, path)


def load_packed(path: Path) -> PackedData:
    blob = torch.load(path, weights_only=True)
    return PackedData(train=blob["train"], eval=blob["eval"])


# ----------------------------------------------------------------------------------------------
# Batch order


class BatchOrder:
    """Which blocks form each micro-batch, as a pure function of (step, micro-step, rank).

    Blocks are visited in a fresh seeded permutation each epoch. The optimizer step `s` consumes
    the global positions [s*G, (s+1)*G) with G = batch_size * grad_accum * world_size; rank r's
    micro-batch a takes a contiguous slice of them. The set of blocks an optimizer step sees
    depends only on G, so 1 process with grad_accum=2 sees what 2 processes with 1 see, and a
    resumed run needs nothing but the step number to continue the exact order.
    """

    def __init__(
        self, num_blocks: int, batch_size: int, grad_accum: int, world_size: int, seed: int
    ):
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            if len(self._perms) > 1:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.num_blocks, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return torch.stack(
            [self._perm(p // self.num_blocks)[p % self.num_blocks] for p in positions]
        )

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_blocks
