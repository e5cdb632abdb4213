"""The normalised records every data format becomes: small, frozen (hashable) dataclasses.

SFT trains on ``Conversation`` (loss on every assistant message) or ``TextExample`` (loss on
every token); DPO on ``PreferencePair``; KTO on ``KTOExample``; sequence classification on
``LabelledText``. Message lists are tuples of ``Message`` so records can be compared and hashed.

Tool use: an assistant ``Message`` may carry ``tool_calls`` (``ToolCall(name, arguments)``, the
arguments as JSON object text), a "tool" message holds a call's result, and a record's ``tools``
is the JSON text of the function schemas the conversation may call. Each record remembers its
``origin`` (source and row), which is left out of comparisons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Origin:
    """Where a record came from: its data source and 1-based row (for error messages and counts)."""

    source: str
    row: int

    def __str__(self) -> str:
        return f"{self.source}: row {self.row}"


@dataclass(frozen=True)
class ToolCall:
    """One function call made by the assistant: the function's name and its arguments as JSON object text."""

    name: str
    arguments: str = "{}"

    def as_dict(self) -> dict[str, Any]:
        """The ``{"type": "function", "function": {"name", "arguments"}}`` dict chat templates take."""
        return {"type": "function", "function": {"name": self.name, "arguments": json.loads(self.arguments)}}


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` is "system", "user", "assistant" or "tool" (a tool call's result)."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The ``{"role": ..., "content": ...}`` dict chat templates take (plus ``tool_calls`` when it has some)."""
        if not self.tool_calls:
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": self.content, "tool_calls": [c.as_dict() for c in self.tool_calls]}


Messages = tuple[Message, ...]


def _origin() -> Any:
    return field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Conversation:
    """An SFT example: messages in order; every assistant message is a training target.
    ``tools``: JSON text of the functions it may call (None: no tools)."""

    messages: Messages
    tools: str | None = None
    origin: Origin | None = _origin()

    @property
    def prompt(self) -> Messages:
        """The messages before the first assistant message (what a model is asked)."""
        first = next(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:first]


@dataclass(frozen=True)
class TextExample:
    """Plain language-modelling text (the ``text`` format): every token is a training target."""

    text: str
    origin: Origin | None = _origin()


@dataclass(frozen=True)
class PreferencePair:
    """A preference pair: one prompt, a preferred (``chosen``) and a dispreferred (``rejected``) completion.

    ``prompt`` ends with a user message; ``chosen`` and ``rejected`` are assistant message(s). ``margin``:
    how much better chosen is (a reward model's optional margin column), None when the data has none.
    """

    prompt: Messages
    chosen: Messages
    rejected: Messages
    tools: str | None = None
    origin: Origin | None = _origin()
    margin: float | None = None


@dataclass(frozen=True)
class KTOExample:
    """A KTO example: one prompt and one completion, ``label`` True when it is desirable."""

    prompt: Messages
    completion: Messages
    label: bool
    tools: str | None = None
    origin: Origin | None = _origin()


@dataclass(frozen=True)
class LabelledText:
    """A sequence-classification example: a text and its class name."""

    text: str
    label: str
    origin: Origin | None = _origin()


@dataclass(frozen=True)
class PromptOnly:
    """A prompt with no answer (GRPO samples its own): ``prompt`` as messages; ``text`` the prompt as the data gave
    it when that was a plain string (TRL's standard format: tokenized as it is, no chat template), else None;
    ``columns`` every other column of the row, in order (the reward functions read them by name)."""

    prompt: Messages
    text: str | None = None
    columns: tuple[tuple[str, Any], ...] = ()
    origin: Origin | None = _origin()


Record = Conversation | TextExample | PreferencePair | KTOExample | LabelledText | PromptOnly

# The kind of training each record type feeds (``Dataset.kind``).
KINDS: dict[type, str] = {
    Conversation: "sft",
    TextExample: "sft",
    PreferencePair: "preference",
    KTOExample: "kto",
    LabelledText: "classification",
    PromptOnly: "prompt",
}


def prompt_key(record: Record) -> str:
    """The text that identifies a record's prompt; records sharing it stay in one split."""
    if isinstance(record, (TextExample, LabelledText)):
        return record.text
    user = [m.content for m in record.prompt if m.role == "user"]
    return user[0] if user else ""
