"""Data formats: detect one from a table's columns and normalise every row to a record.

| format                | columns (+ optional)                                     | record         |
|-----------------------|----------------------------------------------------------|----------------|
| ``sharegpt_preference`` | ``conversations``, ``chosen``, ``rejected`` (+ system, tools, margin) | PreferencePair |
| ``alpaca_preference`` | ``instruction``, ``chosen``, ``rejected`` (+ input, system, history, margin) | PreferencePair
| ``preference``        | ``chosen``, ``rejected`` (+ prompt, tools, margin)       | PreferencePair |
| ``sharegpt_kto``      | ``conversations``, ``label`` or ``kto_tag`` (+ system, tools) | KTOExample |
| ``messages_kto``      | ``messages``, ``label`` or ``kto_tag`` (+ tools)         | KTOExample     |
| ``kto``               | ``prompt``, ``completion``, ``label`` or ``kto_tag`` (+ tools) | KTOExample |
| ``messages``          | ``messages``: [{role, content}, ...] (TRL) (+ tools)     | Conversation   |
| ``sharegpt``          | ``conversations``: [{from, value}, ...] (+ system, tools) | Conversation  |
| ``alpaca``            | ``instruction``, ``output`` (+ input, system, history)   | Conversation   |
| ``prompt_completion`` | ``prompt``, ``completion`` (+ tools)                     | Conversation   |
| ``classification``    | ``text``, ``label``                                      | LabelledText   |
| ``text``              | ``text``                                                 | TextExample    |
| ``prompt``            | ``prompt`` (+ any other columns, kept for reward functions) | PromptOnly  |

Detection takes the first format, in this order, whose required columns the first row has. A
column the format does not read is an error (naming it and the likely intended stage or format)
unless ``ignore_columns`` lists it. ``prompt``/``completion``/``chosen``/``rejected`` are strings
(a user prompt, an assistant answer) or TRL message lists; sharegpt's ``chosen``/``rejected`` are
one message object or a list. A KTO conversation's completion is its final assistant message(s). A
preference row's optional ``margin`` (a number) is how much better chosen is, for a reward model. A
``prompt`` row (GRPO's prompt-only data) keeps every other column as it is, for the reward functions.

Tool use: TRL assistant messages carry ``tool_calls`` (``[{"type": "function", "function": {"name",
"arguments"}}]``) and results come as ``tool`` messages; in sharegpt a ``function_call`` turn holds
the call as JSON text (``{"name", "arguments"}`` or a list of them) and an ``observation`` turn the
result. ``tools`` is a JSON list of function schemas (or its JSON text); every call must name one.
Every problem is a ``DataError`` naming the source, the 1-based row and the problem.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from deltatune.data.mapping import ColumnMap
from deltatune.data.messages import (
    TRL_KEYS,
    MessageKeys,
    Row,
    check_turns,
    conversation_messages,
    describe,
    parse_message,
    parse_messages,
    row_tools,
    sharegpt_keys,
)
from deltatune.data.readers import Table
from deltatune.data.records import (
    Conversation,
    KTOExample,
    LabelledText,
    Message,
    Messages,
    Origin,
    PreferencePair,
    PromptOnly,
    Record,
    TextExample,
)
from deltatune.errors import DataError

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
    "response": 'LLaMA-Factory\'s alpaca names: map them with columns=\'{"prompt": ..., "response": ...}\'',
    "query": 'LLaMA-Factory\'s alpaca names: map them with columns=\'{"prompt": ..., "query": ...}\'',
}


@dataclass(frozen=True)
class Format:
    """A data format: the columns that identify it ("a|b": either), those it may read, and its row normaliser;
    an ``open`` format keeps every other column too."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    normalise: Callable[[Row], Record]
    open: bool = False

    def matches(self, columns: Collection[str]) -> bool:
        return all(any(c in columns for c in names.split("|")) for names in self.required)

    @property
    def columns(self) -> set[str]:
        """Every column this format reads."""
        return {c for names in self.required for c in names.split("|")} | set(self.optional)


