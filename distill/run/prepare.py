"""The tokenizer and the packed data of a run, prepared once and cached by fingerprint."""

from __future__ import annotations

import shutil
import time

from distill import data as data_mod
from distill.config import Recipe
from distill.errors import RecipeError
from distill.models import load_tokenizer
from distill.run.context import RunContext


def prepare_tokenizer_and_data(ctx: RunContext) -> None:

    recipe, acc = ctx.recipe, ctx.accelerator
    tok_dir = ctx.out_dir / "tokenizer"
    tok_fp = recipe.fingerprint(
        recipe.tokenizer.model_dump(mode="json"),
        _tokenizer_origin(recipe),
        recipe.data.model_dump(mode="json") if recipe.tokenizer.source == "train" else None,
    )
    data_fp = recipe.fingerprint(tok_fp, recipe.data.model_dump(mode="json"))
    data_path = ctx.out_dir / "data" / f"packed-{data_fp}.pt"
    with acc.main_process_first():
        if ctx.is_main:
            marker = tok_dir / "distill_fingerprint.txt"
            docs = None
            if not (marker.is_file() and marker.read_text() == tok_fp):
                t0 = time.perf_counter()
                if recipe.tokenizer.source == "train":
                    docs = data_mod.load_documents(recipe.data)
                    train_texts, _ = data_mod.split_documents(docs, recipe.data.eval_fraction)
                    tokenizer = data_mod.train_tokenizer(train_texts, recipe.tokenizer.train)
                else:
                    tokenizer = load_tokenizer(_tokenizer_origin(recipe), "tokenizer")
                if tok_dir.exists():
                    shutil.rmtree(tok_dir)
                tokenizer.save_pretrained(tok_dir)
                marker.write_text(tok_fp)
                ctx.log(
                    f"tokenizer ready ({len(tokenizer)} tokens, {time.perf_counter() - t0:.1f} s)"
                )
            if not data_path.is_file():
                t0 = time.perf_counter()
                tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
                docs = docs or data_mod.load_documents(recipe.data)
                packed = data_mod.build_packed_data(recipe.data, docs, tokenizer)
                data_path.parent.mkdir(parents=True, exist_ok=True)
                data_mod.save_packed(packed, data_path)
                ctx.log(
                    f"data ready: {len(docs)} documents, {packed.train.numel():,} training tokens "
                    f"in {len(packed.train)} blocks, {len(packed.eval)} held-out blocks "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
    ctx.tokenizer = load_tokenizer(str(tok_dir), "tokenizer")
    ctx.data = data_mod.load_packed(data_path)
    ctx.data_fingerprint = data_fp


def _tokenizer_origin(recipe: Recipe) -> str | None:
    tok = recipe.tokenizer
    if tok.source == "train":
        return None
    if tok.source == "path":
        return tok.path
    for spec in recipe.models.values():
        if spec.path:
            return spec.path
    raise RecipeError(
        "tokenizer.source is `model` but no model in `models` has a `path` to take it from; "
        "use `tokenizer.source: train` or `tokenizer.source: path`"
    )
