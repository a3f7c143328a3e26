"""Loading a stage's output the way it will be served, for evaluation: one small table from a
directory's marker file to its loader. A new export format adds a row."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.compress.fake_quant import prepare_qat, set_fake_quant_enabled
from distill.errors import RecipeError
from distill.models import load_pretrained
from distill.specs import QuantSpec


@dataclass
class Artifact:
    model: object
    """The model, ready to run (fake quantization on for a `ptq`/`qat` stage's weights)."""
    format: str
    scheme: str | None = None
    file: Path | None = None
    """The file a runtime other than torch serves (a GGUF file for llama.cpp)."""


def _gguf(path: Path) -> Artifact:
    """A GGUF file (or the directory an export stage wrote it in), through transformers' own GGUF
    loader, dequantized to float: what the export stage verifies."""
    file = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
    model = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    )
    return Artifact(model.eval(), "gguf", file.stem, file)


def _fake_quant(path: Path) -> Artifact:
    # a `ptq`/`qat` stage's float weights: served after export, so measured as rounded
    scheme = QuantSpec.model_validate_json((path / "distill_quant.json").read_text())
    model = load_pretrained(str(path), what="model to evaluate")
    prepare_qat(model, scheme)
    set_fake_quant_enabled(model, True)
    return Artifact(model, "fake-quant", scheme.name())


def _compressed_tensors(path: Path) -> Artifact:
    try:
        import compressed_tensors  # noqa: F401 - transformers needs it to read the directory
    except ImportError:
        raise RecipeError(
            f"{path} is a compressed-tensors checkpoint; pip install compressed-tensors to "
            "evaluate it"
        ) from None
    # the format says how it is stored; its grid is recorded by the export stage that wrote it
    return Artifact(
        load_pretrained(str(path), what="compressed-tensors model"), "compressed-tensors"
    )


def _is_compressed_tensors(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def _transformers(path: Path) -> Artifact:
    return Artifact(load_pretrained(str(path), what="model to evaluate"), "transformers")


FORMATS: list[tuple[str, Callable[[Path], bool], Callable[[Path], Artifact]]] = [
    ("gguf", lambda p: any(p.glob("*.gguf")), _gguf),
    ("fake-quant", lambda p: (p / "distill_quant.json").is_file(), _fake_quant),
    ("compressed-tensors", _is_compressed_tensors, _compressed_tensors),
    ("transformers", lambda p: (p / "config.json").is_file(), _transformers),
]
"""(format, is this directory of the format, load it): the first match loads."""


def load_artifact(path: str | Path) -> Artifact:
    """The model in `path`, loaded by the first row of FORMATS that recognises the directory."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # an export stage's model is the file itself
        return _gguf(path)
    for _, matches, load in FORMATS:
        if path.is_dir() and matches(path):
            return load(path)
    raise RecipeError(
        f"{path}: not a model directory distill can evaluate (formats: "
        f"{', '.join(name for name, _, _ in FORMATS)}); give a stage's model/ directory"
    )
