"""What every stage of a run shares: the recipe, the output folder, the tokenizer and data, and the
stages finished so far; and how a stage reaches a model by reference (an earlier stage's output or a
key of `models`)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from distill.config import ModelSpec, Recipe
from distill.errors import DamagedOutput, RecipeError
from distill.manifest import file_manifest, manifest_problem, path_identity
from distill.models import (
    build_model,
    check_head_covers_tokenizer,
    check_same_tokenizer,
    check_seq_len,
    has_tokenizer,
    load_pretrained,
    load_tokenizer,
)
from distill.run.results import StageResult

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from distill.data.blocks import PackedData

STAGE_DONE = "stage.json"


@dataclass
class RunContext:
    """A run of a recipe, as its stages see it."""

    recipe: Recipe
    out_dir: Path
    max_steps: int | None = None
    """`--max-steps`: every training stage capped at this many steps."""
    force_resume: bool = False
    accelerator: Accelerator | None = None
    """The run's process group (barriers, the main process); a training stage trains under an
    accelerator of its own."""
    tokenizer: PreTrainedTokenizerBase | None = None
    data: PackedData | None = None
    data_fingerprint: str = ""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Stage name -> fingerprint of its settings and everything upstream."""
    results: list[StageResult] = field(default_factory=list)
    """The stages finished so far, in order."""
    unverified: dict[str, dict] = field(default_factory=dict)
    """Stage name -> the files its record lists, for finished stages this process did not run:
    checked (size and sha256) when a later stage first reads that output."""
    prompts: object = None
    """On-policy prompts (a data.prompts.PromptSets), tokenized on first use."""

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[distill] {message}", file=sys.stderr, flush=True)


def stage_dir(ctx: RunContext, name: str) -> Path:
    return ctx.out_dir / name


def model_dir(ctx: RunContext, name: str) -> Path:
    return stage_dir(ctx, name) / "model"


def read_stage_record(ctx: RunContext, name: str) -> dict | None:
    """A finished stage's record (`stage.json`: its fingerprint, summary entry and output files),
    or None."""
    done = stage_dir(ctx, name) / STAGE_DONE
    return _parse_record(done) if done.is_file() else None


def _parse_record(done: Path) -> dict:
    """A truncated or edited record names itself and the fix, whatever the JSON parser says."""
    try:
        record = json.loads(done.read_bytes())
        StageResult.from_json(record["entry"])
        if "fingerprint" in record:
            return record
        problem = "has no `fingerprint`"
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        problem = f"is not valid JSON ({err})"
    except (KeyError, TypeError, AttributeError) as err:
        problem = f"lacks part of its entry ({type(err).__name__}: {err})"
    raise DamagedOutput(
        f"{done} {problem}: the record of a finished stage was cut short or edited. Delete it to "
        "run the stage again (it resumes from its last checkpoint, if any), or delete the whole "
        f"folder {done.parent} to start the stage afresh"
    )


def stage_record(ctx: RunContext, fingerprint: str, result: StageResult) -> dict:
    """What `stage.json` holds: paths relative to the run folder (a moved or copied run reads its
    own files), and the size and sha256 of every file the stage wrote."""
    output = Path(result.model_dir) if result.model_dir else None
    own = output is not None and _inside(output, stage_dir(ctx, result.name))
    if result.kind == "cache-teacher":
        own = False  # a teacher cache checks its shards itself, and can be terabytes
    return {
        "fingerprint": fingerprint,
        "entry": summary_entry(ctx, result),
        "files": file_manifest(output) if own and output.exists() else {},
    }


def summary_entry(ctx: RunContext, result: StageResult) -> dict:
    """The result as `summary.json` and `stage.json` store it: an output inside the run folder
    named relative to it."""
    entry = result.to_json()
    if result.model_dir and _inside(Path(result.model_dir), ctx.out_dir):
        entry["model_dir"] = _relative(Path(result.model_dir), ctx.out_dir)
    return entry


def result_of_record(ctx: RunContext, name: str, record: dict) -> StageResult:
    """A finished stage's result from its record, its output found inside this run folder; its
    files are checked when a later stage reads them."""
    entry = dict(record["entry"])
    stored = entry.get("model_dir") or ""
    if stored and not Path(stored).is_absolute():
        entry["model_dir"] = str(ctx.out_dir / stored)
    elif stored and not _inside(Path(stored), ctx.out_dir) and stored not in _named_paths(ctx):
        raise DamagedOutput(
            f"{stage_dir(ctx, name) / STAGE_DONE} says the output of stage {name!r} is {stored}, "
            f"outside this run folder ({ctx.out_dir}); the folder was moved or copied from a run "
            "of an older distill. Delete that stage.json to run the stage again here"
        )
    ctx.unverified[name] = record.get("files") or {}
    result = StageResult.from_json(entry)
    problem = manifest_problem(Path(result.model_dir), ctx.unverified[name], hashes=False)
    if problem:
        raise _damaged(ctx, name, problem)
    return result


