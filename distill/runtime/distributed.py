"""Many processes: the process group, the DeepSpeed config filled from the recipe, where the frozen
teacher lives, and the checks that every process runs the same thing.

The loop in trainer.py is the same for 1 and N processes; this module holds what only matters when
there are several (or when DeepSpeed is on):

- `make_accelerator`: gloo on machines without CUDA, a join timeout with a message naming the
  rendezvous address, and a check that the launch config does not override the recipe;
- `check_same_recipe`, `check_launch`: before anything is built, every process holds the same
  recipe, and the launch can run every training stage of it;
- `configure_deepspeed`: the accelerate/DeepSpeed config file is the *layout* (ZeRO stage, offload,
  buckets); batch sizes, accumulation, clipping and precision come from the recipe. Values the file
  sets explicitly must agree with the recipe (checked up front by `check_launch`);
- the teacher: `replicate` (a frozen copy per device) or `zero3` (an inference-only ZeRO-3 engine:
  no optimizer, no optimizer state, whatever ZeRO stage the student uses);
- ZeRO-3 helpers: the student's head weight is read inside `DistillModule.forward` (not through the
  lm_head module), so it is registered as an external parameter of the module DeepSpeed wraps; at
  the end of a stage the partitioned student is gathered into a plain model for export.

deepspeed is imported only inside the functions that need it.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from distill.config import TRAINING_KINDS
from distill.errors import LaunchError
from distill.models import causal_lm_of
from distill.objective.module import TeacherTrunk

INIT_TIMEOUT_ENV = "DISTILL_INIT_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------
# Process group


def init_timeout_s() -> float:
    """How long a process waits for the others to join (DISTILL_INIT_TIMEOUT_S, default 600 s)."""
    return float(os.environ.get(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S))


def make_accelerator(grad_accum: int):
    """An Accelerator for one stage; fails clearly when a rank does not join or when the launch
    config overrides the recipe's gradient accumulation."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_ranks = world > 1 and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator (gloo when oneCCL is absent); set before deepspeed is imported
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    timeout = datetime.timedelta(seconds=init_timeout_s())
    # Several processes without CUDA: gloo, and `cpu=True` so accelerate records MULTI_CPU (else it
    # says NO distribution: no DDP wrapper, no barriers). DeepSpeed takes the other path (cpu=False).
    kwargs = [InitProcessGroupKwargs(backend="gloo" if cpu_ranks else None, timeout=timeout)]
    try:
        acc = Accelerator(
            gradient_accumulation_steps=grad_accum,
            kwargs_handlers=kwargs,
            cpu=cpu_ranks and not deepspeed,
        )
    except (torch.distributed.DistError, TimeoutError, ConnectionError) as err:
        if world <= 1:
            raise
        raise LaunchError(join_failure_message(err)) from err
    if acc.gradient_accumulation_steps != grad_accum:
        raise LaunchError(
            f"the launch configuration sets gradient_accumulation_steps="
            f"{acc.gradient_accumulation_steps} but the recipe's `train.grad_accum` is {grad_accum}. "
            "distill takes accumulation from the recipe: remove `gradient_accumulation_steps` from "
            "the accelerate config (and ACCELERATE_GRADIENT_ACCUMULATION_STEPS from the environment)."
        )
    return acc


def join_failure_message(err: BaseException) -> str:
    env = os.environ
    rank, world = env.get("RANK", "?"), env.get("WORLD_SIZE", "?")
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"process {rank} of {world} could not join the process group at {where} within "
        f"{init_timeout_s():.0f} s ({first}). Every process must start and reach the same address: "
        "check that all nodes of the allocation started a launcher, that MASTER_ADDR (accelerate's "
        "--main_process_ip) is the head node and reachable from this node, that MASTER_PORT "
        "(--main_process_port) is open and not used by another job, and that --num_machines and "
        f"--num_processes match what was started. Raise {INIT_TIMEOUT_ENV} if nodes start slowly."
    )


