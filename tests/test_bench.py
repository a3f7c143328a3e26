"""`distill bench`: the real command on a shrunk bench-cpu recipe, the FLOP model against the published
reference shape, and the CPU memory tracker the bench relies on."""

from __future__ import annotations

import json

import pytest
import torch

from distill.bench.flops import student_flops_per_token, teacher_flops_per_token
from distill.bench.memory import TensorMemoryTracker
from distill.bench.step import build_train_step, pick_stage, step_shapes
from distill.cli import main
from distill.recipe_file import load_recipe

from conftest import RECIPES, run_cli

# bench-cpu's vocabulary (32,000) and tokens a step (2 x 1,024) with 1-layer models, so the
# loss dominates and the run stays short.
SMALL_MODELS = [
    "models.teacher.config.hidden_size=64",
    "models.teacher.config.num_hidden_layers=1",
    "models.teacher.config.intermediate_size=128",
    "models.student.config.hidden_size=32",
    "models.student.config.num_hidden_layers=1",
    "models.student.config.intermediate_size=64",
]


def test_bench_cli_reports_both_paths_and_chunked_loss_memory_is_small(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench",
        RECIPES / "bench-cpu.yaml",
        *SMALL_MODELS,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
        out,
        # one thread: memory does not depend on it, and a shared CPU slows OpenMP teams badly
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert "chunked / naive" in proc.stdout and "MFU measured" in proc.stdout
    result = json.loads(out.read_text())

    shapes = result["shapes"]
    assert shapes["vocab_size"] == 32_000 and shapes["tokens_per_step"] == 2_048
    assert result["device"]["type"] == "cpu" and result["torch"] == torch.__version__
    assert result["flops"]["per_step"] == pytest.approx(result["flops"]["per_token"] * 2_048)
    assert result["peak_flops"]["measured"] > 0 and result["peak_flops"]["spec"] is None
    assert result["floor"]["ms_per_step"] > 0
    paths = result["paths"]
    assert set(paths) == {"chunked", "naive"}
    for path in paths.values():
        for key in ("ms_per_step", "tokens_per_s", "mfu", "peak_memory_bytes"):
            assert path[key] > 0, key
        assert "mfu_spec" in path and path["mfu_spec"] is None
        assert 0 < path["loss_peak_memory_bytes"] < path["peak_memory_bytes"]
    # Same models, same batch, same objective: the paths agree on the loss.
    assert paths["chunked"]["loss_first_step"] == pytest.approx(
        paths["naive"]["loss_first_step"], rel=1e-4
    )
    # The CPU criterion (a memory bound, not a timing): at vocab 32,000 and 2,048 tokens a
    # step, the chunked loss peaks at <= 0.3x the naive one.
    chunked_loss = paths["chunked"]["loss_peak_memory_bytes"]
    naive_loss = paths["naive"]["loss_peak_memory_bytes"]
    assert chunked_loss <= 0.3 * naive_loss, (chunked_loss, naive_loss)
    # The naive loss holds at least the student's [2,046 x 32,000] float32 logits.
    assert naive_loss >= 2 * 1_023 * 32_000 * 4
    ratios = result["ratios_chunked_to_naive"]
    assert ratios["loss_peak_memory"] == pytest.approx(chunked_loss / naive_loss)


def test_flop_model_matches_perf_md_reference_shape():
    """bench-reference.yaml is the reference shape: 0.51 B / 3.21 B params, F_s = 3.66 and
    F_t = 7.13 GFLOP a token, 88.4 TFLOP a step (built on the meta device: no memory, no time)."""
    recipe = load_recipe(RECIPES / "bench-reference.yaml")
    stage = pick_stage(recipe, None)
    shapes = step_shapes(build_train_step(recipe, stage, "chunked", torch.device("meta"), []))
    student, teacher = shapes.student, shapes.teacher
    seq_len = recipe.data.seq_len
    tokens = seq_len * stage.train.batch_size
    assert (tokens, shapes.vocab_size, stage.train.precision) == (8_192, 128_256, "bf16")
    assert student.matmul_params == pytest.approx(0.5088e9, rel=1e-3)  # lm_head counted, tied
    assert student_flops_per_token(student, seq_len) == pytest.approx(3.66e9, rel=2e-3)
    assert teacher_flops_per_token(teacher, seq_len) == pytest.approx(7.13e9, rel=2e-3)
    step_flops = (
        student_flops_per_token(student, seq_len) + teacher_flops_per_token(teacher, seq_len)
    ) * tokens
    assert step_flops == pytest.approx(88.4e12, rel=2e-3)
    term = stage.objective.terms[0]
    assert (term.kind, term.weight, term.temperature, stage.objective.ce_weight) == (
        "forward_kl",
        0.5,
        2.0,
        0.5,
    )


def test_memory_tracker_counts_new_storages_not_views_or_inputs():
    existing = torch.zeros(1_000)  # 4 kB made before: never counted
    with TensorMemoryTracker() as tracker:
        a = torch.empty(10_000)  # 40 kB
        view = a[:10].t()  # a view: nothing new
        b = existing + 1  # 4 kB
        a.add_(1)  # in place: nothing new
        del a, view
        c = torch.empty(5_000)  # 20 kB, allocated after `a` was freed
    assert tracker.peak_bytes == 44_000
    assert tracker.live_bytes == 24_000
    del b, c


def test_bench_rejects_bad_arguments(capsys):
    recipe = str(RECIPES / "bench-cpu.yaml")
    assert main(["bench", recipe, "--paths", "chunked,fused"]) == 2
    assert "--paths" in capsys.readouterr().err
    assert main(["bench", recipe, "--stage", "nope"]) == 2
    assert "training stages: distilled" in capsys.readouterr().err
