"""The system prompt an adapter was trained with, kept beside it so that chatting with it uses it too.

When most training rows start with a system message, training writes the most common one to
``<adapter>/deltatune.json``::

    {"system": "You are a helpful assistant."}

(peft ignores the file; ``deltatune merge`` copies it into the merged model folder). ``deltatune
generate`` and ``deltatune chat`` send it as the system message unless ``--system`` is given
(``--system ""`` sends none). Rows without a system message count as "none": when they are the
most common, nothing is stored, and a stale file from an earlier run is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from deltatune.data.records import (
    Conversation,
    KTOExample,
    Messages,
    PreferencePair,
    Record,
)
from deltatune.errors import ConfigError
from deltatune.runtime.atomic import atomic_file

FILE = "deltatune.json"


def record_system(record: Record) -> str | None:
    """The system message a record's prompt starts with, or None (text and classification rows have none)."""
    if isinstance(record, Conversation):
        messages: Messages = record.messages
    elif isinstance(record, (PreferencePair, KTOExample)):
        messages = record.prompt
    else:
        return None
    return messages[0].content if messages and messages[0].role == "system" else None


def common_system(records: Sequence[Record]) -> tuple[str | None, str | None]:
    """(the system prompt most rows start with, or None when most rows have none; a line saying so, or
    None when no row has one)."""
    counts = Counter(record_system(record) for record in records)
    system, rows = counts.most_common(1)[0] if counts else (None, 0)
    others = len(counts) - 1
    if system is None:
        if not others:
            return None, None
        return None, (
            f"no chat default stored: {rows} of {len(records)} training rows have no system prompt "
            f"({others} different ones in the rest)"
        )
    distinct = len(counts) - (None in counts)
    detail = [f"in {rows} of {len(records)} training rows"]
    if distinct > 1:
        detail.append(f"the most common of {distinct} different ones")
    if counts.get(None):
        detail.append(f"{counts[None]} rows have none")
    return system, f"system prompt {_short(system)} ({'; '.join(detail)})"


def write_chat_defaults(adapter_dir: str | os.PathLike, records: Sequence[Record]) -> str | None:
    """Store the training rows' common system prompt in ``adapter_dir`` (or remove a stale one); the line
    to log (None: no row has a system prompt)."""
    system, line = common_system(records)
    path = Path(adapter_dir) / FILE
    if system is None:
        path.unlink(missing_ok=True)
        return line
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps({"system": system}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return f"{line}, saved as the chat default in {path}"


def copy_chat_defaults(source: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Copy ``source``'s chat defaults (if any) into ``folder`` (a merged model keeps its adapter's)."""
    if (Path(source) / FILE).is_file():
        shutil.copyfile(Path(source) / FILE, Path(folder) / FILE)


def stored_system(folder: str | os.PathLike) -> str | None:
    """The system prompt stored in ``folder`` (an adapter or merged model), or None."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        system = json.loads(path.read_text(encoding="utf-8")).get("system")
    except (ValueError, AttributeError):
        system = 0  # not a mapping, or not JSON: refused below
    if system is not None and not isinstance(system, str):
        raise ConfigError(f'{path} is not valid ({{"system": "<text>"}} expected); fix or delete it')
    return system or None


def _short(text: str, width: int = 60) -> str:
    """``text`` quoted, cut to ``width`` characters."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")
