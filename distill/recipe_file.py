"""A recipe file in, a validated `Recipe` out: YAML parsing, `key.path=value` overrides, training
defaults merged into each stage, and error messages that read like the YAML (the key path as written,
the value, what is allowed, the closest valid key)."""

from __future__ import annotations

import copy
import difflib
import glob
import os
import sysconfig
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from distill.config import TRAINING_KINDS, Recipe, Stage, TrainSpec
from distill.errors import RecipeError, SettingError
from distill.model_specs import build_config

ALIAS_BUDGET = 10_000
"""Values YAML aliases may repeat in one recipe (or override): far above any real use of anchors,
far below an alias bomb (nine nested aliases of nine repeat 9**9 values)."""

MAX_DEPTH = 100
"""Nesting a recipe may have; PyYAML composes recursively, so a deeper one would overflow."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts, while composing, the values each alias repeats, and refuses
    recursive aliases and deep nesting, so a hostile file fails in milliseconds."""

    def __init__(self, stream):
        super().__init__(stream)
        self._repeated = 0
        self._sizes: dict[int, int] = {}
        self._open: list[str | None] = []

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _RecipeYamlError(f"alias *{event.anchor} refers to a value that holds it")
            if event.anchor in self.anchors:
                self._repeated += self._size(self.anchors[event.anchor])
                if self._repeated > ALIAS_BUDGET:
                    raise _RecipeYamlError(
                        f"its aliases repeat more than {ALIAS_BUDGET:,} values (an alias bomb?); "
                        "write the values out, or use fewer aliases"
                    )
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_DEPTH:
            raise _RecipeYamlError(f"it is nested more than {MAX_DEPTH} levels deep")
        self._open.append(getattr(event, "anchor", None))
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()

    def _size(self, node) -> int:
        """Values in `node` with every alias in it expanded (each node measured once)."""
        if id(node) not in self._sizes:
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            else:
                children = node.value if isinstance(node, yaml.SequenceNode) else []
            self._sizes[id(node)] = 1 + sum(self._size(child) for child in children)
        return self._sizes[id(node)]


class _RecipeYamlError(Exception):
    """Raised inside the loader; the caller names the file or override."""


def _load_bounded(text: str):
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, what: str):
    """YAML text (a recipe file's or an override's value) through the bounded safe loader."""
    try:
        return _load_bounded(text)
    except _RecipeYamlError as err:
        raise RecipeError(f"{what}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise RecipeError(
            f"{what} is not valid YAML{at}: {problem}" + (f" ({context})" if context else "")
        ) from None