def _named_paths(ctx: RunContext) -> set[str]:
    """Paths outside the run folder that the recipe itself names (an `evaluate` stage of a
    `models` path)."""
    return {spec.path for spec in ctx.recipe.models.values() if spec.path}


def _damaged(ctx: RunContext, name: str, problem: str) -> DamagedOutput:
    return DamagedOutput(
        f"the output of the finished stage {name!r} is damaged: {problem}. Nothing was read "
        f"from it. Delete {stage_dir(ctx, name) / STAGE_DONE} to run the stage again (it resumes "
        "from its last checkpoint when one is left), or restore the file"
    )


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _relative(path: Path, root: Path) -> str:
    return path.resolve().relative_to(root.resolve()).as_posix()


def earlier_stage(ctx: RunContext, ref: str) -> StageResult | None:
    """The result of the earlier stage named `ref` (None when `ref` is a `models` key), its
    output's files checked against their record the first time this process reads them."""
    for result in ctx.results:
        if result.name == ref:
            files = ctx.unverified.pop(ref, None)
            problem = files and manifest_problem(Path(result.model_dir), files)
            if problem:
                raise _damaged(ctx, ref, problem)
            return result
    return None


def root_model_key(recipe: Recipe, ref: str) -> tuple[str, list]:
    """The `models` key a reference leads to when no earlier stage has run (`distill bench` builds
    models fresh), following each stage's `model`; and the prune stages passed on the way."""
    prunes = []
    while ref not in recipe.models:
        upstream = recipe.stage(ref)
        if upstream.kind == "prune":
            prunes.append(upstream)
        ref = upstream.model
    return ref, prunes


def _spec_of(ctx: RunContext, ref: str) -> ModelSpec:
    return ctx.recipe.models[root_model_key(ctx.recipe, ref)[0]]


def ref_fingerprint(ctx: RunContext, ref: str) -> str:
    """An earlier stage's fingerprint, or a `models` spec's settings and the identity of the
    files it points at (weights replaced under the same `path:` rerun what depends on them)."""
    if ref in ctx.fingerprints:
        return ctx.fingerprints[ref]
    spec = ctx.recipe.models[ref]
    return ctx.recipe.fingerprint(
        spec.model_dump(mode="json"), path_identity(spec.path, spec.revision)
    )


def load_ref(ctx: RunContext, ref: str, what: str, dtype: str | None = None):
    """A model by reference: an earlier stage's output, or a spec of `models`."""

    entry = earlier_stage(ctx, ref)
    if entry is not None:
        return load_pretrained(
            entry.model_dir, what=f"{what} (stage {ref!r})", dtype=dtype or "float32"
        )
    spec = _spec_of(ctx, ref)
    if dtype is not None and spec.dtype == "float32":
        spec = spec.model_copy(update={"dtype": dtype})
    return build_model(spec, ctx.tokenizer, seed=ctx.recipe.seed, what=ref)


def ref_config(ctx: RunContext, ref: str):
    """The transformers config of a model by reference, without loading its weights."""
    from transformers import AutoConfig

    entry = earlier_stage(ctx, ref)
    if entry is not None:
        return AutoConfig.from_pretrained(entry.model_dir)
    spec = _spec_of(ctx, ref)
    if spec.config is not None:
        fields = dict(spec.config)
        if "vocab_size" not in fields:
            fields["vocab_size"] = len(ctx.tokenizer)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(
        os.path.expanduser(spec.path),
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
    )


def ref_spec(ctx: RunContext, ref: str) -> ModelSpec | None:
    return None if earlier_stage(ctx, ref) is not None else _spec_of(ctx, ref)


def check_model_against_tokenizer(ctx: RunContext, ref: str, model, what: str) -> None:

    spec = ref_spec(ctx, ref)
    if (
        spec is not None
        and spec.path
        and (has_tokenizer(spec.path) or not os.path.isdir(spec.path))
    ):
        try:
            own = load_tokenizer(spec.path, what, spec.trust_remote_code)
        except RecipeError:
            own = None
        if own is not None:
            check_same_tokenizer(
                ctx.tokenizer, own, "the recipe's tokenizer", f"{what} ({spec.path})"
            )
    check_head_covers_tokenizer(model, ctx.tokenizer, what)
    check_seq_len(model, ctx.recipe.data.seq_len, what)
