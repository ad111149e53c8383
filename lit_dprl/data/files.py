"""Loading a local data file (.jsonl, .json, .csv, .parquet) into a ``datasets.Dataset``, offline.

Nothing is fetched from a dataset hub: a source that is not an existing file is refused with a message
saying so. Text files are checked for UTF-8 first (the json loader would otherwise accept bad bytes
and fail later, at the first read of the row).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_FORMATS = {"json", "csv"}


def check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Raise ``ValueError`` naming the byte offset of the first invalid UTF-8 sequence in ``path``."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} is not valid UTF-8 (byte {offset + err.start}: {chunk[err.start : err.end]!r}); "
                    "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
                ) from err
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not valid UTF-8: it ends inside a multi-byte character") from err


def load_local_dataset(source: str | os.PathLike, text_columns: Sequence[str] = ()) -> Dataset:
    """Rows of a local .jsonl/.json/.csv/.parquet file as a ``Dataset``; clear errors for anything else, and for
    a row whose value in one of ``text_columns`` (where present) is not text, named by its place in the file."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data source {str(source)!r} is not an existing local file. Hub datasets are not downloaded: "
            f"pass a local file path ({', '.join(FORMATS)})."
        )
    if not path.is_file():
        raise ValueError(f"data source {str(path)!r} is a directory; pass one file ({', '.join(FORMATS)}).")
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read {path}: unsupported file type {path.suffix!r}; use one of {list(FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty; it must hold at least one example")
    if builder in TEXT_FORMATS:
        check_utf8(path)
    try:
        dataset = load_dataset(builder, data_files=str(path), split="train")
    except (DatasetGenerationError, ValueError) as err:
        cause = err.__cause__ or err
        if "corresponds to no data" in str(cause):
            raise ValueError(f"{path} holds no rows; it must hold at least one example") from err
        where = first_bad_json_line(path) if path.suffix.lower() == ".jsonl" else None
        raise ValueError(f"could not read rows from {path} as {builder}: {where or cause}") from err
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no rows; it must hold at least one example")
    for column in (c for c in text_columns if c in dataset.column_names):
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                raise ValueError(
                    f"{path}, {place_in_file(path, row)}: column {column!r} holds {value!r}, not text; fix or "
                    "drop that row"
                )
    return dataset


def place_in_file(path: Path, row: int) -> str:
    """Where row ``row`` (0-based) of a loaded file is: its line in a JSON Lines file, else its row number."""
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            rows = (number for number, line in enumerate(lines, start=1) if line.strip())
            return f"line {next(itertools.islice(rows, row, None))}"
    return f"row {row + 1}" + (" (after the header)" if path.suffix.lower() == ".csv" else "")


def first_bad_json_line(path: Path) -> str | None:
    """``"line N: <why>"`` for the first line of a JSON Lines file that is not one JSON object (1-based, blank
    lines skipped), or None."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number}, column {error.colno}: {error.msg}"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, not an object with named fields"
    return None


def file_dataset_name(source: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """``"file <absolute path> (sha256 <16 hex digits>)"``: names a local data file by path and content."""
    path = Path(source).expanduser().resolve()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return f"file {path} (sha256 {digest.hexdigest()[:16]})"


def require_columns(dataset: Dataset, columns: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming each missing column and the columns ``where`` does have."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        present = [column for column in dataset.column_names if column != "unit_id"]  # added by the split
        raise ValueError(
            f"{where} has no column {', '.join(map(repr, missing))}; its columns are {present}. "
            "Point the field arguments at existing columns."
        )


def text_column(dataset: Dataset, column: str, where: str) -> list[str]:
    """The values of ``column`` as strings; ``ValueError`` at the first row that holds no text."""
    values = dataset[column]
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{where}: column {column!r} holds {value!r} at row {row}, not text")
    return list(values)


def load_public_or_local(
    source: str,
    seed: int,
    public_fraction: float,
    public_data: bool,
    hint: str,
    text_columns: Sequence[str] = (),
) -> tuple[Dataset, str, bool]:
    """``(rows, dataset name, public)`` of bundled public data (``lit_dprl.data.imdb.is_public_source``)
    or of the local file ``source``, which counts as public only with ``public_data``; a missing file's
    error ends with ``hint`` (which bundled sources to use instead). A "+" joins bundled sources only."""
    from lit_dprl.data.imdb import is_public_source, load_public_sources

    if is_public_source(source) or ("+" in source and not Path(source).expanduser().exists()):
        return load_public_sources(source, seed, public_fraction), f"bundled public data {source!r}", True
    try:
        return load_local_dataset(source, text_columns), file_dataset_name(source), public_data
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} {hint}") from err
