"""One loop for 1 and N processes: 2 CPU processes (gloo) under DDP, ZeRO-2 and ZeRO-3 train the
same losses as 1 process with the same global batch, with the teacher replicated or partitioned;
DeepSpeed checkpoints resume exactly in fresh processes; and a launch that cannot work stops early
with a message that names the fix.

Every run uses the real `accelerate launch --config_file launch/cpu_*.yaml -m distill run`. One
recipe holds three stages so one launch covers several cases:
  teacher      `train` of a tied-embedding model (the head's gradient under ZeRO-3)
  replicated   `distill` with a hidden-state loss (projections) and a replicated teacher
  partitioned  `distill` with the teacher as an inference-only ZeRO-3 engine (DeepSpeed only)
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli_here, losses_by_step, run_cli, tiny_recipe

pytestmark = pytest.mark.distributed

STEPS = 10
STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher"},
    {
        "name": "replicated",
        "kind": "distill",
        "model": "student",
        "teacher": {"model": "teacher", "placement": "replicate"},
        "objective": {"hidden": {"kind": "mse"}},
    },
    {
        "name": "partitioned",
        "kind": "distill",
        "model": "student",
        "teacher": {"model": "teacher", "placement": "zero3"},
    },
]
CONFIGS = {
    "ddp": "launch/cpu_ddp.yaml",
    "zero2": "launch/cpu_zero2.yaml",
    "zero3": "launch/cpu_zero3.yaml",
}
# DDP has no DeepSpeed to partition a teacher with: that stage runs replicated there.
NO_ZERO3_TEACHER = ["stages.partitioned.teacher.placement=replicate"]
TOLERANCE = 1e-5


def recipe_with(path, stages, tied_teacher=False, **train):
    """conftest's tiny recipe with `stages`, these `train` defaults, optionally a tied teacher."""
    recipe = tiny_recipe(path, stages)
    raw = yaml.safe_load(recipe.read_text())
    raw["models"]["teacher"]["config"]["tie_word_embeddings"] = tied_teacher
    raw["train"].update(train)
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipe


def write_recipe(path):
    return recipe_with(
        path, STAGES, tied_teacher=True, max_steps=STEPS, save_every=4, warmup_ratio=0.2
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config, recipe, *overrides, env=None, check=True, num_processes=None, timeout=600):
    """`accelerate launch --config_file CONFIG -m distill run RECIPE OVERRIDES` in fresh processes."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(config)]
    cmd += ["--main_process_port", str(free_port())]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["-m", "distill", "run", str(recipe), *overrides]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in a)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("distributed") / "recipe.yaml")


@pytest.fixture(scope="module")
def reference(recipe):
    """One process, grad_accum=2: the same global batch (8 sequences) as 2 processes x 1."""
    from distill.cli import main

    out = recipe.parent / "one_process"
    # in this process (one intra-op thread, as conftest sets and as torchrun sets for each
    # launched process): a fresh process would only add ~3 s of imports
    assert (
        main(["run", str(recipe), "train.grad_accum=2", f"output_dir={out}", *NO_ZERO3_TEACHER])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def two_process_runs(recipe):
    """Uninterrupted 2-process runs, one per launch config, made on first use."""
    runs = {}

    def get(mode):
        if mode not in runs:
            out = recipe.parent / f"two_{mode}"
            extra = NO_ZERO3_TEACHER if mode == "ddp" else []
            proc = launch(CONFIGS[mode], recipe, f"output_dir={out}", *extra)
            runs[mode] = (out, proc)
        return runs[mode]

    return get


@pytest.mark.parametrize("mode", list(CONFIGS))
def test_two_processes_train_like_one(mode, reference, two_process_runs):
    out, proc = two_process_runs(mode)
    for stage in ("teacher", "replicated", "partitioned"):
        one = losses_by_step(reference / stage / "metrics.jsonl")
        two = losses_by_step(out / stage / "metrics.jsonl")
        diff = max_diff(one, two)
        print(f"{mode} {stage}: max |loss(1 process) - loss(2 processes)| = {diff:.2e}")
        assert diff < TOLERANCE, (mode, stage, diff)
        # the exported model is a plain transformers model with the same weights (gathered
        # from the ZeRO-3 partitions)
        from safetensors.torch import load_file

        a = load_file(reference / stage / "model" / "model.safetensors")
        b = load_file(out / stage / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    summary = json.loads((out / "summary.json").read_text())["stages"]
    ref_summary = json.loads((reference / "summary.json").read_text())["stages"]
    for got, want in zip(summary, ref_summary):
        assert got["eval"]["perplexity"] == pytest.approx(want["eval"]["perplexity"], rel=1e-4)
        assert got["params"] == want["params"]
    if mode != "ddp":
        assert "teacher 'teacher': placement zero3" in proc.stderr
    # logging happens once, on the main process
    assert proc.stderr.count("stage 'teacher' (train) starting") == 1


def test_teacher_is_not_in_student_checkpoints(two_process_runs):
    out, _ = two_process_runs("zero3")
    ckpt = out / "partitioned" / "checkpoints" / "step_00000010"
    import torch

    states = sorted((ckpt / "pytorch_model").glob("*model_states.pt"))
    assert len(states) == 2  # one shard per rank: DeepSpeed engine state
    blob = torch.load(states[0], map_location="cpu", weights_only=False)
    assert blob["module"] and all(k.startswith("student.") for k in blob["module"])
    assert all(k.startswith("student.") for k in blob["param_shapes"][0])


@pytest.mark.parametrize("mode, stage", [("zero2", "replicated"), ("zero3", "partitioned")])
def test_deepspeed_checkpoint_resumes_exactly(mode, stage, recipe, two_process_runs, tmp_path):
    """Killed (SIGKILL on every rank) during step 7 of `stage`, resumed from its step-4 checkpoint
    in fresh processes: the remaining steps are those of the uninterrupted run."""
    done, _ = two_process_runs(mode)
    out = tmp_path / "run"
    out.mkdir()
    for part in ("tokenizer", "data", *(s["name"] for s in STAGES if s["name"] != stage)):
        shutil.copytree(done / part, out / part)  # finished stages are skipped
    killed = launch(
        CONFIGS[mode],
        recipe,
        f"output_dir={out}",
        env={"DISTILL_FAULT": "kill_at_micro=6.0"},
        check=False,
    )
    assert killed.returncode != 0
    assert sorted(p.name for p in (out / stage / "checkpoints").iterdir()) == ["step_00000004"]
    resumed = launch(CONFIGS[mode], recipe, f"output_dir={out}")
    assert f"resumed from {out / stage / 'checkpoints' / 'step_00000004'} at step 4" in (
        resumed.stderr
    )
    want = losses_by_step(done / stage / "metrics.jsonl")
    got = losses_by_step(out / stage / "metrics.jsonl")
    assert max_diff(want, got) < 1e-6


@pytest.mark.slow  # ~30 s; beyond the distributed criteria, run with -m slow
def test_pruned_student_recovers_under_zero2_like_one_process(tmp_path):
    """Prune, then a recovery distill that keeps the masks (re-applied after each DeepSpeed step
    to the weights the forward uses): the same losses and the same sparsity as one process."""
    stages = [
        {"name": "base", "kind": "train", "model": "student", "train": {"max_steps": 6}},
        {
            "name": "pruned",
            "kind": "prune",
            "model": "base",
            "prune": {"method": "magnitude", "sparsity": 0.5},
        },
        {"name": "recovered", "kind": "distill", "model": "pruned", "teacher": "base"},
    ]
    recipe = recipe_with(tmp_path / "recipe.yaml", stages, max_steps=STEPS)
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("run", recipe, "train.grad_accum=2", f"output_dir={one}", env={"OMP_NUM_THREADS": "1"})
    launch(CONFIGS["zero2"], recipe, f"output_dir={two}")
    want, got = (losses_by_step(d / "recovered" / "metrics.jsonl") for d in (one, two))
    assert max_diff(want, got) < TOLERANCE
    for run in (one, two):
        recovered = json.loads((run / "summary.json").read_text())["stages"][2]
        assert recovered["keep_sparsity"] is True
        assert recovered["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_non_finite_steps_are_skipped_under_zero3(tmp_path):
    """DeepSpeed steps inside `backward`; a NaN loss gives an infinite gradient norm there, so
    DeepSpeed skips the update and the loop counts the step as skipped on every rank: the steps
    after it train exactly as in one process."""
    stages = [{"name": "base", "kind": "train", "model": "student", "train": {"max_steps": 6}}]
    recipe = tiny_recipe(tmp_path / "recipe.yaml", stages)
    fault = {"DISTILL_FAULT": "nan_at=2-3", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    cli_here("run", recipe, "train.grad_accum=2", f"output_dir={one}", env=fault)
    proc = launch(CONFIGS["zero3"], recipe, f"output_dir={two}", env=fault)
    assert proc.stderr.count("skipping this optimizer step on every rank") == 2
    want, got = (losses_by_step(d / "base" / "metrics.jsonl") for d in (one, two))
    assert sorted(got) == list(range(1, 7))
    for step in (1, 2, 5, 6):  # (steps 3 and 4 log the NaN loss)
        assert abs(want[step] - got[step]) < TOLERANCE, (step, want[step], got[step])
    summary = json.loads((two / "summary.json").read_text())["stages"][0]
    assert summary["skipped_steps"] == 2


# ----------------------------------------------------------------------------------------------
# Launches that cannot work stop before training, naming the fix


def test_launch_config_and_recipe_disagree(tmp_path):
    """ZeRO-3 asked to do what it cannot (QAT), and a DeepSpeed JSON that contradicts the recipe."""
    ds = json.loads((ROOT / "launch" / "ds_zero3.json").read_text())
    ds["gradient_clipping"] = 0.5
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    config = yaml.safe_load((ROOT / "launch" / "cpu_zero3.yaml").read_text())
    config["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(config))
    recipe = tiny_recipe(
        tmp_path / "recipe.yaml",
        [
            {"name": "base", "kind": "train", "model": "student", "train": {"max_steps": 2}},
            {"name": "quantized", "kind": "qat", "model": "base", "train": {"max_steps": 2}},
        ],
    )
    proc = launch(tmp_path / "accelerate.yaml", recipe, check=False, num_processes=1)
    assert proc.returncode != 0  # the worker exits 2; the launcher reports its own failure
    err = proc.stderr
    assert "the launch configuration and the recipe disagree" in err
    assert "DeepSpeed `gradient_clipping` is 0.5 but `train.max_grad_norm` gives 1.0" in err
    assert "the DeepSpeed config sets `optimizer`: remove it" in err
    assert "stage 'quantized': `qat` cannot run under ZeRO-3" in err
    assert not (tmp_path / "run" / "base").exists()  # nothing trained


def test_zero3_teacher_without_deepspeed_is_refused(recipe, tmp_path):
    proc = cli_here("run", recipe, f"output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "`teacher.placement: zero3` needs a DeepSpeed launch" in proc.stderr
    assert "launch/zero3.yaml" in proc.stderr


def _rank_env(rank: int, world: int, port: int, **extra) -> dict:
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        **extra,
    }


def test_processes_that_disagree_on_the_recipe_stop(recipe, tmp_path):
    """Rank 1 got other overrides than rank 0 (e.g. a different recipe file on another node)."""
    port = free_port()
    out = f"output_dir={tmp_path / 'run'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distill", "run", str(recipe), out, f"train.lr={lr}"],
            cwd=ROOT,
            env=_rank_env(rank, 2, port),
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, lr in ((0, 0.003), (1, 0.001))
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for proc, err in zip(procs, errors):
        assert proc.returncode == 2, err[-3000:]
        assert "the processes disagree on the recipe" in err
        assert "ranks [0] have recipe" in err and "ranks [1] have recipe" in err


def test_a_rank_that_never_joins_is_reported(recipe, tmp_path):
    """Only rank 0 of 2 starts: it gives up after DISTILL_INIT_TIMEOUT_S, naming the address."""
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "run", str(recipe), f"output_dir={tmp_path}"],
        cwd=ROOT,
        env=_rank_env(0, 2, port, DISTILL_INIT_TIMEOUT_S="3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert f"process 0 of 2 could not join the process group at 127.0.0.1:{port}" in proc.stderr
    assert "MASTER_ADDR" in proc.stderr and "--num_machines" in proc.stderr


# ----------------------------------------------------------------------------------------------
# The DeepSpeed config filled from the recipe (no processes needed)


class _Plugin:
    def __init__(self, config):
        from types import SimpleNamespace

        self.hf_ds_config = SimpleNamespace(config=config)
        self.deepspeed_config = config
        self.weakref_set = 0

    def set_deepspeed_weakref(self):
        self.weakref_set += 1


class _Accelerator:
    def __init__(self, config, num_processes=4, mixed_precision="no"):
        from types import SimpleNamespace

        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.num_processes = num_processes
        self.mixed_precision = mixed_precision
        self.state = SimpleNamespace(deepspeed_plugin=_Plugin(config))


def _spec(**kw):
    from distill.config import TrainSpec

    return TrainSpec(**{"batch_size": 4, "grad_accum": 2, "max_grad_norm": 0.5, **kw})


def test_deepspeed_config_is_filled_from_the_recipe(monkeypatch):
    from distill.runtime import distributed

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    shipped = json.loads((ROOT / "launch" / "ds_zero3.json").read_text())
    acc = _Accelerator(shipped)
    distributed.configure_deepspeed(acc, _spec(precision="bf16"), hidden_size=64)
    cfg = acc.state.deepspeed_plugin.hf_ds_config.config
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 4 * 2 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    zero = cfg["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["reduce_bucket_size"] == 64 * 64
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert acc.state.deepspeed_plugin.weakref_set == 1
    # a later stage with other settings starts again from the file's "auto" values
    distributed.configure_deepspeed(acc, _spec(batch_size=2, grad_accum=1), hidden_size=32)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["bf16"] == {"enabled": False}
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 32 * 32


def test_deepspeed_config_that_contradicts_the_recipe(monkeypatch):
    from distill.runtime import distributed

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "bf16": {"enabled": True},
        "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 2},
    }
    with pytest.raises(distributed.LaunchError) as err:
        distributed.configure_deepspeed(_Accelerator(config), _spec(), hidden_size=64)
    text = str(err.value)
    assert "`train_micro_batch_size_per_gpu` is 8 but `train.batch_size` gives 4" in text
    assert "gradient_accumulation_steps" not in text  # 2 agrees with the recipe
    assert "`bf16.enabled` is true but `train.precision` is fp32" in text
    assert "the DeepSpeed config sets `scheduler`: remove it" in text
    with pytest.raises(distributed.LaunchError, match="mixed_precision=fp16"):
        distributed.configure_deepspeed(
            _Accelerator({"zero_optimization": {"stage": 2}}, mixed_precision="fp16"),
            _spec(),
            hidden_size=64,
        )


def test_zero3_launch_refuses_recovering_a_model_saved_by_distill_prune(tmp_path, monkeypatch):
    """The launch check and the stage decide "keeps sparsity masks" with one function, so a
    `models:` entry holding a `distill prune` output is refused under ZeRO-3 before anything runs."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from distill.errors import LaunchError
    from distill.recipe_file import load_recipe
    from distill.run.prune_stage import keeps_sparsity
    from distill.runtime.distributed import check_launch

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "distill_prune.json").write_text('{"method": "wanda", "details": {}}')
    recipe_path = tiny_recipe(
        tmp_path / "recipe.yaml",
        stages=[
            {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 2}},
            {"name": "recovered", "kind": "distill", "model": "pruned", "teacher": "teacher"},
        ],
    )
    recipe = load_recipe(recipe_path, [f"models.pruned.path={pruned}"])
    assert keeps_sparsity(recipe, recipe.stage("recovered"))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    zero3 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=plugin),
        mixed_precision="no",
        num_processes=2,
    )
    with pytest.raises(LaunchError, match="stage 'recovered': keeping sparsity masks"):
        check_launch(zero3, recipe, lambda stage: keeps_sparsity(recipe, stage))