def check_same_recipe(acc, resolved: str) -> None:
    """Every process must run the same resolved recipe (same file contents and overrides)."""
    if acc.num_processes == 1:
        return
    digest = hashlib.sha256(resolved.encode()).digest()[:7]
    mine = torch.tensor([int.from_bytes(digest, "big")], dtype=torch.int64, device=acc.device)
    every = acc.gather(mine).tolist()
    if len(set(every)) > 1:
        groups: dict[int, list[int]] = {}
        for rank, h in enumerate(every):
            groups.setdefault(h, []).append(rank)
        detail = "; ".join(f"ranks {ranks} have recipe {h:014x}" for h, ranks in groups.items())
        raise LaunchError(
            f"the processes disagree on the recipe ({detail}). Every process must read the same "
            "recipe file with the same overrides: put the recipe on a filesystem all nodes share (or "
            "copy the identical file), and pass the same `key=value` overrides on every node."
        )


# ----------------------------------------------------------------------------------------------
# DeepSpeed config from the recipe


def deepspeed_plugin(acc):
    """The active DeepSpeed plugin, or None when DeepSpeed is not in use."""
    from accelerate.utils import DistributedType

    if acc is None or acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    return acc.state.deepspeed_plugin


def zero_stage(acc) -> int | None:
    plugin = deepspeed_plugin(acc)
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_zero3(acc) -> bool:
    return zero_stage(acc) == 3


_PRISTINE: dict[int, dict] = {}


def _pristine_config(plugin) -> dict:
    """The DeepSpeed config as the user wrote it. accelerate fills `auto` values in place when a
    model is prepared, so a later stage (another batch size or accumulation) starts from this copy."""
    key = id(plugin)
    if key not in _PRISTINE:
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path != "none" and Path(path).is_file():
            _PRISTINE[key] = json.loads(Path(path).read_text())
        else:
            _PRISTINE[key] = copy.deepcopy(plugin.deepspeed_config)
    return copy.deepcopy(_PRISTINE[key])


def _set(path: str, value, cfg: dict, problems: list[str], recipe_key: str) -> None:
    """Write `value` at dotted `path` unless the config holds a different explicit value."""
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(last, "auto")
    if current not in ("auto", None) and current != value:
        problems.append(f"DeepSpeed `{path}` is {current!r} but {recipe_key} gives {value!r}")
    node[last] = value


def _stage_config(acc, spec) -> tuple[dict | None, list[str]]:
    """This stage's DeepSpeed config (None without DeepSpeed) filled from its TrainSpec, and what
    in the launch configuration contradicts the recipe."""
    problems: list[str] = []
    if acc.mixed_precision not in ("no", "bf16" if spec.precision == "bf16" else "no"):
        problems.append(
            f"the accelerate config sets mixed_precision={acc.mixed_precision} but "
            f"`train.precision` is {spec.precision}: set `mixed_precision: 'no'` in the accelerate "
            "config (distill takes precision from the recipe)"
        )
    plugin = deepspeed_plugin(acc)
    if plugin is None:
        return None, problems
    cfg = _pristine_config(plugin)
    for section, fix in (
        ("optimizer", "distill builds AdamW from `train.lr`, `train.betas`, `train.weight_decay`"),
        ("scheduler", "the learning rate follows `train.schedule` and `train.warmup_ratio`"),
    ):
        if section in cfg:
            problems.append(f"the DeepSpeed config sets `{section}`: remove it ({fix})")
    if str(cfg.get("fp16", {}).get("enabled", False)).lower() == "true":
        problems.append("DeepSpeed `fp16` is enabled: remove it and use `train.precision: bf16`")
    bf16 = spec.precision == "bf16"
    if str(cfg.get("bf16", {}).get("enabled", False)).lower() == "true" and not bf16:
        problems.append("DeepSpeed `bf16.enabled` is true but `train.precision` is fp32")
    world = acc.num_processes
    _set("train_micro_batch_size_per_gpu", spec.batch_size, cfg, problems, "`train.batch_size`")
    _set("gradient_accumulation_steps", spec.grad_accum, cfg, problems, "`train.grad_accum`")
    _set(
        "train_batch_size",
        spec.batch_size * spec.grad_accum * world,
        cfg,
        problems,
        f"`train.batch_size` x `train.grad_accum` x {world} processes",
    )
    _set("gradient_clipping", float(spec.max_grad_norm), cfg, problems, "`train.max_grad_norm`")
    cfg.setdefault("bf16", {})["enabled"] = bf16
    cfg.setdefault("fp16", {})["enabled"] = False
    cfg["steps_per_print"] = float("inf")  # DeepSpeed's own stdout logging off; distill logs
    return cfg, problems


