"""Token blocks for training and evaluation: full `seq_len` blocks cut from a split's stream of
EOS-separated documents, read from the store's memory maps (only the rows asked for are copied),
and the same packing in memory for small inputs such as calibration text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.data.store import ShardMap
from distill.errors import RecipeError


class StoreBlocks:
    """Block i is tokens [i*seq_len, (i+1)*seq_len) of the split; indexing with an int, a slice or
    a LongTensor of block indices returns int64 tensors ([seq_len] or [n, seq_len]), as a
    [num_blocks, seq_len] tensor would, without holding the split in memory."""

    def __init__(self, shards: list[ShardMap], seq_len: int):
        self.seq_len = seq_len
        self._maps = shards
        self._shards = [s.ids for s in shards]
        self._bounds = np.cumsum([0, *(len(s) for s in self._shards)])
        self._len = int(self._bounds[-1]) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key) -> torch.Tensor:
        try:
            return self._get(key)
        finally:
            for shard in self._maps:  # the rows are copied out: nothing needs the pages mapped
                shard.release()

    def _get(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step == 1:
                count = max(stop - start, 0)
                flat = self._read(start * self.seq_len, count * self.seq_len)
                return torch.from_numpy(flat.reshape(count, self.seq_len))
            rows = list(range(start, stop, step))
        elif isinstance(key, int) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            row = int(key)
            row = row + self._len if row < 0 else row
            self._check(row)
            return torch.from_numpy(self._read(row * self.seq_len, self.seq_len))
        else:
            rows = torch.as_tensor(key).reshape(-1).tolist()
        out = np.empty((len(rows), self.seq_len), dtype=np.int64)
        for i, row in enumerate(rows):
            self._check(row)
            out[i] = self._read(row * self.seq_len, self.seq_len)
        return torch.from_numpy(out)

    def _check(self, row: int) -> None:
        if not 0 <= row < self._len:
            raise IndexError(f"block {row} is out of range for {self._len} blocks")

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start+count) as int64, gathered across shard boundaries."""
        out = np.empty(count, dtype=np.int64)
        shard = int(np.searchsorted(self._bounds, start, side="right")) - 1
        filled = 0
        while filled < count:
            offset = start + filled - int(self._bounds[shard])
            take = min(count - filled, len(self._shards[shard]) - offset)
            out[filled : filled + take] = self._shards[shard][offset : offset + take]
            filled += take
            shard += 1
        return out


@dataclass
class PackedData:
    train: StoreBlocks | torch.Tensor  # [n_train_blocks, seq_len] token ids
    eval: torch.Tensor  # [n_eval_blocks, seq_len], in memory (at most eval_max_blocks)

    @property
    def seq_len(self) -> int:
        return self.eval.shape[1]


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
        raise RecipeError(not_one_block(what, len(ids), seq_len))
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def not_one_block(what: str, tokens: int, seq_len: int) -> str:
    return (
        f"data: the {what} split yields {tokens} tokens, not one full block of "
        f"data.seq_len={seq_len}; add text or lower `data.seq_len`"
    )