def load_recipe(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    raw: dict | None = None,
) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides, merge train defaults, validate."""
    if raw is None:
        raw = read_recipe_file(Path(path))  # type: ignore[arg-type]
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    if isinstance(raw.get("train"), dict):
        # defaults are checked alone first: one error, not one per stage they are merged into
        try:
            Recipe._train_keys(raw["train"])
        except ValueError as err:
            raise RecipeError(f"invalid recipe (1 problem):\n  train: {err}") from None
        try:
            TrainSpec.model_validate(raw["train"])
        except ValidationError as err:
            raise RecipeError(format_validation_error(err, raw, ("train",))) from None
    merged = _merge_train_defaults(raw)
    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, merged)) from None
    check_paths(recipe)
    check_model_configs(recipe)
    return recipe


def read_recipe_file(path: Path) -> dict:
    """The mapping a recipe file holds, or a RecipeError saying why it is not one."""
    if path.is_dir():
        raise RecipeError(f"recipe {str(path)!r} is a directory; give the path to a .yaml file")
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; give the path to a .yaml")
    raw_bytes = path.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"recipe {str(path)!r} is not UTF-8 text (byte {raw_bytes[err.start]:#04x} at offset "
            f"{err.start}); give a YAML recipe (see recipes/)"
        ) from None
    raw = parse_yaml(text, f"recipe {str(path)!r}")
    if not isinstance(raw, dict):
        got = "is empty" if raw is None else f"holds a {type(raw).__name__}"
        raise RecipeError(
            f"recipe {str(path)!r} {got}; a recipe is a mapping of keys to values (see recipes/)"
        )
    return raw


def _merge_train_defaults(raw: dict) -> dict:
    defaults = raw.get("train") or {}
    if not isinstance(defaults, dict) or not isinstance(raw.get("stages") or [], list):
        return raw  # validation names the section that is not a mapping or list
    out = dict(raw)
    stages = []
    for stage in raw.get("stages") or []:
        if (
            isinstance(stage, dict)
            and stage.get("kind") in TRAINING_KINDS
            and isinstance(stage.get("train") or {}, dict)
        ):
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
    parts = key.strip().split(".")
    if not all(part.strip() for part in parts):
        raise RecipeError(
            f"override {item!r}: the key {key!r} has an empty part; write key.path=value "
            "(e.g. train.lr=3e-4)"
        )
    try:
        value = _load_bounded(value_text) if value_text else None
    except _RecipeYamlError as err:
        raise RecipeError(f"override {item!r}: {err}") from None
    except yaml.YAMLError:
        value = value_text  # not YAML: the text itself (a path with a colon, say)
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


def format_validation_error(err: ValidationError, raw: dict, prefix: tuple = ()) -> str:
    """One line per problem, each naming its key path as written (under `prefix` when `err`
    comes from validating the section at that path)."""
    lines = [f"invalid recipe ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        loc = _clean_loc(prefix + tuple(e["loc"]), raw)
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
                f"  {where}: stage `kind` must be one of {', '.join(STAGE_KINDS)};"
                f" got {_short(value)}{replaced}."
            )
        elif not loc:
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if isinstance(value, dict) else f" (got {_short(value)})"
            lines.append(f"  {where}: {msg}{got}.")
    return "\n".join(lines)


STAGE_KINDS = [
    typing.get_args(model.model_fields["kind"].annotation)[0]
    for model in typing.get_args(typing.get_args(Stage)[0])
]


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
    patterns = [(f"data.files.{i}", p) for i, p in enumerate(recipe.data.files or [])]
    patterns += _eval_set_patterns(recipe)
    for where, pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if not glob.glob(expanded, recursive=True):
            problems.append(
                f"  {where}: {pattern!r} matches no file; check the path or glob "
                "(relative paths are relative to the current directory)."
            )
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(problems))


def _eval_set_patterns(recipe: Recipe) -> list[tuple[str, str]]:
    """The file globs of every eval set (the recipe's and each stage's): a missing one would
    fail only when the first stage is measured, after it trained."""
    stdlib = sysconfig.get_paths()["stdlib"]
    evals = [("eval", recipe.eval)] + [
        (f"stages.{i}.eval", s.eval) for i, s in enumerate(recipe.stages)
    ]
    return [
        (f"{where}.sets.{name}.{i}", pattern.replace("${stdlib}", stdlib))
        for where, spec in evals
        if spec is not None
        for name, source in spec.sets.items()
        if isinstance(source, list)
        for i, pattern in enumerate(source)
    ]


def check_model_configs(recipe: Recipe) -> None:
    """Each `config:` model's transformers config, built and checked now (no weights): a head count
    that does not divide the width fails here, not after a teacher has trained for an hour."""
    for name, spec in recipe.models.items():
        if spec.config is None:
            continue
        config = build_config(spec, name)
        vocab = config.vocab_size if "vocab_size" in spec.config else None
        tok = recipe.tokenizer
        if vocab is not None and tok.source == "train" and vocab < tok.train.vocab_size:
            raise RecipeError(
                f"models.{name}.config.vocab_size={vocab} is below tokenizer.train.vocab_size="
                f"{tok.train.vocab_size}: the model's head would not cover the tokenizer; leave "
                "vocab_size out (it then matches the tokenizer)"
            )
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and recipe.data.seq_len > limit:
            raise RecipeError(
                f"data.seq_len={recipe.data.seq_len} is longer than models.{name}.config."
                f"max_position_embeddings={limit}; lower `data.seq_len` to at most {limit}, or "
                "raise max_position_embeddings"
            )


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
