"""Read rows (one dict per example) from JSON, JSON Lines, CSV/TSV, Parquet and local HF ``datasets``.

Every reader returns a ``Table``: the source's name and its rows, each with the 1-based number an
error message should quote (for JSON Lines that is the line number, for CSV the data row under the
header, otherwise the position in the file). Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass
class Table:
    """The rows of one data source: ``rows`` holds (row number, row) pairs in file order."""

    name: str
    rows: list[tuple[int, dict[str, Any]]]

    @property
    def columns(self) -> list[str]:
        """The columns of the first row (formats are detected from these)."""
        return list(self.rows[0][1]) if self.rows else []


def read_table(source: str | os.PathLike | Any, split: str | None = None) -> Table:
    """Read a data file, a folder written by ``datasets``' ``save_to_disk``, or a ``datasets.Dataset``.

    ``split`` picks a split of a ``DatasetDict`` (default "train"); a path may name it too, as
    ``folder#test``.
    """
    if _is_hf_dataset(source):
        return _from_hf(source, f"<{type(source).__name__}>", split)
    path = Path(source)
    folder, sep, named_split = str(source).rpartition("#")
    if sep and Path(folder).is_dir():
        path, split = Path(folder), named_split
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass a {'/'.join(SUFFIXES)} file or a saved datasets folder")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        table = readers[suffix](path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not table.rows:
        raise DataError(f"{path}: no rows; the file holds no examples")
    return table


def _read_jsonl(path: Path) -> Table:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                rows.append((number, _json_object(path, number, line)))
    return Table(str(path), rows)


def _read_json(path: Path) -> Table:
    """A JSON array of objects (a file of one object per line is read as JSON Lines)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line in a .json file
            return _read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({json_problem(exc, lines=True)})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    rows = []
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return Table(str(path), rows)


def _json_object(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: row {number}: not valid JSON ({json_problem(exc)})") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
    return row


def json_problem(exc: json.JSONDecodeError, lines: bool = False) -> str:
    """The decoder's message with its place said once: "Expecting ',' delimiter at column 16" (some
    messages end in "at" already: "Unterminated string starting at"); ``lines``: "at line 2"."""
    place = f"line {exc.lineno}" if lines else f"column {exc.colno}"
    return f"{exc.msg.removesuffix(' at')} at {place}"


def _read_csv(path: Path) -> Table:
    """CSV (or TSV by suffix) with a header row; every cell is a string. Quoting is read strictly: a quote
    left open would otherwise swallow every line after it into one cell, silently."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, strict=True)
        try:
            for number, row in enumerate(reader, start=1):
                if None in row:
                    raise DataError(
                        f"{path}: row {number}: more cells than the {len(reader.fieldnames)} header columns"
                    )
                rows.append((number, {key: value for key, value in row.items() if value is not None}))
        except csv.Error as exc:  # the reader's line count stops where the broken row began
            raise DataError(
                f"{path}: the row starting on line {reader.line_num + 1}: {exc}; a cell with quotes in it must be "
                'quoted whole, its own quotes doubled ("say ""hi""")'
            ) from None
    return Table(str(path), rows)


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq  # imported on use: pyarrow is large

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    return Table(str(path), list(enumerate(rows, start=1)))


def _read_saved_dataset(path: Path, split: str | None) -> Table:
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk (no state.json)")
    import datasets  # imported on use: datasets is slow to import

    return _from_hf(datasets.load_from_disk(str(path)), str(path), split)


def _is_hf_dataset(source: Any) -> bool:
    return type(source).__module__.startswith("datasets.")


def _from_hf(dataset: Any, name: str, split: str | None) -> Table:
    if isinstance(dataset, dict):  # a DatasetDict
        splits = list(dataset.keys())
        split = split or "train"
        if split not in splits:
            raise DataError(f"{name}: no split {split!r}; the dataset has {', '.join(splits)}")
        dataset, name = dataset[split], f"{name}[{split}]"
    if len(dataset) == 0:
        raise DataError(f"{name}: no rows; the dataset holds no examples")
    return Table(name, list(enumerate(dataset.to_list(), start=1)))
