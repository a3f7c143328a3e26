"""Loading files so that none can run code, whoever wrote them.

torch's checkpoint files are pickles, and unpickling can call any function. Output folders sit on
shared file systems, `train.resume` takes any folder and a MANIFEST.json is a checksum anyone can
recompute, so no file is trusted for where it lies: every torch.load that distill makes or calls
(accelerate's states, DeepSpeed's model and ZeRO states, transformers' `.bin` weights, eval sets)
is weights-only (tensors, containers, numbers and the few classes of `allowed_globals`), numpy
files are read without pickles, and a file that needs more is refused with an UnsafeFileError that
names it.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill.errors import UnsafeFileError

# torch reads these at every torch.load: FORCE makes the load weights-only even where the caller
# asks for full unpickling, and torch refuses to load at all while both are set.
FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNFORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch's zip format; its legacy pickle format


def allowed_globals() -> list:
    """What the files distill writes hold beyond torch's tensor types. Each entry is plain data:
    rebuilding it sets fields and calls nothing else."""
    import numpy as np

    # accelerate's random_states_*.pkl: numpy's RNG state is a tuple around a uint32 array
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    if "deepspeed" in sys.modules:  # only a DeepSpeed engine reads DeepSpeed's states
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        # a ZeRO optimizer state (stages 1-3, fp32 or bf16) records its static loss scale, its
        # stage as an enum, and each parameter's (numel, start) inside the flat partition
        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    return allowed


@contextmanager
def _allowing() -> Iterator[None]:
    """`allowed_globals` added to torch's safe list, and the list as it was restored afterwards:
    nests, unlike torch.serialization.safe_globals, whose exit removes entries an outer one needs."""
    import torch

    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(allowed_globals())
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


@contextmanager
def weights_only(where: Path, fix: str) -> Iterator[None]:
    """Inside, every torch.load in this process is weights-only with `allowed_globals`, also where
    a library asks for full unpickling (DeepSpeed's checkpoint engine, its ZeRO-3 and universal
    checkpoint readers and accelerate's custom states all pass `weights_only=False`). torch's own
    switch does it, rather than a DeepSpeed checkpoint engine of ours: it covers every reader of
    every library whichever engine a DeepSpeed config picks, without depending on their internals.

    A refused file becomes an UnsafeFileError naming it (searched under `where` when the library's
    error does not say which file it was) and ending with `fix`, what the user can do."""
    saved = {key: os.environ.pop(key, None) for key in (FORCE, UNFORCE)}
    os.environ[FORCE] = "1"
    try:
        with _allowing():
            yield
    except pickle.UnpicklingError as err:
        found = find_refused(where)
        raise refusal(*(found or (where, err)), fix) from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_tensors(path: Path, fix: str, **kwargs):
    """torch.load of one file, weights-only; a file that needs more is an UnsafeFileError."""
    import torch

    with weights_only(path, fix):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def find_refused(where: Path) -> tuple[Path, pickle.UnpicklingError] | None:
    """The first torch file at or under `where` that a weights-only load refuses, and why. Zip
    files are memory-mapped, so only their pickled structure is read, not their tensors."""
    import torch

    paths = sorted(p for p in where.rglob("*") if p.is_file()) if where.is_dir() else [where]
    for path in paths:
        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError:
            continue
        if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
            continue  # JSON, scripts, safetensors: nothing torch.load would read
        try:
            with _allowing():
                torch.load(path, map_location="cpu", weights_only=True, mmap=head == ZIP_MAGIC)
        except pickle.UnpicklingError as err:
            return path, err
        except Exception:  # noqa: BLE001, S112 - damaged in another way: not what is searched for
            continue
    return None


def refusal(path: Path, err: Exception, fix: str, what: str = "") -> UnsafeFileError:
    asked = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    what = what or (f"it asks for `{asked.group(1)}`" if asked else "or it is damaged")
    return UnsafeFileError(
        f"{path} holds more than tensors and numbers ({what}); unpickling it could run any code, "
        f"so distill refuses to load it. {fix}"
    )


def load_array(path: Path, fix: str):
    """np.load of a plain array: an object array (a pickle) is refused, not unpickled."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):  # numpy's own refusal of an object array
            raise refusal(path, err, fix, "an array of Python objects") from None
        raise
