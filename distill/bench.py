"""`distill bench`: throughput, MFU and peak memory of a recipe's training step on this hardware.

The step measured is the trainer's: `teacher_forward`, then `DistillModule` (student forward and the
objective), backward, gradient clipping, AdamW, with the models, batch shape, precision and objective
of one training stage. Models come from the recipe's specs (a config: random init, seeded; a path:
loaded); batches are random token ids, so no data or tokenizer is needed. Each loss path (chunked,
naive) runs in isolation: fresh models from the same seed, warm-up steps, then the median of the
measured steps.

FLOPs follow shared/PERF.md: N = weights of every matmul (the lm_head counted even when tied, the
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
import math
import os
import platform
import statistics
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distill.config import ObjectiveSpec, Recipe, RecipeError, load_recipe

PATHS = ("chunked", "naive")
TRAINING_KINDS = ("train", "distill", "qat")

# Dense bf16 tensor-core peaks from the vendors' spec sheets, matched in this order against
# torch.cuda.get_device_name() (H100 PCIe before the SXM default).
SPEC_BF16_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


# ----------------------------------------------------------------------------------------------
# The FLOP model (shared/PERF.md)


def matmul_params(model: nn.Module) -> int:
    """Weights of every nn.Linear, the lm_head counted even when tied; embedding lookups are not."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@dataclass
class ModelShape:
    """What the FLOP model needs to know about one model."""

    matmul_params: int
    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab_rows: int

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


def model_shape(model: nn.Module, extra_matmul_params: int = 0) -> ModelShape:
    from distill.trainer import causal_lm_of

    config = causal_lm_of(model).config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        matmul_params=matmul_params(model) + extra_matmul_params,
        layers=config.num_hidden_layers,
        heads=heads,
        head_dim=head_dim,
        hidden=config.hidden_size,
        vocab_rows=causal_lm_of(model).get_output_embeddings().weight.shape[0],
    )


def student_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward + backward of the trained model: 6 N + 12 L A S."""
    return 6 * shape.matmul_params + 12 * shape.layers * shape.attention_width * seq_len


def teacher_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Forward only: 2 N + 4 L A S."""
    return 2 * shape.matmul_params + 4 * shape.layers * shape.attention_width * seq_len