def configure_deepspeed(acc, spec, hidden_size: int) -> None:
    """Fill the DeepSpeed config of this stage from the recipe (`spec` is its TrainSpec): batch
    sizes, accumulation, clipping, bf16, and bucket sizes from the student's hidden size. The
    launch was checked against the whole recipe before (`check_launch`). No-op without DeepSpeed."""
    cfg, problems = _stage_config(acc, spec)
    if problems:
        raise LaunchError(
            "the launch configuration and the recipe disagree:\n  " + "\n  ".join(problems)
        )
    if cfg is None:
        return
    zero = cfg.setdefault("zero_optimization", {})
    for key, value in _bucket_sizes(hidden_size).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # accelerate and DeepSpeed read the plugin's dict: replace its contents in place
    plugin = deepspeed_plugin(acc)
    plugin.hf_ds_config.config.clear()
    plugin.hf_ds_config.config.update(cfg)
    plugin.set_deepspeed_weakref()  # transformers' zero.Init (ZeRO-3 model building) sees it


def check_launch(acc, recipe, keeps_sparsity) -> None:
    """Before anything is built: every training stage of `recipe` can run under this launch
    (DeepSpeed settings, precision, teacher placement, what ZeRO-3 cannot honour).
    `keeps_sparsity(stage)` says whether a stage re-applies sparsity masks (decided by the run)."""

    problems: list[str] = []
    for stage in recipe.stages:
        if stage.kind not in TRAINING_KINDS:
            continue
        where = f"stage {stage.name!r}"
        problems += [f"{where}: {p}" for p in _stage_config(acc, stage.train)[1]]
        teacher = getattr(stage, "teacher", None)
        if teacher is not None and teacher.placement == "zero3" and deepspeed_plugin(acc) is None:
            problems.append(
                f"{where}: `teacher.placement: zero3` needs a DeepSpeed launch (e.g. accelerate "
                "launch --config_file launch/zero3.yaml, or launch/zero2.yaml for a ZeRO-2 "
                "student); without DeepSpeed use `placement: replicate` (or `auto`)"
            )
        if stage.kind == "qat" and is_zero3(acc):
            problems.append(
                f"{where}: `qat` cannot run under ZeRO-3: fake quantization reads whole weight "
                "matrices, which ZeRO-3 keeps partitioned. Run it with launch/zero2.yaml (or DDP); "
                "its teacher can still be partitioned with `teacher.placement: zero3`"
            )
        if keeps_sparsity(stage) and is_zero3(acc):
            problems.append(
                f"{where}: keeping sparsity masks (a pruned student) cannot run under ZeRO-3: "
                "the masks are re-applied to whole weight matrices after every step, which ZeRO-3 "
                "keeps partitioned. Run it with launch/zero2.yaml (or DDP), or set "
                "`keep_sparsity: false`"
            )
    if problems:
        raise LaunchError(
            "the launch configuration and the recipe disagree:\n  "
            + "\n  ".join(problems)
            + '\n(DeepSpeed values distill fills from the recipe can be "auto" or left out.)'
        )


def _bucket_sizes(hidden_size: int) -> dict:
    """accelerate's defaults for the `auto` bucket sizes, from the model's hidden size."""
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


# ----------------------------------------------------------------------------------------------
# The teacher


def device_memory_bytes(acc) -> int:
    """Memory of one device (a GPU), or this machine's RAM shared by its local processes (CPU)."""
    if acc.device.type == "cuda":
        return torch.cuda.get_device_properties(acc.device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local, 1)


