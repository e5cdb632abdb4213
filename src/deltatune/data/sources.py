"""Data sources -> validated records: one file, folder, dataset, dataset_info entry or built-in name,
or several of them (``"a.jsonl,b.jsonl"``), each row remembering its source and row number."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deltatune.data.chatterbot import BUILTIN
from deltatune.data.dataset_info import is_entry, read_entry
from deltatune.data.formats import normalise
from deltatune.data.mapping import ColumnMap
from deltatune.data.readers import SUFFIXES, read_table
from deltatune.data.records import KINDS, Origin, Record
from deltatune.errors import DataError


@dataclass
class RecordSet:
    """Validated records of one source, all of one format."""

    source: str
    format: str
    records: list[Record]

    @property
    def kind(self) -> str:
        """ "sft", "preference", "kto" or "classification" (what the records train)."""
        return KINDS[type(self.records[0])]

    def __len__(self) -> int:
        return len(self.records)


def split_sources(spec: str) -> list[str]:
    """The comma-separated sources of a ``data=`` value."""
    sources = [part.strip() for part in str(spec).split(",")]
    if not all(sources):
        raise DataError(f"data={spec!r} has an empty source; separate sources with single commas")
    return sources


def check_sources(spec: str, key: str = "data") -> None:
    """Fail fast on a source of ``spec`` (the value of config key ``key``) that does not exist: every one
    must be a built-in name, a ``dataset_info.json#name`` entry, or an existing file or folder
    (``folder#split`` too). Cheap (no row is read), so a run can check before torch loads."""
    for source in split_sources(spec):
        folder, sep, _ = source.rpartition("#")
        if source in BUILTIN or is_entry(source) or Path(source).exists() or (sep and Path(folder).is_dir()):
            continue
        raise DataError(
            f"{key}={spec!r}: {source} does not exist; pass a {'/'.join(SUFFIXES)} file, a saved "
            f"datasets folder, dataset_info.json#name or a built-in name ({', '.join(BUILTIN)})"
        )


def load_records(
    source: str | os.PathLike | Any,
    data_format: str = "auto",
    split: str | None = None,
    columns: str | Mapping[str, str] | None = None,
    ignore_columns: Collection[str] = (),
) -> RecordSet:
    """Read one ``source`` and validate every row into records (see the package docstring).

    ``source``: a data file, a ``save_to_disk`` folder, a ``datasets.Dataset``/``DatasetDict``, a
    built-in name (``BUILTIN``) or ``dataset_info.json#name``. ``data_format``: "auto" or a
    ``FORMATS`` name. ``split``: the ``DatasetDict`` split (default "train"). ``columns``: our name ->
    the source's column (``mapping``; a dataset_info entry brings its own). ``ignore_columns``:
    columns that may go unread.
    """
    if isinstance(source, str) and source in BUILTIN:
        records = BUILTIN[source]()
        fmt = {"sft": "messages"}.get(KINDS[type(records[0])], KINDS[type(records[0])])
        if data_format not in ("auto", fmt) or columns:
            raise DataError(f"data={source!r} is built in, in the {fmt} format; drop data_format and columns")
        return RecordSet(source, fmt, [replace(r, origin=Origin(source, n)) for n, r in enumerate(records, start=1)])
    ranking = None
    mapping = ColumnMap.parse(columns)
    if isinstance(source, (str, os.PathLike)) and is_entry(str(source)):
        entry = read_entry(str(source))
        source, mapping, ranking = entry.path, entry.mapping, entry.ranking
    table = read_table(source, split)
    fmt, records = normalise(table, data_format, mapping, ignore_columns)
    data = RecordSet(table.name, fmt, records)
    if ranking is not None and ranking != (data.kind == "preference"):
        raise DataError(
            f"{table.name}: its dataset_info entry says ranking={str(ranking).lower()}, but the rows are "
            f"{data.kind} data (format {fmt}); fix ranking or the columns"
        )
    return data


def load_sources(
    spec: str,
    data_format: str = "auto",
    columns: str | Mapping[str, str] | None = None,
    ignore_columns: Collection[str] = (),
) -> list[RecordSet]:
    """``load_records`` of every comma-separated source in ``spec``."""
    return [load_records(source, data_format, None, columns, ignore_columns) for source in split_sources(spec)]
