"""Pruning through the real `distill` CLI: `prune` stages and recovery by distillation in a recipe
(exact sparsity after pruning and after every recovery step, the N:M pattern, summary and report),
the hidden-state layer map of a depth-pruned student, and `distill prune` on a saved model dir."""

import json
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_here, run_cli, tiny_recipe

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
RECOVERY_OBJECTIVE = {"ce_weight": 0.0, "terms": [{"kind": "forward_kl", "weight": 1.0}]}


def recovery(name: str, student: str, teacher: str, **extra) -> dict:
    return {
        "name": name,
        "kind": "distill",
        "model": student,
        "teacher": teacher,
        "train": {"max_steps": 4, "lr": 1e-2},
        "objective": RECOVERY_OBJECTIVE,
        **extra,
    }


STAGES = [
    {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 8}},
    {
        "name": "distilled",
        "kind": "distill",
        "model": "student",
        "teacher": "teacher",
        "train": {"max_steps": 8},
    },
    {"name": "pruned-wanda", "kind": "prune", "model": "distilled", "prune": {"method": "wanda"}},
    # a checkpoint after every optimizer step, all kept: each must hold the zeros
    recovery(
        "recovered-wanda",
        "pruned-wanda",
        "distilled",
        train={"max_steps": 4, "lr": 1e-2, "save_every": 1, "keep_last": 10},
    ),
    # the control: without the masks, training fills the pruned weights in again
    recovery("unmasked-wanda", "pruned-wanda", "distilled", keep_sparsity=False),
    {"name": "pruned-2of4", "kind": "prune", "model": "distilled", "prune": {"method": "nm"}},
    recovery("recovered-2of4", "pruned-2of4", "distilled"),
    # depth: remove the teacher's last layer; the hidden loss must pair student 0 with teacher 0
    {
        "name": "pruned-depth",
        "kind": "prune",
        "model": "teacher",
        "prune": {"method": "depth", "layers": [1]},
    },
    recovery(
        "recovered-depth",
        "pruned-depth",
        "teacher",
        objective={**RECOVERY_OBJECTIVE, "hidden": {"kind": "mse", "weight": 1.0}},
    ),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune-stage")
    recipe = tiny_recipe(root / "recipe.yaml", STAGES)
    proc = cli_here("run", recipe)
    out = root / "run"
    entries = {e["name"]: e for e in json.loads((out / "summary.json").read_text())["stages"]}
    return out, entries, proc


