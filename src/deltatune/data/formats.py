"""Data formats: detect one from a table's columns and normalise every row to a record.

| format                | columns (+ optional)                                     | record         |
|-----------------------|----------------------------------------------------------|----------------|
| ``sharegpt_preference`` | ``conversations``, ``chosen``, ``rejected`` (+ system, tools) | PreferencePair |
| ``alpaca_preference`` | ``instruction``, ``chosen``, ``rejected`` (+ input, system, history) | PreferencePair |
| ``preference``        | ``chosen``, ``rejected`` (+ prompt, tools)               | PreferencePair |
| ``sharegpt_kto``      | ``conversations``, ``label`` or ``kto_tag`` (+ system, tools) | KTOExample |
| ``messages_kto``      | ``messages``, ``label`` or ``kto_tag`` (+ tools)         | KTOExample     |
| ``kto``               | ``prompt``, ``completion``, ``label`` or ``kto_tag`` (+ tools) | KTOExample |
| ``messages``          | ``messages``: [{role, content}, ...] (TRL) (+ tools)     | Conversation   |
| ``sharegpt``          | ``conversations``: [{from, value}, ...] (+ system, tools) | Conversation  |
| ``alpaca``            | ``instruction``, ``output`` (+ input, system, history)   | Conversation   |
| ``prompt_completion`` | ``prompt``, ``completion`` (+ tools)                     | Conversation   |
| ``classification``    | ``text``, ``label``                                      | LabelledText   |
| ``text``              | ``text``                                                 | TextExample    |

Detection takes the first format, in this order, whose required columns the first row has. A
column the format does not read is an error (naming it and the likely intended stage or format)
unless ``ignore_columns`` lists it. ``prompt``/``completion``/``chosen``/``rejected`` are strings
(a user prompt, an assistant answer) or TRL message lists; sharegpt's ``chosen``/``rejected`` are
one message object or a list. A KTO conversation's completion is its final assistant message(s).

Tool use: TRL assistant messages carry ``tool_calls`` (``[{"type": "function", "function": {"name",
"arguments"}}]``) and results come as ``tool`` messages; in sharegpt a ``function_call`` turn holds
the call as JSON text (``{"name", "arguments"}`` or a list of them) and an ``observation`` turn the
result. ``tools`` is a JSON list of function schemas (or its JSON text); every call must name one.
Every problem is a ``DataError`` naming the source, the 1-based row and the problem.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from deltatune.data.mapping import ColumnMap
from deltatune.data.readers import Table, json_problem
from deltatune.data.records import (
    ROLES,
    Conversation,
    KTOExample,
    LabelledText,
    Message,
    Messages,
    Origin,
    PreferencePair,
    Record,
    TextExample,
    ToolCall,
)
from deltatune.errors import DataError

# ShareGPT speaker names -> roles ("function_call" turns become assistant tool calls).
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
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_LABELS = ("label", "kto_tag")
# What an unread column most likely meant, for the error that names it.
_HINTS = {
    "label": "a label marks KTO data: did you mean stage=kto (with prompt+completion, messages or conversations)?",
    "kto_tag": "a kto_tag marks KTO data: did you mean stage=kto (with messages or conversations)?",
    "chosen": "did you mean stage=dpo? preference data needs both 'chosen' and 'rejected'",
    "rejected": "did you mean stage=dpo? preference data needs both 'chosen' and 'rejected'",
    "tools": "tools are read with messages, conversations or prompt/completion data",
    "response": "LLaMA-Factory's alpaca names: map them with columns='{\"prompt\": ..., \"response\": ...}'",
    "query": "LLaMA-Factory's alpaca names: map them with columns='{\"prompt\": ..., \"query\": ...}'",
}


class _Row:
    """One row being normalised; ``fail`` raises the one-line error that names it."""

    def __init__(self, source: str, number: int, data: dict[str, Any], mapping: ColumnMap) -> None:
        self.source, self.number, self.data, self.mapping = source, number, data, mapping

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
    """A data format: the columns that identify it ("a|b": either), those it may read, and its row normaliser."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    normalise: Callable[[_Row], Record]

    def matches(self, columns: Collection[str]) -> bool:
        return all(any(c in columns for c in names.split("|")) for names in self.required)

    @property
    def columns(self) -> set[str]:
        """Every column this format reads."""
        return {c for names in self.required for c in names.split("|")} | set(self.optional)


@dataclass(frozen=True)
class _Keys:
    """How a message list spells its keys and speakers."""

    role: str
    content: str
    names: dict[str, str]


_TRL = _Keys("role", "content", {name: name for name in ROLES})


def _sharegpt_keys(row: _Row) -> _Keys:
    mapping = row.mapping
    return _Keys(mapping.key("role_tag"), mapping.key("content_tag"), mapping.roles(SHAREGPT_ROLES))


