"""Records -> token ids and labels, rendered with the model's chat template (or a plain one).

A conversation is rendered once; each target assistant message is the text between the
rendering of the messages before it with the generation prompt (``...<|im_start|>assistant\\n``)
and the rendering that includes it. Pieces are tokenised separately, so a target's tokens are
exactly what the model would generate after that prompt. A target is labelled through the
tokenizer's eos (the end-of-turn token of chat templates); what a template appends after it (e.g.
a newline) stays in the input, unlabelled, or is dropped after the last target. Every other
token gets label ``IGNORE_INDEX`` (-100) unless ``train_on_prompt``.

Without a chat template, ``PLAIN_TEMPLATE`` renders ``Question: ...\\nAnswer: ...<eos>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .records import Conversation, Message, Record, TextExample

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


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template, else ``PLAIN_TEMPLATE`` (which needs an eos token)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if tokenizer.eos_token is None:
        raise DataError("the plain Question/Answer format needs a tokenizer with an eos token; set tokenizer.eos_token")
    return PLAIN_TEMPLATE


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The text of ``messages`` in the tokenizer's chat format."""
    return tokenizer.apply_chat_template(
        [m.as_dict() for m in messages],
        chat_template=chat_template(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids that ask the model for the next assistant message (for generation)."""
    return _tokenize(tokenizer, render(tokenizer, messages, add_generation_prompt=True), first=True)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, train_on_prompt: bool = False
) -> Example:
    """Label every assistant message (messages after the last one are dropped)."""
    targets = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    return _encode(tokenizer, conversation.messages, targets, train_on_prompt)


def encode_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[Message],
    completion: Sequence[Message],
    train_on_prompt: bool = False,
) -> Example:
    """Label only ``completion`` (assistant turns inside ``prompt`` stay unlabelled): DPO and KTO."""
    messages = (*prompt, *completion)
    return _encode(tokenizer, messages, list(range(len(prompt), len(messages))), train_on_prompt)


def encode_text(tokenizer: PreTrainedTokenizerBase, example: TextExample) -> Example:
    """Plain language modelling: the text (with the tokenizer's special tokens) plus eos, all labelled."""
    ids = _tokenize(tokenizer, example.text, first=True)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": list(ids)}


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first ``max_length`` tokens of every list in ``example``."""
    return {key: values[:max_length] for key, values in example.items()}


@dataclass
class EncodedSet:
    """Encoded SFT examples and what truncation did to them."""

    examples: list[Example]
    n_truncated: int  # examples longer than max_length, cut to it
    n_dropped: int  # of those, examples left with no labelled token (not in ``examples``)

    @property
    def n_tokens(self) -> int:
        """Tokens over every ``*input_ids`` list (a DPO example holds a chosen and a rejected one)."""
        return sum(len(ids) for e in self.examples for key, ids in e.items() if key.endswith("input_ids"))

    def summary(self, max_length: int) -> str:
        """One line for the run's log."""
        line = f"{len(self.examples)} examples, {self.n_tokens:,} tokens"
        if self.n_truncated:
            line += f"; {self.n_truncated} longer than max_length={max_length} were cut"
        if self.n_dropped:
            line += f" ({self.n_dropped} lost every labelled token and were dropped)"
        return line


def encode_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_length: int, train_on_prompt: bool = False
) -> EncodedSet:
    """Encode SFT records (``Conversation`` or ``TextExample``), cut to ``max_length``, counting the cuts."""
    examples, n_truncated, n_dropped = [], 0, 0
    for record in records:
        if isinstance(record, Conversation):
            example = encode_conversation(tokenizer, record, train_on_prompt)
        elif isinstance(record, TextExample):
            example = encode_text(tokenizer, record)
        else:
            raise DataError(f"SFT trains on conversations or text, got a {type(record).__name__}")
        if len(example["input_ids"]) > max_length:
            n_truncated += 1
            example = truncate(example, max_length)
            # Position 0 is never predicted (labels shift left by one), so it does not count.
            if all(label == IGNORE_INDEX for label in example["labels"][1:]):
                n_dropped += 1
                continue
        examples.append(example)
    return EncodedSet(examples, n_truncated, n_dropped)


def _encode(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], targets: list[int], train_on_prompt: bool
) -> Example:
    if not targets:
        raise DataError("nothing to train on: the messages hold no assistant turn")
    messages = list(messages[: targets[-1] + 1])
    full = render(tokenizer, messages)
    pieces: list[tuple[str, bool]] = []
    position = 0
    for k in targets:
        start = render(tokenizer, messages[:k], add_generation_prompt=True)
        end = render(tokenizer, messages[: k + 1])
        if not (full.startswith(start) and full.startswith(end) and position <= len(start) <= len(end)):
            raise DataError(
                "the chat template's rendering of the prompt is not a prefix of the rendering with the answer; "
                "cannot tell where the answer starts (use a tokenizer whose template renders turns in order)"
            )
        pieces += [(full[position : len(start)], False), (full[len(start) : len(end)], True)]
        position = len(end)
    input_ids: list[int] = []
    labels: list[int] = []
    for index, (text, is_target) in enumerate(pieces):
        ids = _tokenize(tokenizer, text, first=index == 0)
        if not is_target:
            input_ids += ids
            labels += ids if train_on_prompt else [IGNORE_INDEX] * len(ids)
            continue
        answer = _through_last(ids, tokenizer.eos_token_id)
        tail = [] if index == len(pieces) - 1 else ids[len(answer) :]
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