def linear_weights(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The decoder linears of a safetensors or torch weights file (keys without `prefix`)."""
    tensors = (
        load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    )
    return {
        k.removeprefix(prefix): v
        for k, v in tensors.items()
        if LINEAR.search(k.removeprefix(prefix))
    }


def model_linears(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return linear_weights(out / stage / "model" / "model.safetensors")


def test_wanda_sparsity_is_exact_after_pruning_and_after_recovery(run):
    out, entries, _ = run
    pruned, recovered = model_linears(out, "pruned-wanda"), model_linears(out, "recovered-wanda")
    assert len(pruned) == 2 * 7
    for name, weight in pruned.items():
        # Wanda prunes half of every output row
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name
        assert torch.equal(recovered[name] == 0, weight == 0), name
        assert not torch.equal(recovered[name], weight), name  # the kept weights did train
    assert entries["pruned-wanda"]["sparsity"] == 0.5
    assert entries["recovered-wanda"]["sparsity"] == 0.5
    assert entries["recovered-wanda"]["keep_sparsity"] is True


def test_pruned_weights_are_zero_after_every_optimizer_step(run):
    out, _, _ = run
    keep = {name: w != 0 for name, w in model_linears(out, "pruned-wanda").items()}
    steps = sorted((out / "recovered-wanda" / "checkpoints").glob("step_*"))
    assert [s.name for s in steps] == [f"step_{i:08d}" for i in range(1, 5)]
    for step in steps:
        (weights_file,) = [
            f for f in step.iterdir() if f.name.startswith(("model.", "pytorch_model."))
        ]
        weights = linear_weights(weights_file, prefix="student.")
        assert weights.keys() == keep.keys()
        for name, weight in weights.items():
            assert (weight[~keep[name]] == 0).all(), (step.name, name)
            assert (weight[keep[name]] != 0).all(), (step.name, name)

    unmasked = model_linears(out, "unmasked-wanda")
    assert all((unmasked[name][~k] != 0).any() for name, k in keep.items())


def test_two_of_four_pattern_holds_in_every_group(run):
    out, entries, _ = run
    for stage in ("pruned-2of4", "recovered-2of4"):
        for name, weight in model_linears(out, stage).items():
            nonzero = (weight != 0).view(weight.shape[0], -1, 4).sum(-1)
            assert (nonzero == 2).all(), (stage, name)
    assert entries["pruned-2of4"]["sparsity"] == 0.5
    assert entries["pruned-2of4"]["details"]["n"] == 2


def test_summary_and_report_show_each_step(run):
    out, entries, _ = run
    distilled = entries["distilled"]["eval"]["perplexity"]
    for name, method in (("pruned-wanda", "wanda"), ("pruned-2of4", "nm")):
        e = entries[name]
        assert e["method"] == method and e["from"] == "distilled"
        # measured like the stage it starts from: "before" is that stage's own number
        assert e["perplexity_before"] == pytest.approx(distilled, rel=1e-4)
        assert e["eval"]["perplexity"] > e["perplexity_before"]
        assert e["params_before"] == e["params"] == entries["distilled"]["params"]
        assert e["size_bytes"] == entries["distilled"]["size_bytes"]  # zeros are stored
        assert (out / name / "model" / "distill_prune.json").is_file()
        rec = entries[name.replace("pruned", "recovered")]
        assert rec["compare_to"] == name
        lost = e["eval"]["perplexity"] - e["perplexity_before"]
        won = e["eval"]["perplexity"] - rec["eval"]["perplexity"]
        assert rec["recovered_fraction"] == pytest.approx(won / lost)
    report = (out / "report.md").read_text()
    assert "method=wanda" in report and "perplexity_before=" in report
    assert "recovered-wanda recovered " in report
    assert "of the perplexity pruned-wanda lost (wanda: before pruning" in report


def test_depth_pruned_student_maps_hidden_states_to_its_original_layers(run):
    out, entries, proc = run
    e = entries["pruned-depth"]
    assert e["details"]["removed_layers"] == [1]
    assert e["params"] < e["params_before"] == entries["teacher"]["params"]
    assert e["size_bytes"] < entries["teacher"]["size_bytes"]
    # `uniform` would pair the one remaining layer with the teacher's last layer, (0, 1)
    assert "layer map follows the depth prune of 'pruned-depth': [(0, 0)]" in proc.stderr
    assert "loss_hidden" in (out / "recovered-depth" / "metrics.jsonl").read_text()


def test_pruned_and_recovered_models_reload_with_transformers(run):
    from transformers import AutoModelForCausalLM

    out, _, _ = run
    for stage in ("recovered-wanda", "recovered-2of4", "pruned-depth", "recovered-depth"):
        model = AutoModelForCausalLM.from_pretrained(out / stage / "model")
        ids = torch.tensor([[1, 2, 3]])
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_prune_stage_with_sizes_the_model_cannot_take_exits_2(tmp_path):
    stage = {"name": "narrow", "kind": "prune", "model": "student"}
    recipe = tiny_recipe(
        tmp_path / "recipe.yaml", [{**stage, "prune": {"method": "width", "heads_fraction": 0.9}}]
    )
    proc = cli_here("run", recipe, check=False)
    assert proc.returncode == 2
    assert (
        "stage 'narrow': prune.heads_fraction=0.9 removes 2 of 2 key-value head groups, leaving "
        "none" in proc.stderr
    )


# --- distill prune MODEL_DIR ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for name in ("textwrap.py", "shlex.py"):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, folder / name)
    return str(folder / "*.py")


def cli_prune(teacher_dir: Path, out: Path, *args: str, calibration: str | None = None):
    extra = ["--calibration", calibration, "--seq-len", "32"] if calibration else []
    return run_cli("prune", teacher_dir, "--out", out, *args, *extra)


def zero_removed_units(model, record: dict) -> None:
    """Zero what width pruning removed: the heads of dropped KV groups and dropped MLP channels
    (their rows of q/k/v and columns of o_proj; their columns of down_proj)."""
    head_dim = model.model.layers[0].self_attn.head_dim
    details = record["details"]
    with torch.no_grad():
        for layer, kept_kv, kept_mlp in zip(
            model.model.layers, details["kept_kv_heads"], details["kept_mlp_channels"]
        ):
            attn = layer.self_attn
            for kv in set(range(attn.k_proj.out_features // head_dim)) - set(kept_kv):
                rows = slice(kv * head_dim, (kv + 1) * head_dim)  # MHA: one query head per group
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.weight[rows] = 0
                attn.o_proj.weight[:, rows] = 0
            removed = sorted(set(range(layer.mlp.down_proj.in_features)) - set(kept_mlp))
            layer.mlp.down_proj.weight[:, removed] = 0


def test_cli_width_gives_a_smaller_model_equal_to_the_masked_original(
    run, calibration_files, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = run
    teacher_dir, pruned_dir = out / "teacher" / "model", tmp_path / "width"
    proc = cli_prune(teacher_dir, pruned_dir, "--method", "width", calibration=calibration_files)
    assert "parameters:" in proc.stdout and "% removed" in proc.stdout

    original = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (1, 1)
    assert config.intermediate_size == 96
    assert pruned.num_parameters() < original.num_parameters()
    assert (pruned_dir / "model.safetensors").stat().st_size < (
        teacher_dir / "model.safetensors"
    ).stat().st_size
    record = json.loads((pruned_dir / "distill_prune.json").read_text())
    zero_removed_units(original, record)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, original(ids).logits, atol=1e-5, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    prompt = tokenizer("def main():", return_tensors="pt")["input_ids"]
    generated = pruned.generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 4


def test_cli_depth_by_rank_and_by_index(run, calibration_files, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    from distill.cli import main  # in-process: the same command, without a second interpreter

    out, _, _ = run
    teacher_dir = str(out / "teacher" / "model")
    ranked, listed = tmp_path / "ranked", tmp_path / "listed"
    args = ["--method", "depth", "--seq-len", "32"]
    assert main(["prune", teacher_dir, "--out", str(ranked), *args, "--layers", "1",
                 "--calibration", calibration_files]) == 0  # fmt: skip
    assert "1 remain" in capsys.readouterr().out
    assert main(["prune", teacher_dir, "--out", str(listed), *args, "--layers", "0,"]) == 0
    record = json.loads((listed / "distill_prune.json").read_text())
    assert record["details"]["removed_layers"] == [0]
    for path in (ranked, listed):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.num_hidden_layers == 1
        assert model.generate(torch.tensor([[5, 6]]), max_new_tokens=2).shape == (1, 4)


def cli_error(capsys, *argv: str) -> str:
    from distill.cli import main

    assert main(["prune", *argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity must be in (0, 1), got 1.5"),
        (["--method", "wanda", "--sparsity", "0"], "--sparsity must be in (0, 1), got 0.0"),
        (["--method", "nm", "--n", "4", "--m", "4"], "needs 0 < --n < --m, got --n=4, --m=4"),
        (["--method", "width", "--heads-fraction", "1"], "--heads-fraction must be in [0, 1)"),
        (["--method", "wanda"], "--method wanda needs --calibration FILE"),
        (["--method", "nm"], "or use --scoring magnitude"),
        (["--method", "depth"], "depth pruning needs --layers"),
        (["--method", "depth", "--layers", "1"], "--method depth needs --calibration"),
        (["--method", "depth", "--layers", "x"], "--layers 'x': give a count"),
        (
            ["--method", "wanda", "--calibration", "/nonexistent/*.txt", "--seq-len", "32"],
            "--calibration '/nonexistent/*.txt' matches no file",
        ),
    ],
)
def test_cli_bad_arguments(run, capsys, tmp_path, args, message):
    out, _, _ = run
    err = cli_error(capsys, str(out / "teacher" / "model"), "--out", str(tmp_path / "o"), *args)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_cli_errors_that_need_the_model(run, capsys, calibration_files, tmp_path):
    out, _, _ = run
    teacher_dir = str(out / "teacher" / "model")
    err = cli_error(capsys, teacher_dir, "--out", str(tmp_path / "o"), "--method", "width",
                    "--heads-fraction", "0.9", "--calibration", calibration_files, "--seq-len", "32")  # fmt: skip
    assert "--heads-fraction=0.9 removes 2 of 2 key-value head groups, leaving none" in err
    err = cli_error(capsys, teacher_dir, "--out", str(tmp_path / "o"), "--method", "depth",
                    "--layers", "0,5")  # fmt: skip
    assert "--layers [5] out of range: the model has layers 0..1" in err
    assert "does not exist" in cli_error(
        capsys, str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--method", "magnitude"
    )
    assert "--out must differ" in cli_error(
        capsys, teacher_dir, "--out", teacher_dir, "--method", "magnitude"
    )


def test_models_pruned_by_the_cli_keep_masks_and_layer_map_in_a_recipe(run, capsys, tmp_path):
    """A `models` entry pointing at a `distill prune` output is recovered like a prune stage."""
    from transformers import AutoModelForCausalLM

    from distill.cli import main
    from distill.models import num_layers
    from distill.recipe_file import load_recipe
    from distill.run.context import RunContext
    from distill.run.prune_stage import hidden_layer_map, keeps_sparsity

    out, _, _ = run
    teacher_dir, distilled_dir = out / "teacher" / "model", out / "distilled" / "model"
    shallow, sparse = tmp_path / "shallow", tmp_path / "sparse"
    assert main(["prune", str(teacher_dir), "--out", str(shallow), "--method", "depth",
                 "--layers", "1,"]) == 0  # fmt: skip
    assert main(["prune", str(distilled_dir), "--out", str(sparse), "--method", "magnitude"]) == 0
    capsys.readouterr()
    recover = {"kind": "distill", "teacher": "teacher", "objective": {"hidden": {"kind": "mse"}}}
    recipe = load_recipe(
        tiny_recipe(
            tmp_path / "recipe.yaml",
            [
                {"name": "deep", "model": "shallow", **recover},
                {"name": "dense", "model": "sparse", **recover},
                {"name": "off", "model": "sparse", **recover, "keep_sparsity": False},
            ],
            models={
                "teacher": {"path": str(teacher_dir)},
                "shallow": {"path": str(shallow)},
                "sparse": {"path": str(sparse)},
            },
        )
    )
    ctx = RunContext(recipe, tmp_path / "run")
    load = AutoModelForCausalLM.from_pretrained
    pairs = hidden_layer_map(
        ctx, recipe.stage("deep"), load(shallow), num_layers(load(teacher_dir))
    )
    assert pairs == [(0, 0)]  # `uniform` would give [(0, 1)]
    assert keeps_sparsity(recipe, recipe.stage("dense"))
    assert not keeps_sparsity(recipe, recipe.stage("off"))
    assert not keeps_sparsity(recipe, recipe.stage("deep"))