def _messages(row: _Row, column: str, value: Any, keys: _Keys = _TRL) -> Messages:
    """A list of message dicts -> Messages, checking types and roles (tool calls included)."""
    if not isinstance(value, list) or not value:
        raise row.fail(f"column {column!r} must be a non-empty list of messages, got {_describe(value)}")
    return tuple(_message(row, f"{column!r} message {index}", item, keys) for index, item in enumerate(value, start=1))


def _message(row: _Row, where: str, item: Any, keys: _Keys) -> Message:
    if not isinstance(item, dict):
        raise row.fail(f"{where} must be an object with {keys.role!r} and {keys.content!r}, got {_describe(item)}")
    role, content = item.get(keys.role), item.get(keys.content)
    if not isinstance(role, str):
        raise row.fail(f"{where} has no {keys.role!r} string")
    if role.lower() not in keys.names:
        raise row.fail(f"{where} has unknown role {role!r}; use one of {', '.join(keys.names)}")
    role = keys.names[role.lower()]
    if role == "function_call":  # sharegpt: the call(s) as JSON text
        return Message("assistant", "", _calls_from_text(row, where, content))
    calls: tuple[ToolCall, ...] = ()
    if item.get("tool_calls"):
        if role != "assistant":
            raise row.fail(f"{where}: only assistant messages make tool calls, not {role} ones")
        if not isinstance(item["tool_calls"], list):
            raise row.fail(f"{where}: 'tool_calls' must be a list, got {_describe(item['tool_calls'])}")
        calls = tuple(_tool_call(row, where, call) for call in item["tool_calls"])
        content = content or ""
    if not isinstance(content, str):
        raise row.fail(f"{where} needs a {keys.content!r} string, got {_describe(content)}")
    return Message(role, content, calls)


def _calls_from_text(row: _Row, where: str, text: Any) -> tuple[ToolCall, ...]:
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise row.fail(f"{where}: the function call is not valid JSON ({json_problem(exc)}); write {{\"name\": ..., "
                       f"\"arguments\": {{...}}}}") from None  # fmt: skip
    return tuple(_tool_call(row, where, call) for call in (value if isinstance(value, list) else [value]))


