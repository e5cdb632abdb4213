"""The normalised records every data format becomes: small, frozen (hashable) dataclasses.

SFT trains on ``Conversation`` (loss on every assistant message) or ``TextExample`` (loss on
every token); DPO on ``PreferencePair``; KTO on ``KTOExample``; sequence classification on
``LabelledText``. Message lists are tuples of ``Message`` so records can be compared and hashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        """The ``{"role": ..., "content": ...}`` dict chat templates take."""
        return {"role": self.role, "content": self.content}


Messages = tuple[Message, ...]


@dataclass(frozen=True)
class Conversation:
    """An SFT example: messages in order; every assistant message is a training target."""

    messages: Messages

    @property
    def prompt(self) -> Messages:
        """The messages before the first assistant message (what a model is asked)."""
        first = next(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:first]


@dataclass(frozen=True)
class TextExample:
    """Plain language-modelling text (the ``text`` format): every token is a training target."""

    text: str


@dataclass(frozen=True)
class PreferencePair:
    """A DPO example: one prompt, a preferred (``chosen``) and a dispreferred (``rejected``) completion.

    ``prompt`` ends with a user message; ``chosen`` and ``rejected`` are assistant message(s).
    """

    prompt: Messages
    chosen: Messages
    rejected: Messages


@dataclass(frozen=True)
class KTOExample:
    """A KTO example: one prompt and one completion, ``label`` True when it is desirable."""

    prompt: Messages
    completion: Messages
    label: bool


@dataclass(frozen=True)
class LabelledText:
    """A sequence-classification example: a text and its class name."""

    text: str
    label: str


Record = Union[Conversation, TextExample, PreferencePair, KTOExample, LabelledText]

# The kind of training each record type feeds (``Dataset.kind``).
KINDS: dict[type, str] = {
    Conversation: "sft",
    TextExample: "sft",
    PreferencePair: "preference",
    KTOExample: "kto",
    LabelledText: "classification",
}


def prompt_key(record: Record) -> str:
    """The text that identifies a record's prompt; records sharing it stay in one split."""
    if isinstance(record, (TextExample, LabelledText)):
        return record.text
    user = [m.content for m in record.prompt if m.role == "user"]
    return user[0] if user else ""