def spec_peak_flops(device: torch.device, precision: str) -> float | None:
    """The spec sheet's dense bf16 peak for a known CUDA card, else None (CPU, fp32, unknown)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in SPEC_BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """(FLOP/s, n): the best of a few timed rounds of an n x n x n matmul in `dtype`."""
    n, calls = (8192, 20) if device.type == "cuda" else (1024, 4)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for round_index in range(6):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        _sync(device)
        if round_index > 0:  # the first round warms up kernels and clocks
            best = max(best, 2 * n**3 * calls / (time.perf_counter() - t0))
    return best, n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Memory on CPU: live tensor storage bytes, tracked op by op


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the `with` block and alive at the same time.

    Every op's fresh outputs are counted when made and released when their storage is freed (a
    weak reference on the storage). Views, in-place and out= ops (outputs that alias inputs) add
    nothing, so tensors that existed before the block are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage(), inputs)
        return out

    def _add(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._refs or size == 0 or storage.data_ptr() in inputs:
            return
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))

    def _free(self, key: int, size: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live_bytes -= size


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in modules, optimizers and tensor lists."""
    seen: dict[int, int] = {}

    def add(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                add(tensor)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        add(value)
        elif isinstance(obj, torch.Tensor):
            add(obj)
    return sum(seen.values())


class PeakMemory:
    """Peak allocated bytes during a `with` block (`peak_bytes`), and above its start (`added_bytes`).

    CUDA: the allocator's own counters (peak reset on entry). CPU: the tracked live storages plus
    `base_bytes`, what the caller says was held before the block (weights, optimizer state).
    """

    def __init__(self, device: torch.device, base_bytes: int = 0) -> None:
        self.device = device
        self.base_bytes = base_bytes
        self.peak_bytes = 0
        self.start_bytes = 0
        self._tracker: TensorMemoryTracker | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.base_bytes
            self._tracker = TensorMemoryTracker().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._tracker.__exit__(*exc)
            self.peak_bytes = self.base_bytes + self._tracker.peak_bytes

    @property
    def added_bytes(self) -> int:
        """Peak above the level at entry."""
        return self.peak_bytes - self.start_bytes


# ----------------------------------------------------------------------------------------------
# Building one stage's training step from a recipe


class _VocabOnly:
    """Stands in for the tokenizer where models are built: only its length is read."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __len__(self) -> int:
        if self.size is None:
            raise RecipeError(
                "distill bench builds models without a tokenizer: give `vocab_size` in each "
                "model's `config`, or use `tokenizer.source: train` with `tokenizer.train.vocab_size`"
            )
        return self.size


def pick_stage(recipe: Recipe, name: str | None):
    """The named training stage, or the first distill stage, or the first training stage."""
    trainable = [s for s in recipe.stages if s.kind in TRAINING_KINDS]
    if name is not None:
        for stage in recipe.stages:
            if stage.name == name:
                if stage.kind not in TRAINING_KINDS:
                    raise RecipeError(
                        f"--stage {name!r} is a {stage.kind} stage; distill bench measures a "
                        f"training step: use one of {', '.join(s.name for s in trainable)}"
                    )
                return stage
        raise RecipeError(
            f"--stage {name!r} is not a stage of the recipe; training stages: "
            f"{', '.join(s.name for s in trainable) or 'none'}"
        )
    for stage in trainable:
        if stage.kind == "distill":
            return stage
    if not trainable:
        raise RecipeError("the recipe has no training stage (train, distill or qat) to measure")
    return trainable[0]


def model_key(recipe: Recipe, stage, ref: str, notes: list[str]) -> str:
    """The `models` key a stage's reference leads to, following earlier stages' `model`.

    The bench builds that model fresh: an earlier training stage keeps the architecture, a width or
    depth prune stage does not (noted).
    """
    index = recipe.stages.index(stage)
    while True:
        earlier = [s for s in recipe.stages[:index] if s.name == ref]
        if not earlier:
            return ref
        upstream = earlier[-1]
        if upstream.kind == "prune" and upstream.prune.method in ("width", "depth"):
            notes.append(
                f"stage {upstream.name!r} prunes {upstream.prune.method}: the bench measures the "
                "unpruned architecture"
            )
        index = recipe.stages.index(upstream)
        ref = upstream.model


@dataclass
class TrainStep:
    """Everything one training step of a stage touches."""

    module: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    batches: list[torch.Tensor]
    spec: object
    autocast: object
    want_states: bool
    vocab_size: int


def build_train_step(
    recipe: Recipe, stage, path: str, device: torch.device, notes: list[str]
) -> TrainStep:
    """The stage's models, DistillModule and AdamW, built as `distill run` builds them."""
    from distill import losses
    from distill.models import (
        add_lora,
        check_head_covers_tokenizer,
        freeze,
        hidden_width,
        num_layers,
    )
    from distill.pipeline import RunContext, load_ref
    from distill.stages import _scheme, _teacher_dtype
    from distill.trainer import DistillModule, autocast_for, param_groups

    spec = stage.train
    vocab = _VocabOnly(
        recipe.tokenizer.train.vocab_size if recipe.tokenizer.source == "train" else None
    )
    ctx = RunContext(recipe, recipe.resolved_output_dir, tokenizer=vocab)
    student_key = model_key(recipe, stage, stage.model, notes)
    # Built on the device itself: random init of a large model is fast there, and on "meta" it
    # costs nothing (the FLOP model only needs the shapes).
    with torch.device(device):
        student = load_ref(ctx, student_key, "student")
    teacher_ref = getattr(stage, "teacher", None)
    teacher_name = teacher_ref.model if teacher_ref is not None else None
    if stage.kind == "qat" and teacher_name is None:
        teacher_name = stage.model
    teacher = None
    if teacher_name is not None:
        teacher_key = model_key(recipe, stage, teacher_name, notes)
        with torch.device(device):
            teacher = load_ref(ctx, teacher_key, "teacher", dtype=_teacher_dtype(spec))
        freeze(teacher)
    rows = [m.get_output_embeddings().weight.shape[0] for m in (student, teacher) if m is not None]
    if vocab.size is None:
        vocab.size = min(rows)
    for model, what in ((student, "student"), (teacher, "teacher")):
        if model is not None:
            check_head_covers_tokenizer(model, vocab, what)

    # As stages.run_training_stage: fake quantization, gradient checkpointing, LoRA, projections.
    if stage.kind == "qat":
        from distill import quantize

        quantize.prepare_qat(student, _scheme(stage.quant))
        quantize.set_fake_quant_enabled(student, True)
    model_spec = recipe.models[student_key]
    if model_spec.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if model_spec.lora is not None:
        student = add_lora(student, model_spec.lora)
    objective = getattr(stage, "objective", None) if teacher is not None else None
    if objective is not None:
        objective = objective.model_copy(update={"path": path})
    elif path == "naive":  # CE only: the same module, with its naive loss path
        objective = ObjectiveSpec(ce_weight=1.0, terms=[], path="naive")
    layer_map, projections = None, None
    if objective is not None and teacher is not None and objective.hidden is not None:
        layer_map = losses.resolve_layer_map(
            objective.hidden.layer_map, num_layers(student), num_layers(teacher)
        )
        projections = losses.HiddenProjections(
            layer_map, hidden_width(student), hidden_width(teacher), objective.hidden.projection
        )
    module = DistillModule(student, objective, len(vocab), layer_map, projections).to(device)
    module.train()
    if teacher is not None:
        teacher.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(module, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas)
    )
    gen = torch.Generator(device="cpu").manual_seed(recipe.seed)
    seq_len = recipe.data.seq_len
    batches = [
        torch.randint(0, len(vocab), (spec.batch_size, seq_len), generator=gen, device="cpu").to(
            device
        )
        for _ in range(spec.grad_accum)
    ]
    want_states = bool(teacher is not None and objective is not None and objective.hidden)
    return TrainStep(
        module=module,
        teacher=teacher,
        optimizer=optimizer,
        batches=batches,
        spec=spec,
        autocast=autocast_for(spec, device) if device.type != "meta" else nullcontext(),
        want_states=want_states,
        vocab_size=len(vocab),
    )


