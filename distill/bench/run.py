"""`distill bench`: throughput, MFU and peak memory of a recipe's training step on this hardware.

The step measured is the trainer's: `teacher_forward`, then `DistillModule` (student forward and the
objective), backward, gradient clipping, AdamW, with the models, batch shape, precision and objective
of one training stage. Models come from the recipe's specs (a config: random init, seeded; a path:
loaded); batches are random token ids, so no data or tokenizer is needed. Each loss path (chunked,
naive) runs in isolation: fresh models from the same seed, warm-up steps, then the median of the
measured steps.

FLOPs: N = weights of every matmul (the lm_head counted even when tied, the
embedding lookup not), A = heads x head_dim, L = layers, S = sequence length;
student F_s = 6 N_s + 12 L_s A_s S, teacher F_t = 2 N_t + 4 L_t A_t S, per token.
MFU = step FLOPs / step time / peak, against a matmul peak measured in the same run and against the
spec sheet's dense bf16 peak when the card is known.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`. On CPU there is no allocator counter, so
the bytes of live tensor storages are tracked op by op (a TorchDispatchMode) during one extra step,
on top of the bytes held before it (weights, optimizer state). The "loss" peak is the objective
alone, forward and backward, from fixed final hidden states: what the chunked path exists to shrink.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.bench.flops import (
    _sync,
    measure_matmul_peak,
    spec_peak_flops,
    student_flops_per_token,
    teacher_flops_per_token,
)
from distill.bench.memory import PeakMemory, tensor_bytes
from distill.bench.on_policy import bench_on_policy, format_on_policy
from distill.bench.step import (
    LOSS_PATHS,
    TEACHER_PATHS,
    StepShapes,
    build_train_step,
    loss_only_peak_bytes,
    pick_stage,
    run_train_step,
    step_shapes,
)
from distill.config import Recipe
from distill.errors import RecipeError
from distill.recipe_file import load_recipe
from distill.runtime.distributed import make_accelerator

PATHS = LOSS_PATHS + TEACHER_PATHS

# Dense bf16 tensor-core peaks from the vendors' spec sheets, matched in this order against
# torch.cuda.get_device_name() (H100 PCIe before the SXM default).


# ----------------------------------------------------------------------------------------------
# The FLOP model


# ----------------------------------------------------------------------------------------------
# Memory on CPU: live tensor storage bytes, tracked op by op


# ----------------------------------------------------------------------------------------------
# Building one stage's training step from a recipe


# ----------------------------------------------------------------------------------------------
# Measuring


@dataclass
class PathResult:
    ms_per_step: float
    tokens_per_s: float
    mfu: float | None
    """Against the matmul peak measured in this run."""
    mfu_spec: float | None
    """Against the spec sheet's dense bf16 peak (null when the card or precision is not known)."""
    peak_memory_bytes: int
    loss_peak_memory_bytes: int
    loss_first_step: float
    """Mean loss of the first step: the paths compute the same objective, so these agree."""
    ms_per_step_all: list[float] = field(default_factory=list)


def bench_path(
    recipe: Recipe,
    stage,
    path: str,
    device: torch.device,
    steps: int,
    warmup: int,
    notes: list[str],
    acc,
) -> tuple[PathResult, StepShapes]:
    """Build fresh models (same seed), warm up, time `steps` steps, then measure memory: one path
    alone on the device (CUDA: its allocator peak is that path's own).

    Returns the result (MFU left to the caller, who knows the FLOPs) and the step's shapes.
    """
    _free_memory(device)
    step = build_train_step(recipe, stage, path, device, notes)
    shapes = step_shapes(step)
    _free_memory(device)  # building in float32 then casting leaves garbage that is not the step's
    # CUDA: the allocator's peak over the steps, from the weights up. CPU: see _path_result.
    with PeakMemory(device) if device.type == "cuda" else nullcontext() as cuda_peak:
        times, step_losses = [], []
        for index in range(warmup + steps):
            seconds, loss = _timed_step(step, acc, device)
            step_losses.append(loss)
            if index >= warmup:
                times.append(seconds)
    result = _path_result(recipe, stage, step, times, step_losses[0], cuda_peak, device, acc)
    del step
    _free_memory(device)
    return result, shapes


