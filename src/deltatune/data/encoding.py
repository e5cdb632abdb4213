"""Records -> token ids and labels, rendered with the model's chat template (or a plain one).

A conversation is rendered once; each target assistant message is the text between the
rendering of the messages before it with the generation prompt (``...<|im_start|>assistant\\n``)
and the rendering that includes it. Pieces are tokenised separately, so a target's tokens are
exactly what the model would generate after that prompt. A target is labelled through the
tokenizer's eos (the end-of-turn token of chat templates); what a template appends after it (e.g.
a newline) stays in the input, unlabelled, or is dropped after the last target. Every other
token gets label ``IGNORE_INDEX`` (-100) unless ``train_on_prompt``.

Without a chat template, ``PLAIN_TEMPLATE`` renders ``Question: ...\\nAnswer: ...<eos>``.

Tools: a template that renders ``tool_calls`` itself (e.g. Qwen2.5's) gets the messages as they
are and ``tools=`` the schemas. Any other template (SmolLM2's ignores tools) gets the plain tool
layout, in ordinary system/user/assistant turns::

    system:    [its system text, blank line] You can call these functions: <tools> one schema per line </tools> ...
    assistant: [its text, newline] <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
    user:      <tool_response>\\nresult\\n</tool_response>   (consecutive results in one turn)

Either way the calls are assistant text, so they carry loss; tool results never do.

Truncation: SFT keeps the first ``max_length`` tokens (``truncation_side="right"``) or the last
(``"left"``); an example left with no labelled token is dropped. Each is counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deltatune.data.records import Conversation, Message, Record, TextExample, ToolCall
from deltatune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

Example = dict[str, list[int]]

PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Question: ' + message['content'] + '\n' }}"
    "{%- else -%}{{ 'Answer: ' + message['content'] + eos_token + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)
TOOLS_PREAMBLE = (
    "You can call these functions:\n<tools>\n{schemas}\n</tools>\nTo call one, answer with <tool_call>\n"
    '{{"name": <function name>, "arguments": <JSON object>}}\n</tool_call>; its result comes back in '
    "<tool_response></tool_response>."
)
TRUNCATION_SIDES = ("right", "left")


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template, else ``PLAIN_TEMPLATE`` (which needs an eos token)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if tokenizer.eos_token is None:
        raise DataError("the plain Question/Answer format needs a tokenizer with an eos token; set tokenizer.eos_token")
    return PLAIN_TEMPLATE


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    add_generation_prompt: bool = False,
    tools: str | None = None,
) -> str:
    """The text of ``messages`` in the tokenizer's chat format (``tools``: JSON text of function schemas)."""
    dicts, tools_arg, _ = _layout(tokenizer, messages, tools)
    return _apply(tokenizer, dicts, tools_arg, add_generation_prompt)


def _apply(
    tokenizer: PreTrainedTokenizerBase, dicts: list[dict], tools: list | None, add_generation_prompt: bool
) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        dicts,
        chat_template=chat_template(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def _layout(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], tools: str | None
) -> tuple[list[dict[str, Any]], list | None, list[int]]:
    """(template dicts, the ``tools`` argument, the dict index of each message): as they are for a
    template that renders tool calls, else the plain tool layout (module docstring)."""
    if "tool_calls" in chat_template(tokenizer):
        return [m.as_dict() for m in messages], json.loads(tools) if tools else None, list(range(len(messages)))
    out: list[Message] = []
    index: list[int] = []
    if tools:
        preamble = TOOLS_PREAMBLE.format(
            schemas="\n".join(json.dumps(s, ensure_ascii=False) for s in json.loads(tools))
        )
        out.append(Message("system", preamble))
    for message in messages:
        if message.role == "tool":
            result = f"<tool_response>\n{message.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = Message("user", f"{out[-1].content}\n{result}")
            else:
                out.append(Message("user", result))
        elif message.role == "system" and tools:
            out[0] = Message("system", f"{message.content}\n\n{out[0].content}")
        else:
            text = "\n".join([message.content] * bool(message.content) + [_call_text(c) for c in message.tool_calls])
            out.append(Message(message.role, text))
        index.append(len(out) - 1)
    return [m.as_dict() for m in out], None, index


def _call_text(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": json.loads(call.arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], tools: str | None = None) -> list[int]:
    """Token ids that ask the model for the next assistant message (for generation)."""
    return _tokenize(tokenizer, render(tokenizer, messages, add_generation_prompt=True, tools=tools), first=True)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, train_on_prompt: bool = False
) -> Example:
    """Label every assistant message, tool calls included (messages after the last one are dropped)."""
    targets = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    return _encode(tokenizer, conversation.messages, targets, train_on_prompt, conversation.tools)


def encode_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[Message],
    completion: Sequence[Message],
    train_on_prompt: bool = False,
    tools: str | None = None,
) -> Example:
    """Label only ``completion`` (assistant turns inside ``prompt`` stay unlabelled): DPO and KTO."""
    messages = (*prompt, *completion)
    return _encode(tokenizer, messages, list(range(len(prompt), len(messages))), train_on_prompt, tools)


