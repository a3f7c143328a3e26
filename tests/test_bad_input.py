"""Every bad input a user can give, through the real CLI, and the message they get.

Each message must name the problem and the fix, the command must fail with exit code 2 (bad input),
and nothing may be left behind that a later run would take for a finished stage.
"""

import json
import shutil

import pytest
import yaml

from conftest import run_cli

TEXT = [f"def func_{i}(a, b):\n    return a * {i} + b  # note {i}\n" * 20 for i in range(80)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer and two small models saved with it, as a user would have them on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config import TokenizerTrainSpec
    from distill.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("assets")
    tok = train_tokenizer(TEXT, TokenizerTrainSpec(vocab_size=300, min_frequency=1))
    tok.save_pretrained(root / "tokenizer")
    for name, width, layers in (("teacher", 64, 4), ("student", 32, 2)):
        config = LlamaConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=64,
            eos_token_id=tok.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXT):
        (corpus / f"doc{i}.txt").write_text(text)
    return root


def recipe(tmp_path, assets, stage_changes=None, **changes):
    raw = {
        "name": "bad",
        "output_dir": str(tmp_path / "out"),
        "data": {"files": [str(assets / "corpus" / "*.txt")], "seq_len": 32, "eval_fraction": 0.1},
        "tokenizer": {"source": "path", "path": str(assets / "tokenizer")},
        "models": {
            "teacher": {"path": str(assets / "teacher")},
            "student": {"path": str(assets / "student")},
        },
        "train": {"batch_size": 2, "max_steps": 2, "log_every": 1},
        "stages": [
            {
                "name": "distilled",
                "kind": "distill",
                "model": "student",
                "teacher": "teacher",
                **(stage_changes or {}),
            },
        ],
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fails(tmp_path, *args, env=None):
    """Run the CLI, expect exit 2, and check no stage looks finished. Returns stderr."""
    proc = run_cli(*args, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("stage.json")) if (tmp_path / "out").exists() else True
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_misspelt_key(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets, stage_changes={"objectiv": {}}))
    assert "stages.0.objectiv: unknown key" in err and "Did you mean 'objective'" in err


def test_wrong_type(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets), "stages.0.train.batch_size=four")
    assert "stages.0.train.batch_size" in err and "'four'" in err and "integer" in err


def test_value_out_of_range(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets), "stages.0.train.keep_last=1")
    assert "keep_last" in err and "greater than or equal to 2" in err


def test_stage_names_missing_stage(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets, stage_changes={"teacher": "teachr"}))
    assert "'teachr' is neither an earlier stage" in err and "did you mean 'teacher'" in err


def test_missing_model_path(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"models.teacher.path={tmp_path}/nope")
    assert "models.teacher.path" in err and "does not exist" in err


def test_missing_data_files(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"data.files=[{tmp_path}/none/*.txt]")
    assert "data.files.0" in err and "matches no file" in err


def test_model_dir_without_config(tmp_path, assets):
    broken = tmp_path / "broken"
    broken.mkdir()
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"models.teacher.path={broken}")
    assert "no config.json" in err and "save_pretrained" in err


def test_corrupt_model_weights(tmp_path, assets):
    broken = tmp_path / "corrupt"
    shutil.copytree(assets / "teacher", broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"models.teacher.path={broken}")
    assert "could not load" in err and "corrupt" in err and "re-save" in err


def test_tokenizer_mismatch(tmp_path, assets):
    from distill.config import TokenizerTrainSpec
    from distill.data.tokenizer import train_tokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(assets / "teacher", other)
    train_tokenizer(
        ["some other text entirely " * 40] * 20, TokenizerTrainSpec(vocab_size=290, min_frequency=1)
    ).save_pretrained(other)
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"models.teacher.path={other}")
    assert "tokenizer mismatch" in err and "shared tokenizer" in err