def bench_paths_interleaved(
    recipe: Recipe,
    stage,
    paths: tuple[str, ...],
    device: torch.device,
    steps: int,
    warmup: int,
    notes: list[str],
    acc,
) -> dict[str, tuple[PathResult, StepShapes]]:
    """Every path built at once and timed in rounds, one step of each per round (the first path
    of a round rotating): on a CPU shared with other processes, timed one after the other, the
    same step measured up to 25 % faster or slower by when it ran (the quickstart's cache step:
    0.77x to 1.09x the CE-only step), while alternating steps see the same machine. Memory is
    measured per path afterwards (tracked tensors, as alone)."""
    built = {path: build_train_step(recipe, stage, path, device, notes) for path in paths}
    _free_memory(device)
    times: dict[str, list[float]] = {path: [] for path in paths}
    first_loss: dict[str, float] = {}
    for index in range(warmup + steps):
        for offset in range(len(paths)):
            path = paths[(index + offset) % len(paths)]
            seconds, loss = _timed_step(built[path], acc, device)
            first_loss.setdefault(path, loss)
            if index >= warmup:
                times[path].append(seconds)
    out = {}
    for path, step in built.items():
        result = _path_result(recipe, stage, step, times[path], first_loss[path], None, device, acc)
        out[path] = (result, step_shapes(step))
    return out


def _measure_paths(recipe, stage, paths, device, steps, warmup, notes, acc, log) -> dict:
    """Every path's (result, shapes): on CPU in alternating rounds, else one after the other,
    each alone on the device (a CUDA peak is then the path's own)."""
    if device.type == "cpu" and len(paths) > 1:
        log(f"paths {', '.join(paths)}: {warmup} warm-up + {steps} measured rounds, alternating")
        return bench_paths_interleaved(recipe, stage, paths, device, steps, warmup, notes, acc)
    tokens = recipe.data.seq_len * stage.train.batch_size * stage.train.grad_accum
    measured = {}
    for path in paths:
        log(f"path {path}: {warmup} warm-up + {steps} measured steps of {tokens:,} tokens...")
        measured[path] = bench_path(recipe, stage, path, device, steps, warmup, notes, acc)
    return measured


def _timed_step(step, acc, device: torch.device) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    loss = run_train_step(step, acc)
    _sync(device)
    return time.perf_counter() - t0, float(loss)


