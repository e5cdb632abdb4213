"""Data formats: detect one from a table's columns and normalise every row to a record.

| format              | columns                                              | record         |
|---------------------|------------------------------------------------------|----------------|
| ``preference``      | ``prompt`` (optional with message lists), ``chosen``, ``rejected`` | PreferencePair |
| ``kto``             | ``prompt``, ``completion``, ``label`` (bool)         | KTOExample     |
| ``messages``        | ``messages``: [{role, content}, ...] (TRL)           | Conversation   |
| ``sharegpt``        | ``conversations``: [{from, value}, ...]              | Conversation   |
| ``alpaca``          | ``instruction``, ``output`` (+ ``input``, ``system``, ``history``) | Conversation |
| ``prompt_completion`` | ``prompt``, ``completion``                         | Conversation   |
| ``classification``  | ``text``, ``label``                                  | LabelledText   |
| ``text``            | ``text``                                             | TextExample    |

Detection takes the first format, in this order, whose required columns the first row has.
``prompt``/``completion``/``chosen``/``rejected`` are strings (a user prompt, an assistant answer)
or TRL message lists. Every problem is a ``DataError`` naming the source, the 1-based row and
the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .readers import Table
from .records import (
    ROLES,
    Conversation,
    KTOExample,
    LabelledText,
    Message,
    Messages,
    PreferencePair,
    Record,
    TextExample,
)

# ShareGPT speaker names -> roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class _Row:
    """One row being normalised; ``fail`` raises the one-line error that names it."""

    def __init__(self, source: str, number: int, data: dict[str, Any]) -> None:
        self.source, self.number, self.data = source, number, data

    def fail(self, problem: str) -> DataError:
        return DataError(f"{self.source}: row {self.number}: {problem}")

    def get(self, column: str, required: bool = True) -> Any:
        value = self.data.get(column)
        if value is None and required:
            raise self.fail(f"missing column {column!r}")
        return value

    def string(self, column: str, required: bool = True) -> str | None:
        value = self.get(column, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(f"column {column!r} must be a string, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Format:
    """A data format: the columns that identify it and the function that normalises one row."""

    name: str
    required: tuple[str, ...]
    normalise: Callable[[_Row], Record]


def _messages(row: _Row, column: str, value: Any, key_role: str = "role", key_content: str = "content",
              role_names: dict[str, str] | None = None) -> Messages:  # fmt: skip
    """A list of message dicts -> Messages, checking types and roles."""
    if not isinstance(value, list) or not value:
        raise row.fail(f"column {column!r} must be a non-empty list of messages, got {_describe(value)}")
    out = []
    for index, item in enumerate(value, start=1):
        where = f"{column!r} message {index}"
        if not isinstance(item, dict):
            raise row.fail(f"{where} must be an object with {key_role!r} and {key_content!r}, got {_describe(item)}")
        role, content = item.get(key_role), item.get(key_content)
        if not isinstance(role, str):
            raise row.fail(f"{where} has no {key_role!r} string")
        if not isinstance(content, str):
            raise row.fail(f"{where} needs a {key_content!r} string, got {_describe(content)}")
        names = role_names or {name: name for name in ROLES}
        if role.lower() not in names:
            raise row.fail(f"{where} has unknown role {role!r}; use one of {', '.join(names)}")
        out.append(Message(names[role.lower()], content))
    return tuple(out)


def _checked_conversation(row: _Row, messages: Messages, column: str) -> Conversation:
    """Check the turn structure: system only first, at least one non-empty assistant message."""
    for index, message in enumerate(messages, start=1):
        if message.role == "system" and index > 1:
            raise row.fail(f"{column!r} message {index}: a system message must come first")
        if message.role == "assistant" and not message.content.strip():
            raise row.fail(f"{column!r} message {index}: empty completion (assistant message has no text)")
    if not any(m.role == "assistant" for m in messages):
        raise row.fail(f"{column!r} has no assistant message to train on")
    return Conversation(messages)


def _prompt(row: _Row, column: str = "prompt") -> Messages:
    """A prompt: a user string, or messages ending with a non-assistant turn."""
    value = row.get(column)
    if isinstance(value, str):
        return (Message("user", value),)
    messages = _messages(row, column, value)
    if messages[-1].role == "assistant":
        raise row.fail(f"column {column!r} must end with a user (or system) message, not an assistant one")
    return messages


def _completion(row: _Row, column: str) -> Messages:
    """A completion: an assistant string, or non-empty assistant messages."""
    value = row.get(column)
    if isinstance(value, str):
        return _checked_completion(row, column, (Message("assistant", value),))
    return _checked_completion(row, column, _messages(row, column, value))


def _checked_completion(row: _Row, column: str, messages: Messages) -> Messages:
    if not messages:
        raise row.fail(f"column {column!r} has no completion after the prompt it shares")
    for message in messages:
        if message.role != "assistant":
            raise row.fail(f"column {column!r} holds a {message.role} message; completions are assistant messages")
        if not message.content.strip():
            raise row.fail(f"column {column!r} is an empty completion")
    return messages


def _messages_format(row: _Row) -> Conversation:
    return _checked_conversation(row, _messages(row, "messages", row.get("messages")), "messages")


def _sharegpt(row: _Row) -> Conversation:
    value = row.get("conversations")
    messages = _messages(row, "conversations", value, "from", "value", SHAREGPT_ROLES)
    return _checked_conversation(row, messages, "conversations")


def _alpaca(row: _Row) -> Conversation:
    """system, then history [[instruction, output], ...], then instruction + "\\n\\n" + input -> output."""
    instruction, extra = row.string("instruction"), row.string("input", required=False)
    output = row.string("output")
    if not output.strip():
        raise row.fail("column 'output' is an empty completion")
    messages = []
    system = row.string("system", required=False)
    if system:
        messages.append(Message("system", system))
    history = row.get("history", required=False) or []
    if not isinstance(history, list) or not all(
        isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
    ):
        raise row.fail("column 'history' must be a list of [instruction, output] string pairs")
    for question, answer in history:
        messages += [Message("user", question), Message("assistant", answer)]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [Message("user", user), Message("assistant", output)]
    return Conversation(tuple(messages))


def _prompt_completion(row: _Row) -> Conversation:
    return Conversation(_prompt(row) + _completion(row, "completion"))


def _text(row: _Row) -> TextExample:
    text = row.string("text")
    if not text.strip():
        raise row.fail("column 'text' is empty")
    return TextExample(text)


def _classification(row: _Row) -> LabelledText:
    text, label = row.string("text"), row.get("label")
    if not text.strip():
        raise row.fail("column 'text' is empty")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise row.fail(f"column 'label' must be a class name or number, got {_describe(label)}")
    return LabelledText(text, str(label))


def _kto(row: _Row) -> KTOExample:
    label = row.get("label")
    text = str(label).strip().lower()
    if isinstance(label, bool):
        desirable = label
    elif isinstance(label, (str, int)) and text in _TRUE | _FALSE:
        desirable = text in _TRUE
    else:
        raise row.fail(f"column 'label' must be true or false, got {_describe(label)}")
    return KTOExample(_prompt(row), _completion(row, "completion"), desirable)


def _preference(row: _Row) -> PreferencePair:
    """With a ``prompt`` column, chosen/rejected are completions; without one they are whole
    conversations and the prompt is their longest shared prefix that ends before an assistant turn."""
    if row.get("prompt", required=False) is not None:
        return _distinct(row, PreferencePair(_prompt(row), _completion(row, "chosen"), _completion(row, "rejected")))
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise row.fail("missing column 'prompt' (needed when chosen and rejected are strings)")
    chosen, rejected = _messages(row, "chosen", chosen), _messages(row, "rejected", rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role == "assistant":
        shared -= 1
    if shared == 0:
        raise row.fail("chosen and rejected share no prompt; add a 'prompt' column")
    return _distinct(row, PreferencePair(
        chosen[:shared], _checked_completion(row, "chosen", chosen[shared:]),
        _checked_completion(row, "rejected", rejected[shared:]),
    ))  # fmt: skip


def _distinct(row: _Row, pair: PreferencePair) -> PreferencePair:
    if pair.chosen == pair.rejected:
        raise row.fail("chosen and rejected are the same completion; a pair must prefer one answer over another")
    return pair


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("preference", ("chosen", "rejected"), _preference),
        Format("kto", ("prompt", "completion", "label"), _kto),
        Format("messages", ("messages",), _messages_format),
        Format("sharegpt", ("conversations",), _sharegpt),
        Format("alpaca", ("instruction", "output"), _alpaca),
        Format("prompt_completion", ("prompt", "completion"), _prompt_completion),
        Format("classification", ("text", "label"), _classification),
        Format("text", ("text",), _text),
    )
}


def detect_format(table: Table) -> str:
    """The first format (in ``FORMATS`` order) whose required columns the first row has."""
    columns = set(table.columns)
    for fmt in FORMATS.values():
        if columns.issuperset(fmt.required):
            return fmt.name
    expected = "; ".join(f"{f.name}: {', '.join(f.required)}" for f in FORMATS.values())
    raise DataError(
        f"{table.name}: cannot tell the data format from the columns {sorted(columns)}; expected one of: {expected}"
    )


def normalise(table: Table, data_format: str = "auto") -> tuple[str, list[Record]]:
    """(format name, one record per row); raises on the first bad row."""
    name = detect_format(table) if data_format == "auto" else data_format
    if name not in FORMATS:
        raise DataError(f"data_format={data_format!r} is unknown; use auto or one of {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    return name, [fmt.normalise(_Row(table.name, number, data)) for number, data in table.rows]


def _describe(value: Any) -> str:
    if isinstance(value, (str, bool, int, float)) or value is None:
        text = repr(value)
        return f"{type(value).__name__} {text[:40]}" if value is not None else "nothing"
    return type(value).__name__
