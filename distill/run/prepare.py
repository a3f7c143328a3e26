"""The tokenizer and the token store of a run: built by the main process, memory-mapped by all
(see distill.data.prepare)."""

from __future__ import annotations

from distill.data.prepare import prepare_data
from distill.errors import StopRequested
from distill.run.context import RunContext
from distill.runtime import signals


def prepare_tokenizer_and_data(ctx: RunContext) -> None:
    acc = ctx.accelerator
    stopped = []

    def barrier() -> None:
        """The others wait here while the main process prepares; a stop reaches them too."""
        acc.wait_for_everyone()
        if signals.stop_agreed(acc, also=bool(stopped)):
            raise StopRequested(None, "data preparation")

    try:
        prepared = prepare_data(
            ctx.recipe, ctx.out_dir, is_main=ctx.is_main, wait_for_everyone=barrier, log=ctx.log
        )
    except StopRequested:  # the main process's build, stopped before the others' barrier
        if acc.num_processes == 1:
            raise
        stopped.append(True)
        barrier()
        raise
    ctx.tokenizer, ctx.data = prepared.tokenizer, prepared.data
    ctx.data_fingerprint = prepared.fingerprint