def test_width_mismatch_without_projections(tmp_path, assets):
    hidden = {"objective": {"hidden": {"kind": "mse", "projection": False}}}
    err = fails(tmp_path, "run", recipe(tmp_path, assets, stage_changes=hidden))
    assert "32" in err and "64" in err and "projection: true" in err


def test_layer_map_out_of_range(tmp_path, assets):
    hidden = {"objective": {"hidden": {"layer_map": [[0, 1], [5, 3]]}}}
    err = fails(tmp_path, "run", recipe(tmp_path, assets, stage_changes=hidden))
    assert "[5, 3]" in err or "(5, 3)" in err
    assert "layer_map" in err


def test_sequence_longer_than_model(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets), "data.seq_len=128")
    assert "max_position_embeddings=64" in err and "data.seq_len" in err


def test_empty_data(tmp_path, assets):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n   \n")
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"data.files=[{empty}/*.txt]")
    assert "no non-empty text" in err


def test_text_without_one_full_block(tmp_path, assets):
    short = tmp_path / "short"
    short.mkdir()
    for name in ("a", "b", "c"):
        (short / f"{name}.txt").write_text("x = 1")
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"data.files=[{short}/*.txt]")
    assert "not one full block" in err and "lower `data.seq_len`" in err


def test_missing_text_field(tmp_path, assets):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in TEXT))
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"data.files=[{path}]")
    assert "column 'text' is not in" in err and "data.text_field" in err


def test_missing_recipe_file(tmp_path):
    err = fails(tmp_path, "run", tmp_path / "nope.yaml")
    assert "does not exist" in err


def test_bad_override_syntax(tmp_path, assets):
    proc = run_cli("run", recipe(tmp_path, assets), "--no-such-flag", check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr


def _finished_run(tmp_path, assets):
    path = recipe(tmp_path, assets)
    run_cli("run", path, "stages.0.train.max_steps=2", "stages.0.train.save_every=1")
    stage = tmp_path / "out" / "distilled"
    (stage / "stage.json").unlink()  # pretend it was interrupted after its last checkpoint
    shutil.rmtree(stage / "model")
    return path, stage


def test_checkpoint_from_a_different_recipe(tmp_path, assets):
    path, stage = _finished_run(tmp_path, assets)
    err = fails(
        tmp_path,
        "run",
        path,
        "stages.0.train.max_steps=2",
        "stages.0.train.save_every=1",
        "stages.0.train.lr=0.5",
    )
    assert "different recipe or stage settings" in err and "--force-resume" in err
    forced = run_cli(
        "run",
        path,
        "stages.0.train.max_steps=2",
        "stages.0.train.save_every=1",
        "stages.0.train.lr=0.5",
        "--force-resume",
    )
    assert "resumed from" in forced.stderr


def test_checkpoint_from_a_different_world_size(tmp_path, assets):
    from distill.runtime.checkpoint import write_manifest

    path, stage = _finished_run(tmp_path, assets)
    newest = sorted((stage / "checkpoints").glob("step_*"))[-1]
    state = json.loads((newest / "trainer_state.json").read_text())
    state["world_size"] = 8
    (newest / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(newest)
    err = fails(tmp_path, "run", path, "stages.0.train.max_steps=2", "stages.0.train.save_every=1")
    assert "written by 8 processes" in err and "Relaunch with 8 processes" in err


def test_resume_from_missing_checkpoint(tmp_path, assets):
    err = fails(tmp_path, "run", recipe(tmp_path, assets), f"stages.0.train.resume={tmp_path}/ck")
    assert "train.resume" in err and "no such directory" in err


def test_missing_optional_extra(tmp_path, assets):
    fake = tmp_path / "no_wandb"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    proc = run_cli(
        "run",
        recipe(tmp_path, assets),
        "tracking.wandb.mode=offline",
        env={"PYTHONPATH": str(fake)},
    )
    assert "pip install 'distill[wandb]'" in proc.stderr
    assert (tmp_path / "out" / "distilled" / "metrics.jsonl").is_file()  # training went on
