"""The `distill` command. Heavy libraries are imported inside each command, so `--help` is fast."""

from __future__ import annotations

import argparse
import json
import os
import sys

from distill.specs import HEAD_UNITS, PRUNE_METHODS, PRUNE_SCOPES, PRUNE_SCORINGS, PruneSpec


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="override any recipe field, e.g. stages.distilled.train.lr=1e-3 data.seq_len=256",
    )
    p.add_argument("--output-dir", help="write here instead of the recipe's output_dir")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (`--max-steps 0` would mark stages finished that never
    trained)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _default(key: str):
    """A `distill prune` flag's default: the PruneSpec field's (one declared home)."""
    return PruneSpec.model_fields[key].default


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    """`distill prune`'s flags: one per PruneSpec field (same names, dashes for underscores)."""
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="where to save the pruned model")
    p.add_argument("--method", required=True, choices=PRUNE_METHODS)
    p.add_argument(
        "--sparsity",
        type=float,
        default=_default("sparsity"),
        help="magnitude, wanda: fraction of zero weights",
    )
    p.add_argument(
        "--scope",
        choices=PRUNE_SCOPES,
        default=_default("scope"),
        help="magnitude: rank weights per matrix or across all",
    )
    p.add_argument("--n", type=int, default=_default("n"), help="nm: weights kept per group")
    p.add_argument("--m", type=int, default=_default("m"), help="nm: group size")
    p.add_argument(
        "--scoring", choices=PRUNE_SCORINGS, default=_default("scoring"), help="nm: weight score"
    )
    p.add_argument(
        "--heads-fraction",
        type=float,
        default=_default("heads_fraction"),
        help="width: fraction of heads removed",
    )
    p.add_argument(
        "--head-unit",
        choices=HEAD_UNITS,
        default=_default("head_unit"),
        help="width: remove whole KV groups, or query heads within every group (GQA)",
    )
    p.add_argument(
        "--mlp-fraction",
        type=float,
        default=_default("mlp_fraction"),
        help="width: fraction of MLP channels removed",
    )
    p.add_argument(
        "--multiple-of",
        type=int,
        default=_default("multiple_of"),
        help="width: MLP channels kept at a multiple of N (int4 groups, GGUF blocks); 1: exact",
    )
    p.add_argument(
        "--heads-multiple-of",
        type=int,
        default=_default("heads_multiple_of"),
        help="width: heads kept at a multiple of N (vLLM tensor parallelism over N GPUs)",
    )
    p.add_argument(
        "--layers",
        help="depth: a count to remove (ranked on calibration data), or 0-based indices with "
        "commas: 1,3 (one index: 3,)",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="FILE",
        help="text/JSONL/Parquet file(s) or globs for calibration activations (wanda, nm with "
        "wanda scoring, width, depth by rank)",
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=_default("calibration_batches"),
        help="batches of 8 blocks",
    )
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per calibration block")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="load and save in this dtype (auto: as stored)",
    )


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a model dir to GGUF, compressed-tensors or safetensors"
    )
    p.add_argument("model_dir")
    p.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help="safetensors-bf16, safetensors-fp16, gguf-f32, gguf-f16, gguf-bf16, gguf-q8_0, "
        "gguf-q4_0, ct-w4a16, ct-w8a16",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=-1,
        help="ct-*: input columns per scale, 32, 64 or 128 (default 32), 0 = per output channel",
    )
    p.add_argument("--embeddings", help="gguf-*: type of token embeddings and output: q8_0 or f16")
    p.add_argument("--dtype", help="ct-*: dtype of scales and float tensors (default bfloat16)")
    p.add_argument("--out", help="output directory (default: MODEL_DIR-FORMAT beside it)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="load the export back (transformers; llama.cpp too when installed) and generate",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distill, prune and quantize language models, from a YAML recipe.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run every stage of a recipe (finished stages are skipped)")
    _add_recipe_args(p)
    p.add_argument(
        "--max-steps", type=positive_int, help="cap every training stage at N steps (dry run)"
    )
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume from a checkpoint even if it was written with other settings",
    )

    p = sub.add_parser("data", help="prepare a recipe's tokenizer and token store, print stats")
    _add_recipe_args(p)
    p.add_argument("--verify", action="store_true", help="also check every file's sha256")

    p = sub.add_parser(
        "cache-teacher",
        help="run a recipe up to its cache-teacher stage: write the offline teacher cache",
    )
    _add_recipe_args(p)
    p.add_argument("--stage", help="the cache-teacher stage (default: the first)")

    p = sub.add_parser("check", help="validate a recipe and print it fully resolved")
    _add_recipe_args(p)

    p = sub.add_parser(
        "eval", help="every metric of a recipe's `eval` section, of any model dir or artifact"
    )
    p.add_argument("model_dir", help="a stage's model/ dir or an exported artifact")
    p.add_argument("--recipe", required=True, help="recipe whose eval section and data to use")
    p.add_argument("--output-dir", help="the recipe run's output dir (for its tokenizer and data)")
    p.add_argument("--teacher", help="a model dir to measure top-1 agreement and KL against")
    p.add_argument(
        "--latency", action="store_true", help="also measure generation (tokens/s, first token)"
    )

    _add_prune_args(sub.add_parser("prune", help="prune a model directory and save the result"))

    p = sub.add_parser("bench", help="throughput, MFU and peak memory of a recipe's training step")
    _add_recipe_args(p)
    p.add_argument("--stage", help="the training stage to measure (default: first distill stage)")
    p.add_argument("--steps", type=positive_int, default=5, help="measured steps per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--paths",
        default="auto",
        help="paths to compare: loss paths chunked,naive (auto, unless the stage reads a teacher "
        "cache) or cache,online,ce_only (auto for a stage reading a cache)",
    )
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")

    _add_export_parser(sub)

    p = sub.add_parser("report", help="rewrite report.md/png from a run's summary.json")
    p.add_argument("output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand before or after options (`run R --max-steps 3 a.b=1`); argparse alone
    # stops collecting positionals at the first option.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from distill.errors import EXIT_INTERRUPTED, DistillError, StopRequested
    from distill.runtime.signals import exit_with_launcher

    exit_with_launcher()
    code, stop = 1, None  # an exception none of these takes ends Python with 1
    try:
        code = COMMANDS[args.command](args)
    except StopRequested as err:
        if _is_main_rank():
            print(f"distill: {err}", file=sys.stderr)
        code, stop = err.exit_code, err
    except DistillError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        _leave_process_group()
        _record_exit(code, stop)
    return code


EXIT_FILE_ENV = "DISTILL_EXIT_FILE"


def _record_exit(code: int, stop) -> None:
    """How the command ended, for a wrapper that cannot see it (torchrun reports any worker's
    failure as its own exit code 1): written by each node's first process, to DISTILL_EXIT_FILE
    when set (slurm/launch_node.sh sets it), as `key=value` lines."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    lines = [f"code={code}"]
    if stop is not None:
        lines += [f"checkpoint={stop.checkpoint or ''}", f"phase={stop.phase or ''}"]
    try:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    except OSError as err:
        print(f"distill: could not record the exit code in {path}: {err}", file=sys.stderr)


def _leave_process_group() -> None:
    """Every exit, errors included and on every rank, leaves the process group first: a process
    that exits with gloo's threads still running aborts (SIGABRT) instead of returning its code."""
    if "torch.distributed" not in sys.modules:  # nothing distributed was ever started
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _load(args):
    from distill.recipe_file import load_recipe

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_recipe(args.recipe, overrides)


def cmd_run(args) -> int:
    from distill.run.pipeline import run_recipe

    recipe = _load(args)
    results = run_recipe(recipe, max_steps=args.max_steps, force_resume=args.force_resume)
    out = recipe.resolved_output_dir
    if _is_main_rank():
        print(
            f"done: {len(results)} stages; summary {out / 'summary.json'}, report {out / 'report.md'}"
        )
    return 0


def cmd_cache_teacher(args) -> int:
    from distill.errors import RecipeError
    from distill.run.pipeline import run_recipe

    recipe = _load(args)
    caches = [stage.name for stage in recipe.stages if stage.kind == "cache-teacher"]
    name = args.stage or (caches[0] if caches else None)
    if name not in caches:
        raise RecipeError(
            f"--stage {name!r} is not a cache-teacher stage of the recipe; cache-teacher stages: "
            f"{', '.join(caches) or 'none (add one: kind: cache-teacher, model: <teacher>)'}"
        )
    results = run_recipe(recipe, until=name)
    if _is_main_rank():
        print(f"done: teacher cache {results[-1].model_dir}")
    return 0


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_data(args) -> int:
    from distill.data.prepare import run_data_command
    from distill.run.lock import hold_output_lock
    from distill.runtime.signals import watch

    recipe = _load(args)
    log = lambda message: print(f"[distill] {message}", file=sys.stderr, flush=True)  # noqa: E731
    with watch(), hold_output_lock(recipe.resolved_output_dir, None, log):
        return run_data_command(recipe, verify=args.verify)


def cmd_check(args) -> int:
    from distill.recipe_file import recipe_to_yaml

    recipe = _load(args)
    print(recipe_to_yaml(recipe), end="")
    print(f"# recipe OK: {len(recipe.stages)} stages", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from distill.models import count_params, dir_size_bytes
    from distill.recipe_file import load_recipe
    from distill.run.artifacts import load_artifact
    from distill.run.context import RunContext
    from distill.run.evaluate_stage import evaluate_model
    from distill.run.prepare import prepare_tokenizer_and_data
    from distill.runtime.distributed import make_accelerator
    from distill.runtime.evaluate import heldout_metrics

    overrides = [f"output_dir={args.output_dir}"] if args.output_dir else []
    recipe = load_recipe(args.recipe, overrides)
    ctx = RunContext(recipe, recipe.resolved_output_dir)
    ctx.accelerator = make_accelerator(1)
    prepare_tokenizer_and_data(ctx)
    spec = recipe.eval.model_copy(update={"latency": True}) if args.latency else recipe.eval
    artifact = load_artifact(args.model_dir)
    teacher = load_artifact(args.teacher).model if args.teacher else None
    model = artifact.model
    metrics = evaluate_model(ctx, model, spec, teacher)
    if args.teacher:
        metrics["teacher"]["model"] = args.teacher
    result = {
        "model_dir": args.model_dir,
        "format": artifact.format,
        "params": count_params(model),
        "size_bytes": dir_size_bytes(args.model_dir),
        **({"scheme": artifact.scheme} if artifact.scheme else {}),
        # the number a stage records as eval.perplexity, computed the same way
        **heldout_metrics(model, ctx.data.eval, spec.batch_size, len(ctx.tokenizer)),
        "metrics": metrics,
    }
    if args.latency:
        result["latency_s"] = spec.latency_tokens / metrics["speed"]["tokens_per_s"]
    print(json.dumps(result, indent=2))
    return 0


def cmd_prune(args) -> int:
    from distill.cli_prune import run_prune_command

    return run_prune_command(args)


def cmd_bench(args) -> int:
    from distill.bench.run import run_bench_command

    return run_bench_command(args)


def cmd_export(args) -> int:
    from distill.compress.export import export_model, plan_export, verify_export

    plan_export(args.format, args.group_size, args.embeddings, args.dtype)  # fail before loading
    out = args.out or f"{args.model_dir.rstrip('/')}-{args.format}"
    result = export_model(
        args.model_dir, out, args.format, args.group_size, args.embeddings, args.dtype
    )
    report = result.to_dict()
    if args.verify:
        report["verify"] = verify_export(result)
    print(json.dumps(report, indent=2))
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from distill.run.report import write_report

    out = Path(args.output_dir)
    summary = out / "summary.json"
    if not summary.is_file():
        from distill.errors import RecipeError

        raise RecipeError(f"{summary} does not exist; give the output dir of a `distill run`")
    from distill.run.results import StageResult

    try:
        entries = json.loads(summary.read_bytes())["stages"]
        for entry in entries:  # what the report reads of each stage
            StageResult.from_json(entry)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        from distill.errors import RecipeError

        raise RecipeError(
            f"{summary} is not a run summary ({type(err).__name__}: {err}); it was cut short or "
            "edited: run the recipe again (finished stages are skipped) to rewrite it"
        ) from None
    print(write_report(out, out.name, entries))
    return 0


COMMANDS = {
    "run": cmd_run,
    "data": cmd_data,
    "cache-teacher": cmd_cache_teacher,
    "check": cmd_check,
    "eval": cmd_eval,
    "prune": cmd_prune,
    "bench": cmd_bench,
    "export": cmd_export,
    "report": cmd_report,
}


if __name__ == "__main__":
    sys.exit(main())
