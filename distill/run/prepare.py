"""The tokenizer and the token store of a run: built by the main process, memory-mapped by all
(see distill.data.prepare)."""

from __future__ import annotations

from distill.data.prepare import prepare_data
from distill.run.context import RunContext


def prepare_tokenizer_and_data(ctx: RunContext) -> None:
    prepared = prepare_data(
        ctx.recipe,
        ctx.out_dir,
        is_main=ctx.is_main,
        wait_for_everyone=ctx.accelerator.wait_for_everyone,
        log=ctx.log,
    )
    ctx.tokenizer, ctx.data = prepared.tokenizer, prepared.data
    ctx.data_fingerprint = prepared.fingerprint
