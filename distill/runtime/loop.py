"""The one training loop: train (no teacher), distill, recover and QAT are all this loop.

It runs on accelerate, so the same code serves one CPU process, N processes under DDP, and DeepSpeed
ZeRO. Read `train()` top to bottom: resume, then for each optimizer step gather the micro-batches,
count the tokens of the whole global step, forward/backward each micro-batch, clip, step, run the
hooks, log, evaluate, save.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.config import TrainSpec
from distill.data.order import BatchOrder
from distill.errors import CheckpointError, DiskWriteError, StopRequested, TrainingDiverged
from distill.faults import Faults, from_env
from distill.files import writing
from distill.models import causal_lm_of, is_partitioned
from distill.objective.module import DistillModule, teacher_forward
from distill.objective.on_policy import GeneratedBatch
from distill.runtime import signals as stop_signals
from distill.runtime.checkpoint import (
    SAVE_FIX,
    STATE,
    check_free_space,
    checkpoint_name,
    clean_stale_tmp,
    commit,
    dir_bytes,
    estimate_checkpoint_bytes,
    find_latest_valid,
    list_checkpoints,
    read_state,
    tmp_dir_for,
    verify,
)
from distill.runtime.distributed import register_head
from distill.runtime.evaluate import heldout_metrics
from distill.runtime.on_policy import OnPolicy
from distill.safe_load import load_tensors, weights_only
from distill.teacher_cache.store import CachedTeacher
from distill.tracking import Tracker

# ----------------------------------------------------------------------------------------------
# Learning rate


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up, then cosine or linear decay to `min_lr_ratio * lr` (a pure function of
    the step, so resume needs no scheduler state and every world size agrees)."""
    warmup = int(spec.warmup_ratio * spec.max_steps)
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    if spec.schedule == "constant":
        return spec.lr
    progress = (step - warmup) / max(1, spec.max_steps - warmup)
    floor = spec.min_lr_ratio
    if spec.schedule == "cosine":
        scale = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:
        scale = 1 - (1 - floor) * min(progress, 1.0)
    return spec.lr * scale


# ----------------------------------------------------------------------------------------------
# Model pieces


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms and biases are left alone."""
    decay, no_decay, seen = [], [], set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partition is flat; its shape is here
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------------------------
# Signals


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainHooks:
    """The two places other features plug in without the loop knowing about them."""

    before_step: Callable[[int, nn.Module], None] | None = None  # e.g. start fake quantization
    after_optimizer_step: Callable[[nn.Module], None] | None = None  # e.g. re-apply masks


@dataclass
class TrainJob:
    accelerator: object
    module: DistillModule
    teacher: nn.Module | CachedTeacher | None
    """A frozen teacher run online, or an offline teacher cache read by block index."""
    train_blocks: torch.Tensor
    eval_blocks: torch.Tensor
    spec: TrainSpec
    seed: int
    stage_dir: Path
    tracker: Tracker
    fingerprint: str
    hooks: TrainHooks = field(default_factory=TrainHooks)
    eval_batch_size: int = 16
    log: Callable[[str], None] = print
    force_resume: bool = False
    on_policy: OnPolicy | None = None
    """The stage's on-policy steps (objective.on_policy), or None."""


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    eval: dict
    tokens_per_s: float
    skipped_steps: int = 0
    on_policy: dict | None = None
    """On-policy stages: steps, generated tokens, generation vs training time (OnPolicy.summary)."""


