"""The eval sets of a run: `heldout` (the training data's held-out split) and every set of
`eval.sets`, tokenized with the run's tokenizer into `seq_len` blocks and cached under
`<output_dir>/eval/`."""

from __future__ import annotations

import os
import sysconfig

import torch

from distill.config import DataSpec, EvalSpec, HubEvalSet
from distill.data.blocks import pack_documents
from distill.data.documents import load_documents
from distill.data.identity import input_identity
from distill.errors import RecipeError
from distill.run.context import RunContext

HELDOUT = "heldout"


def _data_spec(source: list[str] | HubEvalSet) -> DataSpec:
    if isinstance(source, HubEvalSet):
        return DataSpec(
            hub=source.hub,
            hub_config=source.config,
            split=source.split,
            text_field=source.text_field,
        )
    stdlib = sysconfig.get_paths()["stdlib"]
    return DataSpec(files=[pattern.replace("${stdlib}", stdlib) for pattern in source])


def set_identity(source: list[str] | HubEvalSet) -> list:
    """What an eval set is: its settings and each of its files' identity (an edited file is
    tokenized again, and the stages measured on it run again)."""
    data = _data_spec(source)
    return [data.model_dump(mode="json"), input_identity(data)]


def eval_sets(ctx: RunContext, spec: EvalSpec) -> dict[str, torch.Tensor]:
    """Name -> [blocks, seq_len] token ids, `heldout` first."""
    sets = {HELDOUT: ctx.data.eval}
    seq_len = ctx.data.eval.shape[1]
    for name, source in spec.sets.items():
        fp = ctx.recipe.fingerprint(ctx.data_fingerprint, name, set_identity(source), seq_len)
        path = ctx.out_dir / "eval" / f"{name}-{fp}.pt"
        if not path.is_file():
            try:
                texts = [text for _, text in load_documents(_data_spec(source))]
                blocks = pack_documents(texts, ctx.tokenizer, seq_len, f"eval set {name!r}")
            except RecipeError as err:  # its messages name `data.*`; this is an eval set
                raise RecipeError(f"eval.sets.{name}: {err}") from None
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(blocks, tmp)
            os.replace(tmp, path)
        sets[name] = torch.load(path, weights_only=True)[: spec.set_max_blocks]
    return sets