def _tool_call(row: _Row, where: str, call: Any) -> ToolCall:
    """``{"name", "arguments"}``, possibly wrapped as ``{"type": "function", "function": {...}}``."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise row.fail(f"{where}: a tool call must be an object with a function 'name', got {_describe(call)}")
    name, arguments = function["name"], function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise row.fail(f"{where}: the arguments of {name!r} are not valid JSON ({json_problem(exc)})") from None
    if not isinstance(arguments, dict):
        raise row.fail(f"{where}: the arguments of {name!r} must be a JSON object, got {_describe(arguments)}")
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _tools(row: _Row) -> tuple[str | None, set[str] | None]:
    """(the ``tools`` column as JSON text, the function names it offers); (None, None) without one."""
    value = row.get("tools", required=False)
    if value is None or value == "" or value == []:
        return None, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise row.fail(f"column 'tools' is not valid JSON ({json_problem(exc)}); it must be a "
                           f"JSON list of function schemas") from None  # fmt: skip
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise row.fail(f"column 'tools' must be a list of function schemas, got {_describe(value)}")
    names = set()
    for index, schema in enumerate(value, start=1):
        function = schema.get("function", schema) if isinstance(schema, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise row.fail(f"column 'tools' item {index} is not a function schema with a 'name'")
        names.add(function["name"])
    return json.dumps(value, ensure_ascii=False), names


def _check_turns(row: _Row, column: str, messages: Messages, tools: set[str] | None) -> None:
    """System only first; tool results right after a tool call; assistants say or call something;
    every call names a function in ``tools`` (when the row has them)."""
    for index, message in enumerate(messages, start=1):
        where = f"{column!r} message {index}"
        if message.role == "system" and index > 1:
            raise row.fail(f"{where}: a system message must come first")
        before = messages[index - 2] if index > 1 else None
        if message.role == "tool" and not (before and (before.tool_calls or before.role == "tool")):
            raise row.fail(f"{where}: a tool result must follow an assistant message that calls a tool")
        if message.role == "assistant" and not (message.content.strip() or message.tool_calls):
            raise row.fail(f"{where}: empty completion (assistant message has no text)")
        for call in message.tool_calls:
            if tools is not None and call.name not in tools:
                offered = ", ".join(sorted(tools))
                raise row.fail(f"{where} calls {call.name!r}, which column 'tools' does not offer (it has {offered})")


def _conversation_messages(row: _Row, column: str, tools: set[str] | None) -> Messages:
    """The messages (TRL) or conversations (sharegpt, after its optional ``system`` column) of a row."""
    keys = _sharegpt_keys(row) if column == "conversations" else _TRL
    messages = _messages(row, column, row.get(column), keys)
    system = row.string("system", required=False) if column == "conversations" else None
    if system:
        if messages[0].role == "system":
            raise row.fail("both a 'system' column and a system message; keep one")
        messages = (Message("system", system), *messages)
    _check_turns(row, column, messages, tools)
    return messages


def _conversation(row: _Row, column: str) -> Conversation:
    tools, names = _tools(row)
    messages = _conversation_messages(row, column, names)
    if not any(m.role == "assistant" for m in messages):
        raise row.fail(f"{column!r} has no assistant message to train on")
    return Conversation(messages, tools)


def _prompt(row: _Row, column: str = "prompt") -> Messages:
    """A prompt: a user string, or messages ending with a non-assistant turn."""
    value = row.get(column)
    if isinstance(value, str):
        return (Message("user", value),)
    return _ends_with_question(row, column, _messages(row, column, value))


def _ends_with_question(row: _Row, column: str, messages: Messages) -> Messages:
    if messages[-1].role == "assistant":
        raise row.fail(f"column {column!r} must end with a user (or tool) message, not an assistant one")
    return messages


def _completion(row: _Row, column: str, keys: _Keys = _TRL) -> Messages:
    """A completion: an assistant string, one message object, or non-empty assistant messages."""
    value = row.get(column)
    if isinstance(value, str):
        return _checked_completion(row, column, (Message("assistant", value),))
    if isinstance(value, dict):
        return _checked_completion(row, column, (_message(row, f"column {column!r}", value, keys),))
    return _checked_completion(row, column, _messages(row, column, value, keys))


def _checked_completion(row: _Row, column: str, messages: Messages) -> Messages:
    if not messages:
        raise row.fail(f"column {column!r} has no completion after the prompt it shares")
    for message in messages:
        if message.role != "assistant":
            raise row.fail(f"column {column!r} holds a {message.role} message; completions are assistant messages")
        if not (message.content.strip() or message.tool_calls):
            raise row.fail(f"column {column!r} is an empty completion")
    return messages


def _alpaca_prompt(row: _Row) -> Messages:
    """system, then history [[instruction, output], ...], then instruction + "\\n\\n" + input."""
    instruction, extra = row.string("instruction"), row.string("input", required=False)
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
    messages.append(Message("user", f"{instruction}\n\n{extra}" if extra else instruction))
    return tuple(messages)


def _alpaca(row: _Row) -> Conversation:
    output = row.string("output")
    if not output.strip():
        raise row.fail("column 'output' is an empty completion")
    return Conversation(_alpaca_prompt(row) + (Message("assistant", output),))


def _prompt_completion(row: _Row) -> Conversation:
    tools, names = _tools(row)
    messages = _prompt(row) + _completion(row, "completion")
    _check_turns(row, "prompt", messages, names)
    return Conversation(messages, tools)


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


def _label(row: _Row) -> bool:
    """The KTO label (``label`` or ``kto_tag``): a boolean, or true/false/1/0/yes/no as text."""
    present = [column for column in _LABELS if row.get(column, required=False) is not None]
    if len(present) != 1:
        raise row.fail("needs exactly one of the columns 'label' and 'kto_tag' (true: desirable)")
    label = row.get(present[0])
    text = str(label).strip().lower()
    if isinstance(label, bool):
        return label
    if isinstance(label, (str, int)) and text in _TRUE | _FALSE:
        return text in _TRUE
    raise row.fail(f"column {present[0]!r} must be true or false, got {_describe(label)}")


def _kto(row: _Row) -> KTOExample:
    tools, names = _tools(row)
    prompt, completion = _prompt(row), _completion(row, "completion")
    _check_turns(row, "prompt", prompt + completion, names)
    return KTOExample(prompt, completion, _label(row), tools)


def _kto_conversation(column: str) -> Callable[[_Row], KTOExample]:
    """KTO from a conversation: its final assistant message(s) are the completion, the rest the prompt."""

    def normalise(row: _Row) -> KTOExample:
        tools, names = _tools(row)
        messages = _conversation_messages(row, column, names)
        start = len(messages)
        while start and messages[start - 1].role == "assistant":
            start -= 1
        if start == len(messages) or start == 0:
            raise row.fail(f"column {column!r} must end with the assistant answer the label judges, after a prompt")
        return KTOExample(messages[:start], messages[start:], _label(row), tools)

    return normalise


def _preference(row: _Row) -> PreferencePair:
    """With a ``prompt`` column, chosen/rejected are completions; without one they are whole
    conversations and the prompt is their longest shared prefix that ends before an assistant turn."""
    tools, names = _tools(row)
    if row.get("prompt", required=False) is not None:
        pair = PreferencePair(_prompt(row), _completion(row, "chosen"), _completion(row, "rejected"), tools)
        return _distinct(row, pair, names)
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
        _checked_completion(row, "rejected", rejected[shared:]), tools,
    ), names)  # fmt: skip


def _sharegpt_preference(row: _Row) -> PreferencePair:
    """The conversation is the prompt; chosen and rejected are one message object or a list."""
    tools, names = _tools(row)
    prompt = _ends_with_question(row, "conversations", _conversation_messages(row, "conversations", names))
    keys = _sharegpt_keys(row)
    pair = PreferencePair(prompt, _completion(row, "chosen", keys), _completion(row, "rejected", keys), tools)
    return _distinct(row, pair, names)


def _alpaca_preference(row: _Row) -> PreferencePair:
    return _distinct(row, PreferencePair(_alpaca_prompt(row), _completion(row, "chosen"), _completion(row, "rejected")))


def _distinct(row: _Row, pair: PreferencePair, tools: set[str] | None = None) -> PreferencePair:
    for side in ("chosen", "rejected"):
        _check_turns(row, side, pair.prompt + getattr(pair, side), tools)
    if pair.chosen == pair.rejected:
        raise row.fail("chosen and rejected are the same completion; a pair must prefer one answer over another")
    return pair


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("sharegpt_preference", ("conversations", "chosen", "rejected"), ("system", "tools"), _sharegpt_preference),
        Format("alpaca_preference", ("instruction", "chosen", "rejected"), ("input", "system", "history"), _alpaca_preference),
        Format("preference", ("chosen", "rejected"), ("prompt", "tools"), _preference),
        Format("sharegpt_kto", ("conversations", "label|kto_tag"), ("system", "tools"), _kto_conversation("conversations")),
        Format("messages_kto", ("messages", "label|kto_tag"), ("tools",), _kto_conversation("messages")),
        Format("kto", ("prompt", "completion", "label|kto_tag"), ("tools",), _kto),
        Format("messages", ("messages",), ("tools",), lambda row: _conversation(row, "messages")),
        Format("sharegpt", ("conversations",), ("system", "tools"), lambda row: _conversation(row, "conversations")),
        Format("alpaca", ("instruction", "output"), ("input", "system", "history"), _alpaca),
        Format("prompt_completion", ("prompt", "completion"), ("tools",), _prompt_completion),
        Format("classification", ("text", "label"), (), _classification),
        Format("text", ("text",), (), _text),
    )
}  # fmt: skip
COLUMNS = sorted(set().union(*(f.columns for f in FORMATS.values())))


def detect_format(table: Table) -> str:
    """The first format (in ``FORMATS`` order) whose required columns the first row has."""
    columns = set(table.columns)
    for fmt in FORMATS.values():
        if fmt.matches(columns):
            return fmt.name
    expected = "; ".join(f"{f.name}: {', '.join(f.required)}" for f in FORMATS.values())
    raise DataError(
        f"{table.name}: cannot tell the data format from the columns {sorted(columns)}; expected one of: {expected}"
    )


def normalise(
    table: Table, data_format: str = "auto", mapping: ColumnMap | None = None, ignore_columns: Collection[str] = ()
) -> tuple[str, list[Record]]:
    """(format name, one record per row); ``mapping`` renames columns first, ``ignore_columns`` may go
    unread; raises on the first bad row or unread column."""
    mapping = mapping or ColumnMap()
    unknown = sorted(set(mapping.columns) - set(COLUMNS))
    if unknown:
        raise DataError(f"columns: {unknown[0]!r} is not a column any format reads; map to one of {', '.join(COLUMNS)}")
    mapping.check(table.name, table.columns)
    table = Table(table.name, [(n, mapping.apply(table.name, n, row)) for n, row in table.rows])
    name = detect_format(table) if data_format == "auto" else data_format
    if name not in FORMATS:
        raise DataError(f"data_format={data_format!r} is unknown; use auto or one of {', '.join(FORMATS)}")
    fmt, allowed = FORMATS[name], FORMATS[name].columns | set(ignore_columns)
    records = []
    for number, data in table.rows:
        row = _Row(table.name, number, data, mapping)
        extra = [column for column in data if column not in allowed]
        if extra:
            hint = _HINTS.get(extra[0], f"the {name} format reads {', '.join(sorted(fmt.columns))}")
            raise row.fail(f"column {extra[0]!r} is not read by the {name} format ({hint}); list it in "
                           f"ignore_columns={extra[0]} to leave it out")  # fmt: skip
        records.append(dataclasses.replace(fmt.normalise(row), origin=Origin(table.name, number)))
    return name, records


def _describe(value: Any) -> str:
    if isinstance(value, (str, bool, int, float)) or value is None:
        text = repr(value)
        return f"{type(value).__name__} {text[:40]}" if value is not None else "nothing"
    return type(value).__name__