def autocast_for(spec: TrainSpec, device: torch.device):
    if spec.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train(job: TrainJob) -> TrainResult:
    """Resume, then for each optimizer step: `train_step`, hooks, log, evaluate, save."""
    acc, spec = job.accelerator, job.spec
    online = isinstance(job.teacher, nn.Module)
    if online and not is_partitioned(job.teacher):  # ZeRO-3: placed by DS
        job.teacher.to(acc.device)
    optimizer = torch.optim.AdamW(
        param_groups(job.module, spec.weight_decay), lr=spec.lr, betas=tuple(spec.betas)
    )
    register_head(acc, job.module, causal_lm_of(job.module.student).get_output_embeddings().weight)
    module, optimizer = acc.prepare(job.module, optimizer)
    order = BatchOrder(
        len(job.train_blocks), spec.batch_size, spec.grad_accum, acc.num_processes, job.seed
    )
    ckpt_root = job.stage_dir / "checkpoints"
    state = {"step": 0, "tokens": 0, "bad_steps": 0, "skipped_steps": 0}
    saved = _resume(job, acc, state, ckpt_root)  # the checkpoint of state["step"], if any
    _restore_on_policy(job, state, saved)
    _check_space(job, acc, ckpt_root, first_only=True)  # a first save must fit: known up front
    faults = from_env()
    autocast = autocast_for(spec, acc.device)
    t0, tokens_at_t0 = time.perf_counter(), state["tokens"]
    window = (t0, state["tokens"])
    eval_metrics: dict = {}
    progress = _progress(acc, spec.max_steps, state["step"])

    with stop_signals.watch() as signals:
        stop_signals.enter_phase(stop_signals.TRAINING, job.stage_dir.name)
        while state["step"] < spec.max_steps:
            step = state["step"]
            if job.hooks.before_step:
                job.hooks.before_step(step, acc.unwrap_model(module))
            lr = lr_at(step, spec)
            blocks, batches, on_policy = _step_batches(job, acc, order, step, autocast)
            out = train_step(
                acc,
                module,
                optimizer,
                job.teacher,
                batches,
                spec,
                lr,
                autocast,
                faults,
                step,
                blocks,
            )
            _count_on_policy(job, on_policy)
            _after_step(job, acc, module, state, out, step, ckpt_root)
            if faults:
                faults.after_step()
            if state["step"] % spec.log_every == 0 or state["step"] == spec.max_steps:
                window = _log_step(job, acc, progress, order, state, out, lr, window)
            eval_metrics = _periodic_eval(job, module, autocast, state["step"]) or eval_metrics
            stop = _any(acc, signals.requested, acc.device)
            saved = None  # a checkpoint of an earlier step
            if (spec.save_every and state["step"] % spec.save_every == 0) or stop:
                saved = save_checkpoint(job, acc, state, ckpt_root, faults)
                if stop:
                    _close_progress(progress)
                    raise StopRequested(saved, signals.where())
        _close_progress(progress)
        wall = time.perf_counter() - t0
        eval_metrics = _final_eval(job, acc, module, autocast, state, saved, faults)
    tokens_run = state["tokens"] - tokens_at_t0
    return TrainResult(
        steps=state["step"],
        tokens=state["tokens"],
        wall_s=wall,
        eval=eval_metrics,
        tokens_per_s=tokens_run / max(wall, 1e-9),
        skipped_steps=state["skipped_steps"],
        on_policy=job.on_policy.summary(state["step"]) if job.on_policy else None,
    )


def _periodic_eval(job: TrainJob, module, autocast, step: int) -> dict | None:
    """The held-out metrics every `eval_every` steps (the last step has its own, full eval)."""
    spec = job.spec
    if not spec.eval_every or step % spec.eval_every or step >= spec.max_steps:
        return None
    metrics = evaluate_heldout(job, module, autocast, spec.eval_batches)
    job.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
    return metrics


def _step_batches(job: TrainJob, acc, order: BatchOrder, step: int, autocast):
    """(block indices, micro-batches, on-policy?): the step's blocks, or on an on-policy step the
    student's own completions of the step's prompts, scored by the teacher."""
    blocks = [order.indices(step, a, acc.process_index) for a in range(job.spec.grad_accum)]
    if job.on_policy is not None:
        job.on_policy.step_started()
    if job.on_policy is not None and job.on_policy.wants(step):
        gen = job.on_policy.batches(acc, job.teacher, step, job.spec, job.seed, autocast)
        return blocks, gen, True
    return blocks, [job.train_blocks[b].to(acc.device) for b in blocks], False


def _count_on_policy(job: TrainJob, on_policy: bool) -> None:
    """The step in the on-policy sums (its wall time: the generation vs training split)."""
    if job.on_policy is not None:
        job.on_policy.step_done(on_policy)


