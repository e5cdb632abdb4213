"""Column mapping: the names a file uses -> the names deltatune's formats read.

``columns`` maps *our* name to *the file's* column (LLaMA-Factory's direction)::

    {"prompt": "question", "completion": "answer"}          # prompt_completion from other names
    {"prompt": "instruction", "response": "output"}         # LLaMA-Factory's alpaca names
    {"conversations": "messages", "role_tag": "role", "content_tag": "content",
     "user_tag": "user", "assistant_tag": "assistant"}      # sharegpt keys spelled the OpenAI way

LLaMA-Factory's alpaca vocabulary is read when the mapping names ``response`` or ``query`` (or a
dataset_info entry says ``formatting: alpaca``): ``prompt`` is then the instruction, ``query`` its
input and ``response`` the output. With ``formatting: sharegpt``, ``messages`` is the conversation
column. Keys ending in ``_tag`` name sharegpt's message keys and speakers (``TAGS`` holds the
defaults); a mapped speaker name is read besides the usual aliases (human/user, gpt/assistant, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import DataError

# sharegpt tags and their defaults; the roles they name.
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "function_tag": "function_call",
    "observation_tag": "observation",
}
TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "function_tag": "function_call",
    "observation_tag": "tool",
}
_LF_ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}
FORMATTINGS = ("alpaca", "sharegpt")


@dataclass(frozen=True)
class ColumnMap:
    """Our column name -> the file's column, and the sharegpt tags (empty: the file uses our names)."""

    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | None, formatting: str | None = None) -> ColumnMap:
        """From a JSON/YAML mapping or its JSON text; ``formatting`` ("alpaca"/"sharegpt") picks
        LLaMA-Factory's vocabulary. Raises ``DataError`` on anything but a mapping of names to names."""
        if not spec:
            return cls()
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"columns={spec!r} is not valid JSON ({exc.msg}); e.g. "
                    f'columns=\'{{"prompt": "question", "completion": "answer"}}\''
                ) from None
        if not isinstance(spec, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
            raise DataError(f"columns must map names to column names (strings), got {spec!r}")
        tags = {k: v for k, v in spec.items() if k.endswith("_tag")}
        unknown = sorted(set(tags) - set(TAGS))
        if unknown:
            raise DataError(f"columns: unknown sharegpt tag {unknown[0]!r}; use {', '.join(TAGS)}")
        columns = {k: v for k, v in spec.items() if k not in tags}
        if formatting == "alpaca" or {"query", "response"} & set(columns):
            columns = {_LF_ALPACA.get(k, k): v for k, v in columns.items()}
        if formatting == "sharegpt" and "messages" in columns:
            columns["conversations"] = columns.pop("messages")
        return cls(columns, tags)

    def apply(self, name: str, number: int, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with the mapped columns renamed to our names."""
        if not self.columns:
            return row
        theirs = set(self.columns.values())
        out = {key: value for key, value in row.items() if key not in theirs}
        for ours, column in self.columns.items():
            if ours in out:
                raise DataError(
                    f"{name}: row {number}: columns maps {ours!r} to {column!r}, but the row has a "
                    f"{ours!r} column too; map or list it in ignore_columns"
                )
            if column in row:
                out[ours] = row[column]
        return out

    def check(self, name: str, columns: list[str]) -> None:
        """Every mapped column must be a column of the source (``columns``: its first row's)."""
        for ours, column in self.columns.items():
            if column not in columns:
                raise DataError(
                    f"{name}: columns maps {ours!r} to {column!r}, which is not a column; "
                    f"the columns are {', '.join(columns)}"
                )

    def roles(self, defaults: Mapping[str, str]) -> dict[str, str]:
        """Speaker name (lower case) -> role: ``defaults`` plus the names the tags give."""
        names = dict(defaults)
        names.update({value.lower(): TAG_ROLES[tag] for tag, value in self.tags.items() if tag in TAG_ROLES})
        return names

    def key(self, tag: str) -> str:
        """The message key a tag names ("role_tag" -> "from" unless mapped)."""
        return self.tags.get(tag, TAGS[tag])
