"""One data row being read, and the message lists in it: TRL's ``{role, content}`` and ShareGPT's ``{from, value}``
turns, with tool calls and tool schemas checked. Every problem is a ``DataError`` naming the source and row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from deltatune.data.mapping import ColumnMap
from deltatune.data.readers import json_problem
from deltatune.data.records import ROLES, Message, Messages, ToolCall
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


class Row:
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
class MessageKeys:
    """How a message list spells its keys and speakers."""

    role: str
    content: str
    names: dict[str, str]


TRL_KEYS = MessageKeys("role", "content", {name: name for name in ROLES})


def sharegpt_keys(row: Row) -> MessageKeys:
    mapping = row.mapping
    return MessageKeys(mapping.key("role_tag"), mapping.key("content_tag"), mapping.roles(SHAREGPT_ROLES))


def parse_messages(row: Row, column: str, value: Any, keys: MessageKeys = TRL_KEYS) -> Messages:
    """A list of message dicts -> Messages, checking types and roles (tool calls included)."""
    if not isinstance(value, list) or not value:
        raise row.fail(f"column {column!r} must be a non-empty list of messages, got {describe(value)}")
    return tuple(
        parse_message(row, f"{column!r} message {index}", item, keys) for index, item in enumerate(value, start=1)
    )


def parse_message(row: Row, where: str, item: Any, keys: MessageKeys) -> Message:
    if not isinstance(item, dict):
        raise row.fail(f"{where} must be an object with {keys.role!r} and {keys.content!r}, got {describe(item)}")
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
            raise row.fail(f"{where}: 'tool_calls' must be a list, got {describe(item['tool_calls'])}")
        calls = tuple(_tool_call(row, where, call) for call in item["tool_calls"])
        content = content or ""
    if not isinstance(content, str):
        raise row.fail(f"{where} needs a {keys.content!r} string, got {describe(content)}")
    return Message(role, content, calls)


def _calls_from_text(row: Row, where: str, text: Any) -> tuple[ToolCall, ...]:
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise row.fail(
            f'{where}: the function call is not valid JSON ({json_problem(exc)}); write {{"name": ..., '
            f'"arguments": {{...}}}}'
        ) from None
    return tuple(_tool_call(row, where, call) for call in (value if isinstance(value, list) else [value]))


def _tool_call(row: Row, where: str, call: Any) -> ToolCall:
    """``{"name", "arguments"}``, possibly wrapped as ``{"type": "function", "function": {...}}``."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise row.fail(f"{where}: a tool call must be an object with a function 'name', got {describe(call)}")
    name, arguments = function["name"], function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise row.fail(f"{where}: the arguments of {name!r} are not valid JSON ({json_problem(exc)})") from None
    if not isinstance(arguments, dict):
        raise row.fail(f"{where}: the arguments of {name!r} must be a JSON object, got {describe(arguments)}")
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def row_tools(row: Row) -> tuple[str | None, set[str] | None]:
    """(the ``tools`` column as JSON text, the function names it offers); (None, None) without one."""
    value = row.get("tools", required=False)
    if value is None or value == "" or value == []:
        return None, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise row.fail(
                f"column 'tools' is not valid JSON ({json_problem(exc)}); it must be a JSON list of function schemas"
            ) from None
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise row.fail(f"column 'tools' must be a list of function schemas, got {describe(value)}")
    names = set()
    for index, schema in enumerate(value, start=1):
        function = schema.get("function", schema) if isinstance(schema, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise row.fail(f"column 'tools' item {index} is not a function schema with a 'name'")
        names.add(function["name"])
    return json.dumps(value, ensure_ascii=False), names


def check_turns(row: Row, column: str, messages: Messages, tools: set[str] | None) -> None:
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


def conversation_messages(row: Row, column: str, tools: set[str] | None) -> Messages:
    """The messages (TRL) or conversations (sharegpt, after its optional ``system`` column) of a row."""
    keys = sharegpt_keys(row) if column == "conversations" else TRL_KEYS
    messages = parse_messages(row, column, row.get(column), keys)
    system = row.string("system", required=False) if column == "conversations" else None
    if system:
        if messages[0].role == "system":
            raise row.fail("both a 'system' column and a system message; keep one")
        messages = (Message("system", system), *messages)
    check_turns(row, column, messages, tools)
    return messages


def describe(value: Any) -> str:
    if isinstance(value, (str, bool, int, float)) or value is None:
        text = repr(value)
        return f"{type(value).__name__} {text[:40]}" if value is not None else "nothing"
    return type(value).__name__
