"""A recipe file in, a validated `Recipe` out: YAML parsing, `key.path=value` overrides, training
defaults merged into each stage, and error messages that read like the YAML (the key path as written,
the value, what is allowed, the closest valid key)."""

from __future__ import annotations

import copy
import difflib
import glob
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from distill.config import TRAINING_KINDS, Recipe
from distill.errors import RecipeError, SettingError


def load_recipe(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    raw: dict | None = None,
) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides, merge train defaults, validate."""
    if raw is None:
        path = Path(path)  # type: ignore[arg-type]
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist; give the path to a .yaml")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe {str(path)!r} must be a mapping of keys to values")
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    try:
        # defaults are checked alone first: one error, not one per stage they are merged into
        Recipe._train_keys(raw.get("train") or {})
    except ValueError as err:
        raise RecipeError(f"invalid recipe (1 problem):\n  train: {err}") from None
    merged = _merge_train_defaults(raw)
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, merged)) from None
    check_paths(recipe)
    return recipe


def _merge_train_defaults(raw: dict) -> dict:
    defaults = raw.get("train") or {}
    if not isinstance(defaults, dict):
        return raw
    out = dict(raw)
    stages = []
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict) and stage.get("kind") in TRAINING_KINDS:
            stage = dict(stage)
            stage["train"] = {**defaults, **(stage.get("train") or {})}
        stages.append(stage)
    if "stages" in raw:
        out["stages"] = stages
    return out


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.0.c=value` in the raw recipe; the value is parsed as YAML (numbers, lists...)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.path=value (e.g. train.lr=3e-4)")
    key, value_text = item.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text else None
    except yaml.YAMLError:
        value = value_text
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node_index = _stage_index(node, part)
            if node_index is None:
                raise RecipeError(
                    f"override {key!r}: {where!r} needs a list index 0..{len(node) - 1}"
                    + (" or a stage name" if node and isinstance(node[0], dict) else "")
                )
            if last:
                node[node_index] = value
            else:
                node = node[node_index]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def _stage_index(items: list, part: str) -> int | None:
    if part.lstrip("-").isdigit():
        index = int(part)
        return index if -len(items) <= index < len(items) else None
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    return None


def format_validation_error(err: ValidationError, raw: dict) -> str:
    lines = [f"invalid recipe ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        loc = _clean_loc(e["loc"], raw)
        where = ".".join(str(p) for p in loc) or "(top level)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = sorted(_fields_at(Recipe, loc[:-1], raw))
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(
                f"  {where}: unknown key.{hint} Allowed keys here: {', '.join(allowed) or 'none'}."
            )
        elif e["type"] == "missing":
            lines.append(f"  {where}: required key is missing.")
        elif e["type"] == "union_tag_invalid" or e["type"] == "union_tag_not_found":
            replaced = (
                " (`convert` and its packed format were replaced by `kind: export` with "
                "`formats: [ct-w4a16]`: compressed-tensors, which vLLM and transformers load)"
                if (value.get("kind") if isinstance(value, dict) else value) == "convert"
                else ""
            )
            lines.append(
                f"  {where}: stage `kind` must be one of train, distill, prune, ptq, qat, export;"
                f" got {_short(value)}{replaced}."
            )
        elif not loc:
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if isinstance(value, dict) else f" (got {_short(value)})"
            lines.append(f"  {where}: {msg}{got}.")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _clean_loc(loc: tuple, raw: dict) -> list:
    """Drop pydantic's union-tag and type-name parts so the path reads like the YAML."""
    out: list = []
    node: Any = raw
    expect_tag = False
    for part in loc:
        if expect_tag and isinstance(node, dict) and part == node.get("kind"):
            expect_tag = False
            continue
        expect_tag = False
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
            expect_tag = isinstance(node, dict) and "kind" in node
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        else:
            out.append(part)
            node = None
    return out


def _fields_at(model: Any, loc: list, raw: Any) -> list[str]:
    """The keys allowed at `loc` in the recipe, found by walking the model classes."""
    target: Any = model
    node = raw
    for part in loc:
        target = _unwrap(target, node)
        if isinstance(target, type) and issubclass(target, BaseModel):
            field = target.model_fields.get(str(part))
            target = field.annotation if field else None
        else:
            origin = typing.get_origin(target)
            args = typing.get_args(target)
            target = args[-1] if origin in (list, dict) and args else None
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
    target = _unwrap(target, node)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return list(target.model_fields)
    return []


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(part, int) and part < len(node)


def _unwrap(target: Any, node: Any) -> Any:
    """Reduce Optional/Union/Annotated to the member that matches the raw node."""
    while True:
        origin = typing.get_origin(target)
        if origin is Annotated:
            target = typing.get_args(target)[0]
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(target) if a is not type(None)]
            kind = node.get("kind") if isinstance(node, dict) else None
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            for m in models:
                tag = m.model_fields.get("kind")
                if (
                    kind is not None
                    and tag is not None
                    and typing.get_args(tag.annotation) == (kind,)
                ):
                    return m
            target = models[0] if models else members[0]
            continue
        return target


LOCAL_PREFIXES = ("/", "./", "../", "~")


def looks_local(path: str) -> bool:
    """A path that can only mean a local directory (a hub id is `name` or `org/name`)."""
    return path.startswith(LOCAL_PREFIXES) or path.count("/") > 1 or os.path.exists(path)


def check_paths(recipe: Recipe) -> None:
    """Missing local files fail now, not after a teacher has trained for an hour."""
    problems = []
    for name, spec in recipe.models.items():
        if (
            spec.path
            and looks_local(spec.path)
            and not os.path.isdir(os.path.expanduser(spec.path))
        ):
            problems.append(
                f"  models.{name}.path: directory {spec.path!r} does not exist; give a model "
                "directory saved with save_pretrained, or a hub id like `org/name`."
            )
    tok = recipe.tokenizer
    if (
        tok.source == "path"
        and tok.path
        and looks_local(tok.path)
        and not os.path.isdir(os.path.expanduser(tok.path))
    ):
        problems.append(f"  tokenizer.path: directory {tok.path!r} does not exist.")
    for i, pattern in enumerate(recipe.data.files or []):
        expanded = os.path.expanduser(pattern)
        if not glob.glob(expanded, recursive=True):
            problems.append(
                f"  data.files.{i}: {pattern!r} matches no file; check the path or glob "
                "(relative paths are relative to the current directory)."
            )
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(problems))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def build_spec(cls: type[BaseModel], fields: dict, name_of: Callable[[str], str]):
    """`cls(**fields)`, with a validation error turned into one RecipeError that names each bad
    setting by `name_of(field)` (a command-line flag, say), not by its recipe key."""
    try:
        return cls(**fields)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, SettingError):
                problems.append(cause.render(name_of))
            else:
                where = ", ".join(name_of(str(part)) for part in error["loc"][:1])
                problems.append(f"{where}: {error['msg']} (got {_short(error.get('input'))})")
        raise RecipeError("; ".join(problems)) from None