def _restore_on_policy(job: TrainJob, state: dict, resumed: Path | None) -> None:
    """The on-policy sums travel in the checkpoint's state (saved with `state`)."""
    if job.on_policy is not None:
        job.on_policy.restore(read_state(resumed) if resumed else {})
        state["on_policy"] = job.on_policy.state()


def _final_eval(job: TrainJob, acc, module, autocast, state: dict, saved, faults) -> dict:
    """The held-out metrics of the trained student, after its weights are saved: a stop during
    the eval (or the export after it) costs the rerun the eval and the export, not the training."""
    if saved is None:
        saved = save_checkpoint(job, acc, state, job.stage_dir / "checkpoints", faults)
    stop_signals.enter_phase("final-eval", job.stage_dir.name)
    metrics = evaluate_heldout(job, module, autocast, None)
    job.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, state["step"])
    stop_signals.stop_point(acc, checkpoint=saved)
    return metrics


@dataclass
class StepOutput:
    """One optimizer step's numbers. Tensors stay on the device until a log step reads them."""

    loss: torch.Tensor
    """Mean loss per token over the global step (reduced over ranks)."""
    term_sums: dict[str, torch.Tensor]
    """This rank's unweighted sums of each loss term (reduced when logged)."""
    grad_norm: torch.Tensor | None
    tokens: int
    """Valid tokens of the global step."""
    finite: bool
    """Loss and gradient norm were finite on every rank (else the optimizer step was skipped)."""


def train_step(
    acc,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher: nn.Module | None,
    batches: list[torch.Tensor | GeneratedBatch],
    spec: TrainSpec,
    lr: float,
    autocast,
    faults: Faults | None = None,
    step: int = 0,
    blocks: list[torch.Tensor] | None = None,
) -> StepOutput:
    """Forward and backward every micro-batch of one optimizer step, clip, step (unless a loss or
    gradient is not finite on some rank), zero the gradients.

    `blocks` are the micro-batches' training-block indices, which address a teacher cache.
    Two host reads per step, both needed to decide something: the step's global token count
    (every backward is scaled by it) and whether every rank's loss and gradient norm are finite.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    inner = acc.unwrap_model(module)
    want_states = bool(inner.objective and inner.objective.hidden)
    # Every token of the global step weighs the same, whatever the micro-batch or rank: each
    # backward gets sum/global_count, scaled back up for DDP's mean over ranks and accelerate's
    # division by grad_accum.
    local_count = sum(_label_count(mb) for mb in batches)
    global_count = int(acc.reduce(local_count, "sum"))
    scale = acc.num_processes * spec.grad_accum / max(global_count, 1)
    term_sums: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), device=acc.device)
    for micro, mb in enumerate(batches):
        if faults:
            faults.before_micro(step, micro)
        teacher_out = None
        if isinstance(mb, GeneratedBatch):  # scored by the teacher when it was generated
            teacher_out = mb.teacher
        elif isinstance(teacher, CachedTeacher):
            teacher_out = teacher.read(blocks[micro], mb.device, want_states)
        elif teacher is not None:
            teacher_out = teacher_forward(teacher, mb, want_states, autocast)
        with acc.accumulate(module):
            with autocast:
                total, parts, _ = module(*_inputs(mb, teacher_out))
            if faults:
                total = faults.poison(step, total)
            acc.backward(total * scale)
        loss_sum += total.detach().float()
        for k, v in parts.items():
            term_sums[k] = term_sums.get(k, 0) + v.detach().float()
    grad_norm = _clip(acc, module, spec.max_grad_norm)
    loss = acc.reduce(loss_sum, "sum") / max(global_count, 1)
    finite = _all_finite(acc, loss, grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss, term_sums, grad_norm, global_count, finite)


def _label_count(mb: torch.Tensor | GeneratedBatch) -> torch.Tensor:
    return mb.label_count() if isinstance(mb, GeneratedBatch) else (mb[:, 1:] != -100).sum()


def _inputs(mb: torch.Tensor | GeneratedBatch, teacher_out) -> tuple:
    """DistillModule's arguments: a block batch, or a generated one with labels and mask."""
    if isinstance(mb, GeneratedBatch):
        return mb.input_ids, teacher_out, mb.labels, mb.attention_mask, mb.position_ids
    return mb, teacher_out