@dataclass
class StepShapes:
    student: ModelShape
    """Its matmul parameters include the hidden-loss projections, trained with it."""
    teacher: ModelShape | None
    vocab_size: int
    """Vocabulary the loss runs over (head rows past it are padding)."""


def step_shapes(step: TrainStep) -> StepShapes:
    projections = step.module.projections
    extra = matmul_params(projections) if projections is not None else 0
    return StepShapes(
        student=model_shape(step.module.student, extra),
        teacher=model_shape(step.teacher) if step.teacher is not None else None,
        vocab_size=step.vocab_size,
    )


def run_train_step(step: TrainStep) -> torch.Tensor:
    """One optimizer step, as trainer.train does it on one process; returns the mean loss."""
    from distill.trainer import teacher_forward

    # Every token of the step weighs the same (the trainer's global token count, one process).
    count = sum(int((mb[:, 1:] != -100).sum()) for mb in step.batches)
    loss_sum = torch.zeros((), device=step.batches[0].device)
    for mb in step.batches:
        teacher_out = None
        if step.teacher is not None:
            teacher_out = teacher_forward(step.teacher, mb, step.want_states, step.autocast)
        with step.autocast:
            total, _, _ = step.module(mb, teacher_out)
        (total / max(count, 1)).backward()
        loss_sum += total.detach().float()
    max_norm = step.spec.max_grad_norm
    torch.nn.utils.clip_grad_norm_(step.module.parameters(), max_norm if max_norm > 0 else math.inf)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return loss_sum / max(count, 1)