def _path_result(recipe, stage, step, times, first_loss, cuda_peak, device, acc) -> PathResult:
    """The timings as a result, with the step's memory: CUDA, the allocator's peak over the timed
    steps; CPU, one more step with its tensors tracked, on top of weights and optimizer state."""
    if cuda_peak is not None:
        peak_bytes = cuda_peak.peak_bytes
    else:
        held = tensor_bytes(step.module, step.teacher, step.optimizer, *step.batches)
        with PeakMemory(device, base_bytes=held) as cpu_peak:
            run_train_step(step, acc)
        peak_bytes = cpu_peak.peak_bytes
    seconds = statistics.median(times)
    tokens = recipe.data.seq_len * stage.train.batch_size * stage.train.grad_accum
    return PathResult(
        ms_per_step=seconds * 1e3,
        tokens_per_s=tokens / seconds,
        mfu=None,
        mfu_spec=None,
        peak_memory_bytes=int(peak_bytes),
        loss_peak_memory_bytes=int(loss_only_peak_bytes(step, device)),
        loss_first_step=first_loss,
        ms_per_step_all=[t * 1e3 for t in times],
    )


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def run_bench(
    recipe: Recipe,
    stage_name: str | None = None,
    paths: tuple[str, ...] = LOSS_PATHS,
    steps: int = 5,
    warmup: int = 2,
    device: torch.device | None = None,
    log=print,
) -> dict:
    """Measure every path of one training stage; returns the JSON-ready results."""

    device = device or bench_device()
    stage = pick_stage(recipe, stage_name)
    spec = stage.train
    notes: list[str] = []

    seq_len = recipe.data.seq_len
    tokens = seq_len * spec.batch_size * spec.grad_accum
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        notes.append(
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes "
            "share this CPU and timings are unreliable (OMP_NUM_THREADS=1 suffers least)"
        )
    matmul_dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    log(f"measuring the {str(matmul_dtype).removeprefix('torch.')} matmul peak on {device}...")
    measured_peak, matmul_n = measure_matmul_peak(device, matmul_dtype)
    spec_peak = spec_peak_flops(device, spec.precision)

    acc = make_accelerator(spec.grad_accum)  # the loop's step runs under an accelerator
    results: dict[str, PathResult] = {}
    path_flops, path_shapes = {}, {}
    measured = _measure_paths(recipe, stage, paths, device, steps, warmup, notes, acc, log)
    for path, (result, shapes) in measured.items():
        results[path], path_shapes[path] = result, shapes
        path_flops[path] = _flops_per_token(shapes, seq_len)
    # the shapes reported: those of the path that runs a teacher, if one does
    shapes = max(path_shapes.values(), key=lambda s: s.teacher is not None)
    for path, result in results.items():
        seconds = result.ms_per_step / 1e3
        path_step_flops = sum(path_flops[path]) * tokens
        result.mfu = path_step_flops / seconds / measured_peak if measured_peak else None
        result.mfu_spec = path_step_flops / seconds / spec_peak if spec_peak else None
    flops_student, flops_teacher = max(path_flops.values(), key=sum)
    step_flops = (flops_student + flops_teacher) * tokens

    out = _results_json(recipe, stage, device, shapes, steps, warmup, results, notes)
    out["flops"] = {
        "student_per_token": flops_student,
        "teacher_per_token": flops_teacher,
        "per_token": flops_student + flops_teacher,
        "per_step": step_flops,
    }
    out["peak_flops"] = {
        "measured": measured_peak,
        "measured_with": f"{matmul_n}x{matmul_n}x{matmul_n} {matmul_dtype} matmul",
        "spec": spec_peak,
    }
    out["floor"] = {
        "ms_per_step": step_flops / measured_peak * 1e3,
        "tokens_per_s": tokens / (step_flops / measured_peak),
    }
    if "chunked" in results and "naive" in results:
        chunked, naive = results["chunked"], results["naive"]
        out["ratios_chunked_to_naive"] = {
            "tokens_per_s": chunked.tokens_per_s / naive.tokens_per_s,
            "peak_memory": chunked.peak_memory_bytes / naive.peak_memory_bytes,
            "loss_peak_memory": chunked.loss_peak_memory_bytes
            / max(naive.loss_peak_memory_bytes, 1),
        }
    out.update(bench_on_policy(recipe, stage, device, steps, warmup, notes, acc, results))
    if "cache" in results:
        cache = results["cache"]
        out["ratios_cache"] = {
            f"to_{other}": cache.tokens_per_s / results[other].tokens_per_s
            for other in ("online", "ce_only")
            if other in results
        }
    return out


def _flops_per_token(shapes: StepShapes, seq_len: int) -> tuple[float, float]:
    """(student, teacher) FLOPs per token: a path without a teacher forward (a cache, CE only)
    does less work."""
    teacher = teacher_flops_per_token(shapes.teacher, seq_len) if shapes.teacher else 0.0
    return student_flops_per_token(shapes.student, seq_len), teacher


def _results_json(recipe, stage, device, shapes, steps, warmup, results, notes) -> dict:
    """What was measured and where, as JSON (the FLOP figures are added by the caller)."""
    import transformers

    spec, seq_len = stage.train, recipe.data.seq_len
    objective = getattr(stage, "objective", None)
    return {
        "recipe": recipe.name,
        "stage": stage.name,
        "stage_kind": stage.kind,
        "device": {"type": device.type, "name": device_name(device)},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "shapes": {
            "batch_size": spec.batch_size,
            "seq_len": seq_len,
            "grad_accum": spec.grad_accum,
            "tokens_per_step": seq_len * spec.batch_size * spec.grad_accum,
            "vocab_size": shapes.vocab_size,
            "precision": spec.precision,
            "chunk_size": objective.chunk_size if objective is not None else None,
            "student": asdict(shapes.student),
            "teacher": asdict(shapes.teacher) if shapes.teacher else None,
        },
        "steps": steps,
        "warmup": warmup,
        "memory_method": (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "live tensor storage bytes tracked per op (TorchDispatchMode) during one step, "
            "plus weights and optimizer state"
        ),
        "paths": {path: asdict(result) for path, result in results.items()},
        "notes": sorted(set(notes)),
    }