def _conversation(row: Row, column: str) -> Conversation:
    tools, names = row_tools(row)
    messages = conversation_messages(row, column, names)
    if not any(m.role == "assistant" for m in messages):
        raise row.fail(f"{column!r} has no assistant message to train on")
    return Conversation(messages, tools)


def _prompt(row: Row, column: str = "prompt") -> Messages:
    """A prompt: a user string, or messages ending with a non-assistant turn."""
    value = row.get(column)
    if isinstance(value, str):
        return (Message("user", value),)
    return _ends_with_question(row, column, parse_messages(row, column, value))


def _ends_with_question(row: Row, column: str, messages: Messages) -> Messages:
    if messages[-1].role == "assistant":
        raise row.fail(f"column {column!r} must end with a user (or tool) message, not an assistant one")
    return messages


def _completion(row: Row, column: str, keys: MessageKeys = TRL_KEYS) -> Messages:
    """A completion: an assistant string, one message object, or non-empty assistant messages."""
    value = row.get(column)
    if isinstance(value, str):
        return _checked_completion(row, column, (Message("assistant", value),))
    if isinstance(value, dict):
        return _checked_completion(row, column, (parse_message(row, f"column {column!r}", value, keys),))
    return _checked_completion(row, column, parse_messages(row, column, value, keys))


def _checked_completion(row: Row, column: str, messages: Messages) -> Messages:
    if not messages:
        raise row.fail(f"column {column!r} has no completion after the prompt it shares")
    for message in messages:
        if message.role != "assistant":
            raise row.fail(f"column {column!r} holds a {message.role} message; completions are assistant messages")
        if not (message.content.strip() or message.tool_calls):
            raise row.fail(f"column {column!r} is an empty completion")
    return messages


def _alpaca_prompt(row: Row) -> Messages:
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


def _alpaca(row: Row) -> Conversation:
    output = row.string("output")
    if not output.strip():
        raise row.fail("column 'output' is an empty completion")
    return Conversation(_alpaca_prompt(row) + (Message("assistant", output),))


def _prompt_completion(row: Row) -> Conversation:
    tools, names = row_tools(row)
    messages = _prompt(row) + _completion(row, "completion")
    check_turns(row, "prompt", messages, names)
    return Conversation(messages, tools)


def _prompt_only(row: Row) -> PromptOnly:
    value = row.get("prompt")
    if isinstance(value, str) and not value.strip():
        raise row.fail("column 'prompt' is empty")
    columns = tuple((name, value) for name, value in row.data.items() if name != "prompt")
    return PromptOnly(_prompt(row), value if isinstance(value, str) else None, columns)


def _text(row: Row) -> TextExample:
    text = row.string("text")
    if not text.strip():
        raise row.fail("column 'text' is empty")
    return TextExample(text)


def _classification(row: Row) -> LabelledText:
    text, label = row.string("text"), row.get("label")
    if not text.strip():
        raise row.fail("column 'text' is empty")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise row.fail(f"column 'label' must be a class name or number, got {describe(label)}")
    return LabelledText(text, str(label))


def _label(row: Row) -> bool:
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
    raise row.fail(f"column {present[0]!r} must be true or false, got {describe(label)}")


def _kto(row: Row) -> KTOExample:
    tools, names = row_tools(row)
    prompt, completion = _prompt(row), _completion(row, "completion")
    check_turns(row, "prompt", prompt + completion, names)
    return KTOExample(prompt, completion, _label(row), tools)


def _kto_conversation(column: str) -> Callable[[Row], KTOExample]:
    """KTO from a conversation: its final assistant message(s) are the completion, the rest the prompt."""

    def normalise(row: Row) -> KTOExample:
        tools, names = row_tools(row)
        messages = conversation_messages(row, column, names)
        start = len(messages)
        while start and messages[start - 1].role == "assistant":
            start -= 1
        if start == len(messages) or start == 0:
            raise row.fail(f"column {column!r} must end with the assistant answer the label judges, after a prompt")
        return KTOExample(messages[:start], messages[start:], _label(row), tools)

    return normalise


