"""Recipe validation: every error names the key, the value, what is allowed and the fix."""

from pathlib import Path

import pytest
import yaml

from distill.errors import RecipeError
from distill.recipe_file import apply_override, load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def all_recipes():
    # recursive on purpose: a recipe in a sub-folder must not escape the check
    return sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", all_recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages


def test_there_are_recipes():
    names = {p.name for p in all_recipes()}
    assert {"quickstart.yaml", "bench-cpu.yaml", "bench-reference.yaml"} <= names


def error_of(overrides, path=QUICKSTART) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_unknown_key_suggests_closest():
    msg = error_of(["stages.distilled.train.lrr=1e-3"])
    assert "stages.2.train.lrr" in msg and "unknown key" in msg
    assert "Did you mean 'lr'" in msg


def test_unknown_top_level_key():
    msg = error_of(["dataa.seq_len=3"])
    assert "dataa" in msg and "Did you mean 'data'" in msg


def test_unknown_key_in_train_defaults_reported_once():
    msg = error_of(["train.max_stps=3"])
    assert "max_stps" in msg and "max_steps" in msg
    assert msg.count("max_stps") == 1


def test_wrong_type_names_key_and_value():
    msg = error_of(["data.seq_len=abc"])
    assert "data.seq_len" in msg and "'abc'" in msg and "integer" in msg


def test_out_of_range_value():
    msg = error_of(["stages.distilled.objective.terms.0.temperature=-1"])
    assert "temperature" in msg and "greater than 0" in msg and "-1" in msg


def test_unknown_loss_kind_lists_allowed():
    msg = error_of(["stages.distilled.objective.terms.0.kind=kl"])
    assert "'kl'" in msg and "forward_kl" in msg and "reverse_kl" in msg


def test_unknown_stage_kind():
    msg = error_of(["stages.0.kind=finetune"])
    assert "kind" in msg and "distill" in msg and "prune" in msg and "finetune" in msg


def test_stage_that_names_missing_stage():
    msg = error_of(["stages.distilled.teacher=teachr"])
    assert "'teachr'" in msg and "did you mean 'teacher'" in msg


def test_stage_cannot_name_a_later_stage():
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["stages"][0]["model"] = "distilled"
    with pytest.raises(RecipeError, match="neither an earlier stage"):
        load_recipe(None, raw=raw)


def test_duplicate_stage_names():
    msg = error_of(["stages.1.name=teacher"])
    assert "used twice" in msg


def test_missing_model_directory():
    msg = error_of(["models.teacher.path=./no/such/model", "models.teacher.config=null"])
    assert "models.teacher.path" in msg and "does not exist" in msg


def test_missing_data_files():
    msg = error_of(["data.stdlib=false", "data.files=[/nonexistent/corpus/*.txt]"])
    assert "data.files.0" in msg and "matches no file" in msg


def test_two_data_sources():
    msg = error_of(["data.files=[README.md]"])
    assert "exactly one data source" in msg


def test_model_needs_one_source():
    msg = error_of(["models.student.path=org/name"])
    assert "exactly one of `path`" in msg


def test_nm_needs_n_below_m():
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["stages"].append(
        {
            "name": "p",
            "kind": "prune",
            "model": "distilled",
            "prune": {"method": "nm", "n": 4, "m": 4},
        }
    )
    with pytest.raises(RecipeError, match="n < m"):
        load_recipe(None, raw=raw)


def test_missing_required_key():
    raw = yaml.safe_load(QUICKSTART.read_text())
    del raw["stages"][2]["teacher"]
    with pytest.raises(RecipeError, match=r"stages\.2\.teacher: required key is missing"):
        load_recipe(None, raw=raw)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no-such-recipe.yaml")


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_overrides_apply_and_validate():
    recipe = load_recipe(
        QUICKSTART, ["stages.distilled.train.lr=1e-4", "data.seq_len=64", "name=other"]
    )
    assert recipe.stage("distilled").train.lr == 1e-4
    assert recipe.data.seq_len == 64
    assert str(recipe.resolved_output_dir) == "runs/quickstart"


def test_train_defaults_merge_under_stage_values():
    recipe = load_recipe(QUICKSTART, ["train.lr=0.5"])
    assert recipe.stage("baseline").train.lr == 0.5
    assert recipe.stage("teacher").train.lr == 2e-3  # the stage's own value wins


def test_override_syntax_error():
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_override({}, "train.lr")
    with pytest.raises(RecipeError, match="list index"):
        apply_override({"stages": [{"name": "a"}]}, "stages.zzz.train.lr=1")


def test_teacher_shorthand_and_placement():
    recipe = load_recipe(
        QUICKSTART, ["stages.distilled.teacher={model: teacher, placement: zero3}"]
    )
    teacher = recipe.stage("distilled").teacher
    assert teacher.model == "teacher" and teacher.placement == "zero3"
