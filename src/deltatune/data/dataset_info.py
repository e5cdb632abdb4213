"""One entry of a LLaMA-Factory ``dataset_info.json``: ``data=path/to/dataset_info.json#name``.

An entry names a local file and how to read it::

    "my_tools": {"file_name": "tools.json", "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "tools": "tools"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human"}}

``file_name`` is relative to the folder of dataset_info.json; ``formatting`` is "alpaca" (the
default) or "sharegpt" and picks the vocabulary of ``columns`` (see ``mapping``); ``ranking: true``
says the rows are preference pairs, which detection must confirm. Hub entries (``hf_hub_url``, ...)
and keys deltatune does not read are refused by name: nothing is downloaded or silently skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from deltatune.data.mapping import FORMATTINGS, ColumnMap
from deltatune.errors import DataError

_KEYS = ("file_name", "formatting", "ranking", "columns", "tags")


@dataclass(frozen=True)
class Entry:
    """A resolved entry: the data file, its column mapping, and whether it holds preference pairs."""

    path: Path
    mapping: ColumnMap
    ranking: bool


def is_entry(source: str) -> bool:
    """Whether ``source`` is ``<a .json file>#<name>``."""
    path, sep, name = source.rpartition("#")
    return bool(sep and name) and path.lower().endswith(".json") and Path(path).is_file()


def read_entry(source: str) -> Entry:
    """The entry ``name`` of ``path#name``."""
    path, _, name = source.rpartition("#")
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: a dataset_info.json is an object of named entries, got {type(info).__name__}")
    if name not in info:
        raise DataError(f"{path}: no entry {name!r}; it has {', '.join(info) or 'none'}")
    entry = info[name]
    where = f"{path}#{name}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: an entry is an object with file_name, formatting, columns, tags")
    unread = [key for key in entry if key not in _KEYS]
    if unread:
        raise DataError(
            f"{where}: key {unread[0]!r} is not supported (nothing is downloaded); use file_name with "
            f"formatting, ranking, columns, tags"
        )
    if not isinstance(entry.get("file_name"), str):
        raise DataError(f"{where}: needs a 'file_name' (a data file next to dataset_info.json)")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting={formatting!r} is unknown; use {' or '.join(FORMATTINGS)}")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: ranking must be true or false, got {ranking!r}")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataError(f"{where}: columns and tags must be objects of names")
    unnamed = [key for key in tags if not key.endswith("_tag")]
    if unnamed:
        raise DataError(
            f"{where}: tags key {unnamed[0]!r} is not a sharegpt tag (role_tag, content_tag, user_tag, ...)"
        )
    mapping = ColumnMap.parse({**columns, **tags}, formatting)
    return Entry(Path(path).parent / entry["file_name"], mapping, ranking)