def _preference(row: Row) -> PreferencePair:
    """With a ``prompt`` column, chosen/rejected are completions; without one they are whole
    conversations and the prompt is their longest shared prefix that ends before an assistant turn."""
    tools, names = row_tools(row)
    if row.get("prompt", required=False) is not None:
        pair = PreferencePair(_prompt(row), _completion(row, "chosen"), _completion(row, "rejected"), tools)
        return _distinct(row, pair, names)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise row.fail("missing column 'prompt' (needed when chosen and rejected are strings)")
    chosen, rejected = parse_messages(row, "chosen", chosen), parse_messages(row, "rejected", rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role == "assistant":
        shared -= 1
    if shared == 0:
        raise row.fail("chosen and rejected share no prompt; add a 'prompt' column")
    return _distinct(
        row,
        PreferencePair(
            chosen[:shared],
            _checked_completion(row, "chosen", chosen[shared:]),
            _checked_completion(row, "rejected", rejected[shared:]),
            tools,
        ),
        names,
    )


def _sharegpt_preference(row: Row) -> PreferencePair:
    """The conversation is the prompt; chosen and rejected are one message object or a list."""
    tools, names = row_tools(row)
    prompt = _ends_with_question(row, "conversations", conversation_messages(row, "conversations", names))
    keys = sharegpt_keys(row)
    pair = PreferencePair(prompt, _completion(row, "chosen", keys), _completion(row, "rejected", keys), tools)
    return _distinct(row, pair, names)


def _alpaca_preference(row: Row) -> PreferencePair:
    return _distinct(row, PreferencePair(_alpaca_prompt(row), _completion(row, "chosen"), _completion(row, "rejected")))


def _distinct(row: Row, pair: PreferencePair, tools: set[str] | None = None) -> PreferencePair:
    """``pair`` checked (well-formed turns, two different completions), with the row's ``margin``."""
    for side in ("chosen", "rejected"):
        check_turns(row, side, pair.prompt + getattr(pair, side), tools)
    if pair.chosen == pair.rejected:
        raise row.fail("chosen and rejected are the same completion; a pair must prefer one answer over another")
    margin = row.get("margin", required=False)
    return pair if margin is None else dataclasses.replace(pair, margin=_number(row, "margin", margin))


def _number(row: Row, column: str, value: object) -> float:
    """``value`` as a finite float (a number, or its text as a CSV gives it)."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise row.fail(f"column {column!r} must be a finite number, got {value!r}")
    return number


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "sharegpt_preference",
            ("conversations", "chosen", "rejected"),
            ("system", "tools", "margin"),
            _sharegpt_preference,
        ),
        Format(
            "alpaca_preference",
            ("instruction", "chosen", "rejected"),
            ("input", "system", "history", "margin"),
            _alpaca_preference,
        ),
        Format("preference", ("chosen", "rejected"), ("prompt", "tools", "margin"), _preference),
        Format(
            "sharegpt_kto", ("conversations", "label|kto_tag"), ("system", "tools"), _kto_conversation("conversations")
        ),
        Format("messages_kto", ("messages", "label|kto_tag"), ("tools",), _kto_conversation("messages")),
        Format("kto", ("prompt", "completion", "label|kto_tag"), ("tools",), _kto),
        Format("messages", ("messages",), ("tools",), lambda row: _conversation(row, "messages")),
        Format("sharegpt", ("conversations",), ("system", "tools"), lambda row: _conversation(row, "conversations")),
        Format("alpaca", ("instruction", "output"), ("input", "system", "history"), _alpaca),
        Format("prompt_completion", ("prompt", "completion"), ("tools",), _prompt_completion),
        Format("classification", ("text", "label"), (), _classification),
        Format("text", ("text",), (), _text),
        Format("prompt", ("prompt",), (), _prompt_only, open=True),
    )
}
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
        row = Row(table.name, number, data, mapping)
        extra = [column for column in data if column not in allowed and not fmt.open]
        if extra:
            hint = _HINTS.get(extra[0], f"the {name} format reads {', '.join(sorted(fmt.columns))}")
            raise row.fail(
                f"column {extra[0]!r} is not read by the {name} format ({hint}); list it in "
                f"ignore_columns={extra[0]} to leave it out"
            )
        records.append(dataclasses.replace(fmt.normalise(row), origin=Origin(table.name, number)))
    return name, records