def encode_text(tokenizer: PreTrainedTokenizerBase, example: TextExample) -> Example:
    """Plain language modelling: the text (with the tokenizer's special tokens) plus eos, all labelled."""
    ids = _tokenize(tokenizer, example.text, first=True)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": list(ids)}


def truncate(example: Example, max_length: int, side: str = "right") -> Example:
    """Keep the first (``side="right"``: cut the end) or the last (``"left"``) ``max_length`` tokens of
    every list in ``example``."""
    if side not in TRUNCATION_SIDES:
        raise DataError(f"truncation_side={side!r} is unknown; use right (keep the start) or left (keep the end)")
    return {key: values[:max_length] if side == "right" else values[-max_length:] for key, values in example.items()}


def has_target(example: Example) -> bool:
    """Whether a label is left to score (position 0 is never predicted: labels shift left by one)."""
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


@dataclass
class EncodedSet:
    """Encoded examples and what truncation did to them, counted by reason."""

    examples: list[Example]
    n_truncated: int  # examples longer than max_length (cut, or dropped)
    n_dropped: int  # of those, examples that could not keep a labelled token (not in ``examples``)
    reasons: Counter = field(default_factory=Counter)  # "prompt cut from the left" -> examples

    @property
    def n_tokens(self) -> int:
        """Tokens over every ``*input_ids`` list (a DPO example holds a chosen and a rejected one)."""
        return sum(len(ids) for e in self.examples for key, ids in e.items() if key.endswith("input_ids"))

    def summary(self, max_length: int) -> str:
        """One line for the run's log: "120 examples, 5,431 tokens; 7 longer than max_length=64 (...: 7)"."""
        line = f"{len(self.examples)} examples, {self.n_tokens:,} tokens"
        if self.n_truncated:
            detail = ", ".join(f"{reason}: {count}" for reason, count in self.reasons.items())
            line += f"; {self.n_truncated} longer than max_length={max_length} ({detail})"
        return line


def encode_records(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    max_length: int,
    train_on_prompt: bool = False,
    truncation_side: str = "right",
) -> EncodedSet:
    """Encode SFT records (``Conversation`` or ``TextExample``), cut to ``max_length`` on ``truncation_side``,
    counting the cuts and the examples left with no labelled token (dropped)."""
    examples, reasons = [], Counter()
    for record in records:
        if isinstance(record, Conversation):
            example = encode_conversation(tokenizer, record, train_on_prompt)
        elif isinstance(record, TextExample):
            example = encode_text(tokenizer, record)
        else:
            raise DataError(f"SFT trains on conversations or text, got a {type(record).__name__}")
        if len(example["input_ids"]) > max_length:
            example = truncate(example, max_length, truncation_side)
            if not has_target(example):
                reasons["dropped, no answer token left"] += 1
                continue
            reasons["cut at the end" if truncation_side == "right" else "cut at the start"] += 1
        examples.append(example)
    dropped = reasons["dropped, no answer token left"]
    return EncodedSet(examples, sum(reasons.values()), dropped, +reasons)


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    targets: list[int],
    train_on_prompt: bool,
    tools: str | None = None,
) -> Example:
    if not targets:
        raise DataError("nothing to train on: the messages hold no assistant turn")
    dicts, tools_arg, index = _layout(tokenizer, messages[: targets[-1] + 1], tools)
    targets = [index[k] for k in targets]
    full = _apply(tokenizer, dicts, tools_arg, False)
    pieces: list[tuple[str, bool]] = []
    position = 0
    for k in targets:
        start = _apply(tokenizer, dicts[:k], tools_arg, True)
        end = _apply(tokenizer, dicts[: k + 1], tools_arg, False)
        if not (full.startswith(start) and full.startswith(end) and position <= len(start) <= len(end)):
            raise DataError(
                "the chat template's rendering of the prompt is not a prefix of the rendering with the answer; "
                "cannot tell where the answer starts (use a tokenizer whose template renders turns in order)"
            )
        pieces += [(full[position : len(start)], False), (full[len(start) : len(end)], True)]
        position = len(end)
    input_ids: list[int] = []
    labels: list[int] = []
    for n, (text, is_target) in enumerate(pieces):
        ids = _tokenize(tokenizer, text, first=n == 0)
        if not is_target:
            input_ids += ids
            labels += ids if train_on_prompt else [IGNORE_INDEX] * len(ids)
            continue
        answer = _through_last(ids, tokenizer.eos_token_id)
        tail = [] if n == len(pieces) - 1 else ids[len(answer) :]
        input_ids += answer + tail
        labels += answer + (tail if train_on_prompt else [IGNORE_INDEX] * len(tail))
    return {"input_ids": input_ids, "labels": labels}


def _through_last(ids: list[int], token_id: int | None) -> list[int]:
    """Cut ``ids`` after the last occurrence of ``token_id`` (unchanged if it is absent)."""
    if token_id not in ids:
        return ids
    return ids[: len(ids) - ids[::-1].index(token_id)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, first: bool) -> list[int]:
    """Token ids of ``text``; the tokenizer's own special tokens (e.g. BOS) are added only to the first
    piece of untemplated text, since a chat template writes its special tokens itself."""
    if not text:
        return []
    return tokenizer(text, add_special_tokens=first and not tokenizer.chat_template)["input_ids"]