def param_count_of_config(config) -> int:
    """Parameters of a causal LM built from `config`, without allocating its weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with hf_zero3_disabled(), init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def teacher_placement(acc, placement: str, max_fraction: float, teacher_bytes) -> str:
    """`replicate` or `zero3` for this run; `teacher_bytes` is a callable (only `auto` under
    DeepSpeed needs the size)."""
    ds = deepspeed_plugin(acc) is not None
    if placement == "zero3" and not ds:
        raise LaunchError(
            "`teacher.placement: zero3` needs a DeepSpeed launch (e.g. `accelerate launch "
            "--config_file launch/zero3.yaml ...`, or launch/zero2.yaml for a ZeRO-2 student). "
            "Without DeepSpeed use `placement: replicate` (or `auto`)."
        )
    if placement != "auto":
        return placement
    if not ds:
        return "replicate"
    budget = max_fraction * device_memory_bytes(acc)
    return "replicate" if teacher_bytes() <= budget else "zero3"


@contextmanager
def hf_zero3_disabled():
    """Build a model whole even while a ZeRO-3 plugin is active (transformers would otherwise
    partition it through zero.Init)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def teacher_deepspeed_config(acc, spec, hidden_size: int) -> dict:
    """An inference-only ZeRO-3 config: the student's (when it has one) with the optimizer,
    clipping and accumulation parts removed and buckets sized for the teacher."""
    plugin = deepspeed_plugin(acc)
    base = copy.deepcopy(plugin.deepspeed_config) if plugin is not None else {}
    for key in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size", "fp16"):
        base.pop(key, None)
    zero = {
        k: v
        for k, v in base.get("zero_optimization", {}).items()
        if k.startswith("stage3_") or k in ("offload_param",)
    }
    zero.update({"stage": 3, **_bucket_sizes(hidden_size)})
    zero.pop("stage3_gather_16bit_weights_on_model_save", None)
    base.update(
        {
            "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": spec.batch_size,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": spec.precision == "bf16"},
            "steps_per_print": float("inf"),
        }
    )
    return base


@contextmanager
def building_teacher(placement: str, ds_config: dict | None):
    """Where the teacher's weights go while it is built: whole (replicate) even beside a ZeRO-3
    student, or partitioned at construction (zero3) so no rank ever holds all of it."""
    if placement == "replicate":
        with hf_zero3_disabled():
            yield
        return
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    keep = hf_ds.HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers holds a weak reference
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def partition_teacher(teacher_lm: nn.Module, ds_config: dict) -> nn.Module:
    """The frozen teacher as an inference-only ZeRO-3 engine (no optimizer, no optimizer state).
    Returns the engine's module, a `TeacherTrunk`: calling it gathers each layer's weights in
    turn on every rank, so every rank must run every teacher forward."""
    import deepspeed

    trunk = TeacherTrunk(teacher_lm)
    # the head weight is read in TeacherTrunk.forward, not through the lm_head module
    head = causal_lm_of(teacher_lm).get_output_embeddings().weight
    deepspeed.zero.register_external_parameter(trunk, head)
    engine, *_ = deepspeed.initialize(model=trunk, config=ds_config)
    engine.eval()
    object.__setattr__(trunk, "engine", engine)  # keep it alive, not registered as a submodule
    return trunk


# ----------------------------------------------------------------------------------------------
# The student under ZeRO-3


def register_head(acc, module: nn.Module, head: torch.Tensor) -> None:
    """ZeRO-3: DistillModule.forward reads the head weight directly (the chunked loss applies it
    per chunk), so DeepSpeed must gather it for the whole forward and backward of `module`."""
    if is_zero3(acc):
        import deepspeed

        deepspeed.zero.register_external_parameter(module, head)


def gathered_state_dict(acc, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of a ZeRO-3 model, on CPU on the main process (None elsewhere). A
    collective: every rank must call it. Parameters are gathered one at a time."""
    import deepspeed

    params = dict(model.named_parameters(remove_duplicate=False))
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        param = params.get(name)
        gather = (
            deepspeed.zero.GatheredParameters([param])
            if param is not None and hasattr(param, "ds_id")
            else nullcontext()
        )
        with gather:
            if acc.is_main_process:
                tensor = param if param is not None else value
                state[name] = tensor.detach().to("cpu", copy=True)
    return state if acc.is_main_process else None
