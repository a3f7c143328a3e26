"""Documents, one at a time and in a stable order, from the recipe's data source: the standard
library's sources, text files (plain, `.gz`, `.zst`), JSON/JSONL, Parquet, CSV, `save_to_disk`
folders and hub datasets (optionally streamed). Bad input stops with the file (and line) and the
fix, or is skipped and counted with `data.on_error: skip`. Also the stable held-out split."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from distill.config import DataSpec
from distill.errors import RecipeError

Document = tuple[str, str]  # (stable id used for the held-out split, text)

FORMAT_BY_SUFFIX = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSED_SUFFIXES = (".gz", ".zst")
RECORD_BATCH = 1024


class BadInput:
    """What a bad document does: raise a RecipeError naming it and the fix, or count a skip."""

    def __init__(self, on_error: str = "raise"):
        self.skip = on_error == "skip"
        self.skipped = 0
        self.first: str | None = None

    def __call__(self, where: str, problem: str, fix: str) -> None:
        if not self.skip:
            raise RecipeError(
                f"data: {where}: {problem}; {fix} (or set `data.on_error: skip` to skip bad "
                "documents and count them)"
            )
        self.skipped += 1
        self.first = self.first or f"{where}: {problem}"


def iter_documents(spec: DataSpec, bad: BadInput) -> Iterator[Document]:
    """Every non-empty document of the data source, read lazily, in a stable order."""
    if spec.stdlib:
        source = _stdlib_documents(spec.stdlib_exclude)
    elif spec.files:
        source = _file_documents(spec, bad)
    else:
        source = _hub_documents(spec, bad)
    found = 0
    # `max_documents` counts documents as read, empty ones included (what it always meant).
    for doc_id, text in itertools.islice(source, spec.max_documents):
        if text.strip():
            found += 1
            yield doc_id, text
    if not found:
        skipped = (
            f" ({bad.skipped} bad documents skipped; first: {bad.first})" if bad.skipped else ""
        )
        raise RecipeError(
            f"data: the data source holds no non-empty text{skipped}; check `data.files` / "
            f"`data.hub` and `data.text_field` (currently {spec.text_field!r})"
        )


def load_documents(spec: DataSpec) -> list[Document]:
    """All documents in memory: for small inputs such as calibration text."""
    return list(iter_documents(spec, BadInput(spec.on_error)))


def is_heldout(doc_id: str, eval_fraction: float) -> bool:
    """A stable split: the same document is held out on every machine and in every run."""
    digest = int(hashlib.md5(doc_id.encode("utf-8")).hexdigest(), 16)
    # md5 % 1000 sets the first three digits (so a fraction of 0.035 holds out exactly the files
    # with md5 % 1000 < 35, the split the quickstart was measured on); the next three refine it.
    position = (digest % 1000 + (digest // 1000) % 1000 / 1000) / 1000
    return position < eval_fraction


# ----------------------------------------------------------------------------------------------
# Which files


def stdlib_paths(exclude: list[str]) -> list[Path]:
    """The standard library's .py sources, tests and the excluded top-level folders left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in exclude or "test" in rel.parts or "tests" in rel.parts:
            continue
        paths.append(path)
    return paths


def input_paths(spec: DataSpec) -> list[str]:
    """The files `data.files` names: each glob's matches sorted, in the order given."""
    paths: list[str] = []
    for pattern in spec.files or []:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise RecipeError(f"data.files: {pattern!r} matches no file; check the path or glob")
        paths.extend(matches)
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return paths
    return [p for p in paths if os.path.isfile(p)]


def file_format(spec: DataSpec, paths: list[str]) -> str:
    """`data.format`, or the one format the files' suffixes (compression aside) say."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return "disk"
    if spec.format != "auto":
        return spec.format
    kinds = {FORMAT_BY_SUFFIX.get(_inner_suffix(p), "text") for p in paths}
    if len(kinds) > 1:
        raise RecipeError(
            f"data.files mixes formats {sorted(kinds)}; list files of one format, or set "
            "`data.format`"
        )
    return kinds.pop()


def _inner_suffix(path: str) -> str:
    p = Path(path)
    if p.suffix.lower() in COMPRESSED_SUFFIXES:
        p = p.with_suffix("")
    return p.suffix.lower()


# ----------------------------------------------------------------------------------------------
# Readers


def _stdlib_documents(exclude: list[str]) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_paths(exclude):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        yield path.relative_to(root).as_posix(), text


def _file_documents(spec: DataSpec, bad: BadInput) -> Iterator[Document]:
    paths = input_paths(spec)
    fmt = file_format(spec, paths)
    if fmt == "disk":
        yield from _disk_documents(paths[0], spec, bad)
    elif spec.streaming and fmt != "text":
        yield from _streamed_files(fmt, paths, spec, bad)
    else:
        reader = {"text": _text_file, "json": _json_file, "parquet": _parquet_file}.get(
            fmt, _csv_file
        )
        for path in paths:
            yield from reader(path, spec.text_field, bad)


def _open(path: str) -> BinaryIO:
    """The file's bytes, decompressed for `.gz` and `.zst`."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if suffix == ".zst":
        # buffered: line iteration for JSONL
        return io.BufferedReader(_ZstdReader(path))  # type: ignore[return-value]
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A `.zst` file's bytes, frame after frame; EOFError when the file ends inside a frame, which
    zstandard's own reader passes off as the end of the data (a truncated file read silently
    short)."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard.ZstdDecompressor()
        self._file = open(path, "rb")  # noqa: SIM115 - closed with this reader
        self._frame = self._zstd.decompressobj()
        self._out = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            if self._frame.eof:  # a frame ended: the next one starts in what it left over
                rest = self._frame.unused_data or self._file.read(1 << 20)
                if not rest:
                    return 0
                self._frame = self._zstd.decompressobj()
                self._out = self._frame.decompress(rest)
                continue
            chunk = self._file.read(1 << 20)
            if not chunk:
                raise EOFError("the file ends inside a zstd frame (truncated)")
            self._out = self._frame.decompress(chunk)
        n = min(len(buffer), len(self._out))
        buffer[:n], self._out = self._out[:n], self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _read_bytes(path: str, bad: BadInput) -> bytes | None:
    try:
        with _open(path) as f:
            return f.read()
    except Exception as err:  # noqa: BLE001 - OSError, gzip and zstd errors: the same fix
        bad(path, f"cannot be read ({err})", "check that it exists, is readable and not truncated")
        return None


