"""Stage records and the inputs they depend on: a moved or copied run reads its own files, a
finished stage's damaged output or a damaged token store is refused before anything is read from
it, and replacing the files a recipe points at reruns what depends on them (issue: trust nothing
on disk, classes 3, 4 and 7)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from distill.cli import main

from conftest import tiny_recipe

TEACHER = {"name": "teacher", "kind": "train", "model": "teacher", "train": {"max_steps": 3}}
PTQ4 = {"name": "q4", "kind": "ptq", "model": "teacher", "quant": {"bits": 4, "group_size": 32}}
PTQ8 = {"name": "q8", "kind": "ptq", "model": "teacher", "quant": {"bits": 8, "group_size": 32}}


def _recipe(path, stages, out, **top):
    tiny_recipe(path, stages, **top)
    data = yaml.safe_load(path.read_text())
    data["output_dir"] = str(out)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _run(recipe, *extra) -> int:
    return main(["run", recipe, *extra])


def _entry(out, name) -> dict:
    return json.loads((out / name / "stage.json").read_text())["entry"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of two stages (a trained teacher and a PTQ copy of it)."""
    base = tmp_path_factory.mktemp("finished")
    out = base / "run"
    assert _run(_recipe(base / "r.yaml", [TEACHER, PTQ4], out)) == 0
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "moved"
    shutil.copytree(finished, out)
    return out


def test_records_name_outputs_relative_to_the_run_and_list_their_files(finished):
    record = json.loads((finished / "teacher" / "stage.json").read_text())
    assert record["entry"]["model_dir"] == "teacher/model"
    assert record["files"]["model.safetensors"]["size"] > 0
    summary = json.loads((finished / "summary.json").read_text())
    assert [s["model_dir"] for s in summary["stages"]] == ["teacher/model", "q4/model"]


def test_a_moved_run_reads_its_own_models_not_the_old_place(finished, tmp_path):
    """Moved, with another model at the old place: the new stage must read the moved teacher."""
    old, out = tmp_path / "old", tmp_path / "moved"
    assert _run(_recipe(tmp_path / "r.yaml", [TEACHER], old)) == 0
    old.rename(out)
    _halved_copy(finished / "teacher" / "model", old / "teacher" / "model")  # another model
    assert _run(_recipe(tmp_path / "r.yaml", [TEACHER, PTQ8], out)) == 0
    # PTQ's "perplexity before" is the perplexity of the model it loaded: the moved teacher's
    assert _entry(out, "q8")["perplexity_before"] == _entry(out, "teacher")["eval"]["perplexity"]


def _halved_copy(model, to):
    """A copy of a model dir with other weights (every tensor halved)."""
    shutil.copytree(model, to)
    weights = load_file(to / "model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, to / "model.safetensors")


def test_an_old_absolute_record_outside_the_run_is_refused(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    path = out / "teacher" / "stage.json"
    record = json.loads(path.read_text())
    record["entry"]["model_dir"] = str(finished / "teacher" / "model")  # written by an older run
    path.write_text(json.dumps(record))
    assert _run(_recipe(tmp_path / "r.yaml", [TEACHER, PTQ4], out)) == 2
    err = capsys.readouterr().err
    assert "outside this run folder" in err and "Traceback" not in err


def test_damaged_weights_of_a_finished_stage_are_refused_before_use(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    weights = out / "teacher" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # one flipped bit inside a tensor: same size, loads without error
    weights.write_bytes(bytes(data))
    assert _run(_recipe(tmp_path / "r.yaml", [TEACHER, PTQ4, PTQ8], out)) == 2
    err = capsys.readouterr().err
    assert "model.safetensors fails its sha256" in err and "'teacher'" in err
    assert not (out / "q8" / "stage.json").exists()


def test_a_truncated_output_is_refused_when_the_run_is_resumed(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    weights = out / "q4" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert _run(_recipe(tmp_path / "r.yaml", [TEACHER, PTQ4], out)) == 2
    assert "'q4' is damaged" in capsys.readouterr().err


def test_a_damaged_token_store_is_refused_before_training(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    shard = next((out / "data").glob("train*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert _run(_recipe(tmp_path / "r.yaml", [TEACHER, PTQ4, PTQ8], out)) == 2
    err = capsys.readouterr().err
    assert "token store" in err and shard.name in err and "Nothing was trained" in err
    assert not (out / "q8").exists()


def test_weights_replaced_under_a_path_model_rerun_the_stage(finished, tmp_path, capsys):
    """A `models` entry with `path:`: new weights under the same path are a new input."""
    model = tmp_path / "external"
    shutil.copytree(finished / "teacher" / "model", model)
    out = tmp_path / "run"
    stage = {"name": "q", "kind": "ptq", "model": "ext", "quant": {"bits": 4, "group_size": 32}}
    recipe = _recipe(tmp_path / "r.yaml", [stage], out)
    data = yaml.safe_load(Path(recipe).read_text())
    data["models"]["ext"] = {"path": str(model)}
    Path(recipe).write_text(yaml.safe_dump(data))
    assert _run(recipe) == 0
    before = _entry(out, "q")["perplexity_before"]
    shutil.rmtree(model)
    _halved_copy(finished / "teacher" / "model", model)
    capsys.readouterr()
    assert _run(recipe) == 0
    assert "already finished" not in capsys.readouterr().err
    assert _entry(out, "q")["perplexity_before"] != before


def test_an_edited_eval_set_file_changes_the_fingerprint(tmp_path):
    from distill.manifest import path_identity
    from distill.run.eval_sets import set_identity

    text = tmp_path / "set.txt"
    text.write_text("one text\n")
    before = set_identity([str(text)])
    text.write_text("another text\n")
    assert set_identity([str(text)]) != before
    assert path_identity(tmp_path) != before  # a folder's identity lists its files