def _after_step(job: TrainJob, acc, module, state: dict, out: StepOutput, step: int, root) -> None:
    """Hooks, counters, and the stop after too many non-finite steps in a row."""
    if out.finite:
        state["bad_steps"] = 0
    else:
        state["bad_steps"] += 1
        state["skipped_steps"] += 1
        job.log(
            f"step {step}: non-finite loss ({float(out.loss):.4g}) or grad norm "
            f"({_f(out.grad_norm)}); skipping this optimizer step on every rank"
        )
    if job.hooks.after_optimizer_step:
        job.hooks.after_optimizer_step(acc.unwrap_model(module))
    state["step"] = step + 1
    state["tokens"] += out.tokens
    if state["bad_steps"] >= job.spec.max_bad_steps:
        last = find_latest_valid(root)
        raise TrainingDiverged(
            f"{state['bad_steps']} consecutive steps with a non-finite loss or gradient "
            f"norm (last at step {step}); the last good checkpoint is {last or 'none'}. "
            "Lower `train.lr`, check the data, or use `train.precision: fp32`."
        )


def _log_step(job: TrainJob, acc, progress, order, state: dict, out: StepOutput, lr, window):
    """Read the step's numbers back (reduced over ranks) and log them; returns the new window."""
    now = time.perf_counter()
    window_t, window_tokens = window
    row = {"loss": float(out.loss), "lr": lr, "grad_norm": _f(out.grad_norm)}
    for k, v in out.term_sums.items():
        row[f"loss_{k}"] = float(acc.reduce(v, "sum")) / max(out.tokens, 1)
    row["tokens"] = state["tokens"]
    row["tokens_per_s"] = (state["tokens"] - window_tokens) / max(now - window_t, 1e-9)
    row["epoch"] = order.epoch_of(state["step"])
    if not out.finite:
        row["skipped"] = 1
    if job.on_policy is not None:
        row.update(job.on_policy.log_row(acc, state["step"]))
    job.tracker.log(row, step=state["step"])
    _report(acc, progress, row, state["step"], job.spec.max_steps, job.log)
    return now, state["tokens"]


def _f(x) -> float:
    return float(x) if x is not None else float("nan")


def _clip(acc, module, max_norm: float):
    norm = acc.clip_grad_norm_(module.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm if norm is None else torch.as_tensor(norm, dtype=torch.float32)


def _all_finite(acc, loss, grad_norm) -> bool:
    """One host read: are the loss and gradient norm finite on every rank."""
    bad = ~torch.isfinite(loss).all()
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm).all()
    if acc.num_processes > 1:
        bad = acc.reduce(bad.float(), "sum") > 0
    return not bool(bad)


def _any(acc, flag: bool, device) -> bool:
    """True on every rank when any rank says True (so all ranks take the same branch)."""
    if acc.num_processes == 1:
        return bool(flag)
    return bool(acc.reduce(torch.tensor(float(flag), device=device), "sum") > 0)


def evaluate_heldout(job: TrainJob, module, autocast, max_batches: int | None) -> dict:

    inner = job.accelerator.unwrap_model(module)
    return heldout_metrics(
        inner.student,
        job.eval_blocks,
        job.eval_batch_size,
        inner.vocab_size,
        autocast,
        accelerator=job.accelerator,
        max_batches=max_batches,
    )


# ----------------------------------------------------------------------------------------------
# Checkpoints


# ----------------------------------------------------------------------------------------------
# Progress


def _progress(acc, total: int, start: int):
    if not acc.is_main_process or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


def _report(acc, progress, row: dict, step: int, total: int, log) -> None:
    if not acc.is_main_process:
        return
    if progress is not None:
        progress.n = step
        progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=True)
        return
    terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in row.items() if k.startswith("loss_"))
    log(
        f"step {step}/{total} loss={row['loss']:.4f} {terms} lr={row['lr']:.2e} "
        f"grad_norm={row['grad_norm']:.3f} tok/s={row['tokens_per_s']:.0f}"
    )


def _close_progress(progress) -> None:
    if progress is not None:
        progress.close()