def _decode(raw: bytes, where: str, bad: BadInput) -> str | None:
    """Strict UTF-8 with universal newlines (what `Path.read_text` gives for valid UTF-8)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        bad(where, "is UTF-16 text", "convert it to UTF-8 (e.g. `iconv -f utf-16 -t utf-8`)")
        return None
    if b"\x00" in raw:
        bad(where, "is a binary file (it holds NUL bytes), not text", "remove it from the inputs")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        bad(
            where,
            f"is not valid UTF-8 (byte {raw[err.start]:#04x} on line {line})",
            "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
        )
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_file(path: str, text_field: str, bad: BadInput) -> Iterator[Document]:
    raw = _read_bytes(path, bad)
    text = None if raw is None else _decode(raw, path, bad)
    if text is not None:
        yield path, text


def _json_file(path: str, text_field: str, bad: BadInput) -> Iterator[Document]:
    """JSON Lines, streamed line by line; a `.json` file may instead hold one array of records."""
    if _inner_suffix(path) == ".json":
        raw = _read_bytes(path, bad)
        if raw is None:
            return
        if raw.lstrip().startswith(b"["):
            try:
                records = json.loads(raw)
            except (ValueError, RecursionError) as err:
                bad(path, f"is not valid JSON ({err})", "fix it, or write one record per line")
                return
            for i, record in enumerate(records):
                yield from _record_text(record, f"{path} record {i}", text_field, bad, path)
            return
        yield from _json_lines(path, iter(raw.splitlines()), text_field, bad)
        return
    try:
        stream = _open(path)
    except OSError as err:
        bad(path, f"cannot be read ({err})", "check that it exists and is readable")
        return
    with stream:
        yield from _json_lines(path, stream, text_field, bad)


def _json_lines(
    path: str, lines: Iterator[bytes], text_field: str, bad: BadInput
) -> Iterator[Document]:
    try:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad(where, "is not valid UTF-8", "convert the file to UTF-8")
                continue
            except RecursionError:
                bad(where, "is nested too deeply to parse", "fix or remove that line")
                continue
            except ValueError as err:
                bad(where, f"is not JSON ({err})", "fix or remove that line")
                continue
            yield from _record_text(record, where, text_field, bad, path)
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - a truncated .gz or .zst fails mid-read (OSError, EOFError, ZstdError)
        bad(path, f"cannot be read to the end ({err})", "check that it is not truncated")


def _record_text(
    record: object, where: str, text_field: str, bad: BadInput, source: str
) -> Iterator[Document]:
    if not isinstance(record, dict):
        bad(where, f"is a JSON {type(record).__name__}, not an object", "write one object a line")
        return
    if text_field not in record:
        bad(
            where,
            f"column {text_field!r} is not in {source!r} (keys of this record: {sorted(record)})",
            "set `data.text_field` to the key holding the text",
        )
        return
    text = record[text_field]
    if _text_ok(text, where, text_field, bad):
        yield text, text  # records have no path; the text itself is a stable id for the split


def _text_ok(text: object, where: str, text_field: str, bad: BadInput) -> bool:
    if isinstance(text, str):
        return True
    problem = "is null" if text is None else f"is a {type(text).__name__}, not text"
    bad(where, f"{text_field!r} {problem}", "fill or remove that record")
    return False


def _parquet_file(path: str, text_field: str, bad: BadInput) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for one cause
        bad(path, f"is not a readable Parquet file ({err})", "check the file")
        return
    names = parquet.schema_arrow.names
    if text_field not in names:
        _missing_column(path, text_field, names)
    yield from _column_texts(
        (b.column(0).to_pylist() for b in parquet.iter_batches(RECORD_BATCH, columns=[text_field])),
        path,
        text_field,
        bad,
    )


def _csv_file(path: str, text_field: str, bad: BadInput) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        reader = pcsv.open_csv(
            _open(path),
            # quoted cells of text span lines; without this, a row past the first block breaks
            parse_options=pcsv.ParseOptions(
                newlines_in_values=True,
                invalid_row_handler=_skip_row(path, bad) if bad.skip else None,
            ),
            convert_options=pcsv.ConvertOptions(column_types={text_field: pa.string()}),
        )
    except Exception as err:  # noqa: BLE001
        bad(path, f"is not a readable CSV file ({err})", "check the file")
        return
    names = reader.schema.names
    if text_field not in names:
        _missing_column(path, text_field, names)
    index = names.index(text_field)
    yield from _column_texts((b.column(index).to_pylist() for b in reader), path, text_field, bad)


def _skip_row(path: str, bad: BadInput):
    """With `on_error: skip`, a CSV row with too many or too few columns is skipped alone."""

    def handle(row) -> str:
        where = f"row {row.number}" if row.number is not None else f"the row {row.text[:40]!r}"
        bad(
            f"{path} {where}",
            f"has {row.actual_columns} columns, not {row.expected_columns}",
            "fix or remove that row",
        )
        return "skip"

    return handle


def _missing_column(source: str, text_field: str, columns: list[str]) -> None:
    raise RecipeError(
        f"data.text_field: column {text_field!r} is not in {source!r} (columns: {columns}); set "
        "`data.text_field` to the column holding the text"
    )


def _column_texts(
    batches: Iterator[list], source: str, text_field: str, bad: BadInput
) -> Iterator[Document]:
    row = 0
    batches = iter(batches)
    while True:
        try:
            texts = next(batches)
        except StopIteration:
            return
        except RecipeError:
            raise
        except Exception as err:  # noqa: BLE001 - pyarrow, pandas and datasets: one cause, one fix
            bad(
                f"{source} after row {row}",
                f"cannot be read ({_first_line(err)})",
                "fix or remove the broken row, or replace the file if it is truncated or corrupt",
            )
            return
        for text in texts:
            if _text_ok(text, f"{source} row {row}", text_field, bad):
                yield text, text
            row += 1


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _disk_documents(path: str, spec: DataSpec, bad: BadInput) -> Iterator[Document]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise RecipeError(
            f"data.files: {path!r} is a directory but not one written by "
            f"`datasets.save_to_disk`; list its files (e.g. `{path}/*.jsonl`) instead"
        ) from err
    except Exception as err:  # noqa: BLE001 - a damaged folder fails in json, pyarrow, ...
        raise RecipeError(
            f"data.files: {path!r} is a `datasets.save_to_disk` folder that cannot be read "
            f"({_first_line(err)}); save it again, or list its source files instead"
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        if spec.split not in dataset:
            raise RecipeError(
                f"data.split: {spec.split!r} is not in {path!r} (splits: {list(dataset)})"
            )
        dataset = dataset[spec.split]
    yield from _dataset_texts(dataset, spec, bad, path)


def _streamed_files(fmt: str, paths: list[str], spec: DataSpec, bad: BadInput):
    import datasets

    try:
        dataset = datasets.load_dataset(fmt, data_files=paths, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the fix is the same
        raise RecipeError(
            f"data.files: datasets cannot stream {', '.join(paths)} as {fmt} ({_first_line(err)}); "
            "check the files, or set `data.streaming: false` for messages naming the line"
        ) from err
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:  # datasets logs a bad row itself before it raises; distill's error says it once
        yield from _dataset_texts(dataset, spec, bad, ",".join(paths))
    finally:
        datasets.logging.set_verbosity(verbosity)


def _hub_documents(spec: DataSpec, bad: BadInput) -> Iterator[Document]:
    import datasets

    try:
        dataset = datasets.load_dataset(
            spec.hub, spec.hub_config, split=spec.split, streaming=spec.streaming
        )
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the fix is the same
        raise RecipeError(
            f"data.hub: could not load {spec.hub!r} (split {spec.split!r}): {err}. Check the id, "
            "`data.hub_config` and your network; offline, download it once and use "
            "`data.files` with the saved directory."
        ) from err
    yield from _dataset_texts(dataset, spec, bad, spec.hub or "")


def _dataset_texts(dataset, spec: DataSpec, bad: BadInput, source: str) -> Iterator[Document]:
    """A `datasets` Dataset (memory-mapped) or IterableDataset (streamed), in batches."""
    columns = dataset.column_names  # None for a stream whose features are not known up front
    if columns is not None and spec.text_field not in columns:
        _missing_column(source, spec.text_field, columns)

    def column() -> Iterator[list]:
        for batch in dataset.iter(batch_size=RECORD_BATCH):
            if spec.text_field not in batch:
                _missing_column(source, spec.text_field, sorted(batch))
            yield batch[spec.text_field]

    yield from _column_texts(column(), source, spec.text_field, bad)