# ----------------------------------------------------------------------------------------------
# Output


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def format_table(result: dict) -> str:
    shapes, flops, peaks = result["shapes"], result["flops"], result["peak_flops"]
    lines = [
        f"distill bench: recipe {result['recipe']!r}, stage {result['stage']!r} on "
        f"{result['device']['name']} ({result['device']['type']}), torch {result['torch']}",
        f"shape: {shapes['batch_size']} x {shapes['seq_len']} x {shapes['grad_accum']} = "
        f"{shapes['tokens_per_step']:,} tokens/step, vocab {shapes['vocab_size']:,}, "
        f"{shapes['precision']}, chunk {shapes['chunk_size']}",
        f"FLOPs/token: student {flops['student_per_token'] / 1e9:.3f} G + teacher "
        f"{flops['teacher_per_token'] / 1e9:.3f} G; step {flops['per_step'] / 1e12:.3f} TFLOP",
        f"peak: measured {peaks['measured'] / 1e12:.2f} TFLOP/s ({peaks['measured_with']}), "
        f"spec "
        + (f"{peaks['spec'] / 1e12:.0f} TFLOP/s" if peaks["spec"] else "n/a (unknown card)"),
        f"floor (step FLOPs at the measured peak): {result['floor']['ms_per_step']:.1f} ms/step, "
        f"{result['floor']['tokens_per_s']:,.0f} tokens/s",
        "",
    ]
    header = ("path", "ms/step", "tokens/s", "MFU measured", "MFU spec", "peak mem", "loss peak")
    rows = [header]
    for path, r in result["paths"].items():
        rows.append(
            (
                path,
                f"{r['ms_per_step']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                _pct(r["mfu"]),
                _pct(r["mfu_spec"]),
                _gib(r["peak_memory_bytes"]),
                _gib(r["loss_peak_memory_bytes"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratios = result.get("ratios_chunked_to_naive")
    if ratios:
        lines.append(
            f"\nchunked / naive: tokens/s {ratios['tokens_per_s']:.2f}x, peak memory "
            f"{ratios['peak_memory']:.2f}x, loss peak memory {ratios['loss_peak_memory']:.2f}x"
        )
    cache_ratios = result.get("ratios_cache")
    if cache_ratios:
        lines.append(
            "\ncache tokens/s: " + ", ".join(f"{v:.2f}x {k[3:]}" for k, v in cache_ratios.items())
        )
    if result.get("on_policy"):
        lines += format_on_policy(result["on_policy"])
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def run_bench_command(args) -> int:
    """`distill bench RECIPE [overrides] [--stage] [--steps] [--warmup] [--paths] [--json]`."""
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides)
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if paths == ("auto",):  # a stage reading a teacher cache: the cache against its alternatives
        reads_cache = pick_stage(recipe, args.stage).teacher_cache is not None
        paths = TEACHER_PATHS if reads_cache else LOSS_PATHS
    unknown = [p for p in paths if p not in PATHS]
    if not paths or unknown or len(set(paths)) != len(paths):
        raise RecipeError(
            f"--paths {args.paths!r}: give distinct paths, comma-separated, from "
            f"{', '.join(PATHS)} (or `auto`)"
        )
    if args.steps < 1 or args.warmup < 0:
        raise RecipeError(
            f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}"
        )
    result = run_bench(
        recipe,
        args.stage,
        paths,
        args.steps,
        args.warmup,
        log=lambda msg: print(f"[distill bench] {msg}", file=sys.stderr, flush=True),
    )
    print(format_table(result))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0