def _check_space(job: TrainJob, acc, root: Path, first_only: bool = False) -> None:
    """The main process checks that the next checkpoint fits (the last one's real size, or before
    the first one, also the only save of a `save_every: 0` stage, what the model and its optimizer
    state will take); every rank stops if not, so none is left waiting for it."""
    problem = None
    kept = list_checkpoints(root) if acc.is_main_process else []
    if acc.is_main_process and not (first_only and kept):
        needed = dir_bytes(kept[-1]) if kept else estimate_checkpoint_bytes(job.module)
        try:
            check_free_space(root, needed, kept[-1] if kept else None)
        except DiskWriteError as err:
            problem = err
    if _any(acc, problem is not None, acc.device):
        raise problem or DiskWriteError(f"no room for a checkpoint in {root}: see the main process")


def save_checkpoint(job: TrainJob, acc, state: dict, root: Path, faults: Faults | None) -> Path:
    """Write the step's checkpoint under a temporary name and commit it. A failed write (a full
    disk, whatever torch, safetensors or DeepSpeed raise for it) removes the partial checkpoint
    and ends as a DiskWriteError naming the free space and the checkpoint that is intact."""
    step = state["step"]
    tmp = tmp_dir_for(root, step)
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    _check_space(job, acc, root)
    if acc.is_main_process:
        clean_stale_tmp(root)
    acc.wait_for_everyone()
    kept = list_checkpoints(root)
    previous = f"The previous checkpoint ({kept[-1]}) is intact" if kept else None
    path = root / checkpoint_name(step)
    with writing(
        root,
        f"saving the checkpoint of step {step} in {root}",
        previous or "No checkpoint of this stage was written before",
        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True),
        fix=SAVE_FIX + (" to resume from it." if kept else "."),
    ):
        if faults and acc.is_main_process:
            faults.before_save(step, tmp)
        acc.save_state(str(tmp), safe_serialization=False)
        if faults:
            faults.during_save(step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {
                **state,
                "world_size": acc.num_processes,
                "fingerprint": job.fingerprint,
                "tracker_run_id": job.tracker.run_id,
            }
            (tmp / STATE).write_text(json.dumps(meta, indent=1))
            path = commit(root, step, job.spec.keep_last)
            job.log(f"saved checkpoint {path}")
    acc.wait_for_everyone()
    return path


def _resume(job: TrainJob, acc, state: dict, root: Path) -> Path | None:
    spec = job.spec
    if spec.resume == "never":
        return None
    if acc.is_main_process:
        clean_stale_tmp(root)
    acc.wait_for_everyone()
    if spec.resume == "auto":
        path = find_latest_valid(root, log=job.log)
        if path is None:
            return None
    else:
        path = Path(spec.resume)
        problem = verify(path) if path.is_dir() else "no such directory"
        if problem:
            raise CheckpointError(f"train.resume: cannot use {path}: {problem}")
    meta = read_state(path)
    if meta.get("fingerprint") != job.fingerprint and not job.force_resume:
        raise CheckpointError(
            f"checkpoint {path} was written by a different recipe or stage settings; refusing to "
            "resume from it. Use a new output directory, delete the checkpoint, or pass "
            "--force-resume to continue anyway."
        )
    if meta.get("world_size") != acc.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {meta.get('world_size')} processes, this run has "
            f"{acc.num_processes}. Relaunch with {meta.get('world_size')} processes to continue "
            "exactly, or start the stage anew with `train.resume=never` (optionally initialising "
            "from its exported model)."
        )
    fix = (
        "distill's checkpoints hold only tensors and numbers, so this one was altered or written "
        "by something else: delete it (distill then resumes from the one before, if any) or start "
        "the stage anew with `train.resume=never`. If you trust the file, convert it yourself "
        "(load it with torch.load(..., weights_only=False), save only its tensors)."
    )
    with weights_only(path, fix):
        rng = path / f"random_states_{acc.process_index}.pkl"
        if rng.is_file():  # accelerate skips an RNG state it cannot read and resumes inexactly
            load_tensors(rng, fix)
        acc.load_state(str(path))
    for key in ("step", "tokens", "bad_steps", "skipped_steps"):
        state[key] = meta.get(key, 0)
    job.log(f"resumed from {path} at step {state['step']}")
    return path