def loss_only_peak_bytes(step: TrainStep, device: torch.device) -> int:
    """Peak bytes the objective adds, forward and backward, given fixed final hidden states.

    The hidden states are the models' own (one no-grad forward of each), so dtypes and values are
    those of the real step; gradients flow to the hidden states and the student's head.
    """
    from distill.trainer import backbone_of, causal_lm_of, teacher_forward

    module, ids = step.module, step.batches[0]
    with torch.no_grad(), step.autocast:
        last = backbone_of(module.student)(input_ids=ids).last_hidden_state
    hidden = last[:, :-1].reshape(-1, last.shape[-1]).detach().requires_grad_(True)
    labels = ids[:, 1:].reshape(-1)
    head = causal_lm_of(module.student).get_output_embeddings().weight
    teacher_hidden = teacher_head = None
    if step.teacher is not None:
        out = teacher_forward(step.teacher, ids, False, step.autocast)
        teacher_hidden = out.hidden[:, :-1].reshape(-1, out.hidden.shape[-1])
        teacher_head = out.head_weight
    del last
    module.zero_grad(set_to_none=True)
    with PeakMemory(device) as peak:
        with step.autocast:
            result = module.logit_objective(hidden, head, labels, teacher_hidden, teacher_head)
        result.total.backward()
        del result
    module.zero_grad(set_to_none=True)
    return peak.added_bytes


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
) -> tuple[PathResult, StepShapes]:
    """Build fresh models (same seed), warm up, time `steps` steps, then measure memory.

    Returns the result (MFU left to the caller, who knows the FLOPs) and the step's shapes.
    """
    _free_memory(device)
    step = build_train_step(recipe, stage, path, device, notes)
    shapes = step_shapes(step)
    _free_memory(device)  # building in float32 then casting leaves garbage that is not the step's
    # CUDA: the allocator's peak over the steps, from the weights up. CPU: see below.
    with PeakMemory(device) if device.type == "cuda" else nullcontext() as cuda_peak:
        times, step_losses = [], []
        for index in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            step_losses.append(run_train_step(step))
            _sync(device)
            if index >= warmup:
                times.append(time.perf_counter() - t0)
    if cuda_peak is not None:
        peak_bytes = cuda_peak.peak_bytes
    else:  # one more step with its tensors tracked, on top of weights and optimizer state
        held = tensor_bytes(step.module, step.teacher, step.optimizer, *step.batches)
        with PeakMemory(device, base_bytes=held) as cpu_peak:
            run_train_step(step)
        peak_bytes = cpu_peak.peak_bytes
    loss_peak = loss_only_peak_bytes(step, device)
    del step
    _free_memory(device)

    seconds = statistics.median(times)
    tokens = recipe.data.seq_len * stage.train.batch_size * stage.train.grad_accum
    result = PathResult(
        ms_per_step=seconds * 1e3,
        tokens_per_s=tokens / seconds,
        mfu=None,
        mfu_spec=None,
        peak_memory_bytes=int(peak_bytes),
        loss_peak_memory_bytes=int(loss_peak),
        loss_first_step=float(step_losses[0]),
        ms_per_step_all=[t * 1e3 for t in times],
    )
    return result, shapes


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
    paths: tuple[str, ...] = PATHS,
    steps: int = 5,
    warmup: int = 2,
    device: torch.device | None = None,
    log=print,
) -> dict:
    """Measure every path of one training stage; returns the JSON-ready results."""
    import transformers

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

    results: dict[str, PathResult] = {}
    for path in paths:
        log(f"path {path}: {warmup} warm-up + {steps} measured steps of {tokens:,} tokens...")
        results[path], shapes = bench_path(recipe, stage, path, device, steps, warmup, notes)
    student_shape, teacher_shape = shapes.student, shapes.teacher

    # The FLOP model (the same models for every path).
    flops_student = student_flops_per_token(student_shape, seq_len)
    flops_teacher = teacher_flops_per_token(teacher_shape, seq_len) if teacher_shape else 0.0
    step_flops = (flops_student + flops_teacher) * tokens
    for result in results.values():
        seconds = result.ms_per_step / 1e3
        result.mfu = step_flops / seconds / measured_peak if measured_peak else None
        result.mfu_spec = step_flops / seconds / spec_peak if spec_peak else None

    objective = getattr(stage, "objective", None)
    out = {
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
            "tokens_per_step": tokens,
            "vocab_size": shapes.vocab_size,
            "precision": spec.precision,
            "chunk_size": objective.chunk_size if objective is not None else None,
            "student": asdict(student_shape),
            "teacher": asdict(teacher_shape) if teacher_shape else None,
        },
        "flops": {
            "student_per_token": flops_student,
            "teacher_per_token": flops_teacher,
            "per_token": flops_student + flops_teacher,
            "per_step": step_flops,
        },
        "peak_flops": {
            "measured": measured_peak,
            "measured_with": f"{matmul_n}x{matmul_n}x{matmul_n} {matmul_dtype} matmul",
            "spec": spec_peak,
        },
        "floor": {
            "ms_per_step": step_flops / measured_peak * 1e3,
            "tokens_per_s": tokens / (step_flops / measured_peak),
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
    if "chunked" in results and "naive" in results:
        chunked, naive = results["chunked"], results["naive"]
        out["ratios_chunked_to_naive"] = {
            "tokens_per_s": chunked.tokens_per_s / naive.tokens_per_s,
            "peak_memory": chunked.peak_memory_bytes / naive.peak_memory_bytes,
            "loss_peak_memory": chunked.loss_peak_memory_bytes
            / max(naive.loss_peak_memory_bytes, 1),
        }
    return out


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
    unknown = [p for p in paths if p not in PATHS]
    if not paths or unknown or len(set(paths)) != len(paths):
        raise RecipeError(
            f"--paths {args.paths!r}: give distinct loss paths, comma-separated, from "
            f"{', '.join(PATHS)}"
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
