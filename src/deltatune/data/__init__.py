"""Training data: files and datasets -> validated records -> token ids and labels.

The layer has three steps, each usable on its own:

1. **Read and validate** (no model, no tokenizer)::

       data = load_records("train.jsonl")              # or .json .csv .tsv .parquet, a save_to_disk
                                                       # folder ("folder#test" picks a split), a
                                                       # datasets.Dataset, or a built-in name
       data.format, data.kind, len(data)               # "messages", "sft", 1234
       data.records[0]                                 # Conversation(messages=(Message(...), ...))

   ``data_format="auto"`` detects the format from the columns (see ``formats``): TRL ``messages``,
   ``prompt``/``completion``, ``text``, Alpaca, ShareGPT, preference ``prompt``/``chosen``/
   ``rejected``, KTO ``prompt``/``completion``/``label``, ``text``/``label`` classification.
   Every row is checked; the first bad one raises ``DataError`` naming the source, the 1-based
   row and the problem, e.g. ``train.jsonl: row 7: column 'completion' is an empty completion``.

2. **Records** (``records``), frozen dataclasses with message tuples:

   - ``Conversation(messages)``: SFT; every assistant message is a target (kind "sft").
   - ``TextExample(text)``: SFT on raw text, every token a target (kind "sft").
   - ``PreferencePair(prompt, chosen, rejected)``: DPO (kind "preference").
   - ``KTOExample(prompt, completion, label)``: KTO, ``label`` True = desirable (kind "kto").
   - ``LabelledText(text, label)``: sequence classification (kind "classification").

   A ``Message(role, content)`` has role "system", "user" or "assistant"; ``prompt`` fields end
   with a non-assistant message and completions are assistant messages. ``unpair(pairs)`` turns
   preference pairs into KTO examples. ``split_records(records, eval_fraction, seed)`` splits
   deterministically, keeping every record of one prompt on one side.

3. **Encode** (``encoding``, ``collate``) with the model's chat template (``PLAIN_TEMPLATE`` when
   the tokenizer has none):

   - ``encode_conversation(tokenizer, conversation, train_on_prompt=False)`` and
     ``encode_completion(tokenizer, prompt, completion)`` return ``{"input_ids", "labels"}`` lists,
     labels -100 outside the targets; ``encode_completion`` labels only ``completion`` (DPO/KTO:
     encode ``prompt`` + ``chosen`` and ``prompt`` + ``rejected``).
   - ``encode_records(tokenizer, records, max_length, train_on_prompt)`` -> ``EncodedSet`` with the
     examples and the counts of truncated / dropped ones; ``truncate(example, max_length)``.
   - ``prompt_ids(tokenizer, messages)`` and ``render(...)`` for generation.
   - ``collate_causal(batch, pad_token_id)`` pads; ``pack_examples(examples, max_length)`` packs.

Built-in sources (``chatterbot``): "chatterbot" (SFT), "chatterbot-topics" (classification), and the
SYNTHETIC "chatterbot-preference-synthetic" and "chatterbot-kto-synthetic" (rejected answers are
other questions' answers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .chatterbot import BUILTIN, unpair
from .collate import collate_causal, pack_examples
from .encoding import (
    IGNORE_INDEX,
    PLAIN_TEMPLATE,
    EncodedSet,
    encode_completion,
    encode_conversation,
    encode_records,
    encode_text,
    prompt_ids,
    render,
    truncate,
)
from .formats import FORMATS, detect_format, normalise
from .readers import read_table
from .records import (
    KINDS,
    Conversation,
    KTOExample,
    LabelledText,
    Message,
    PreferencePair,
    Record,
    TextExample,
)
from .split import split_records

__all__ = [
    "BUILTIN",
    "FORMATS",
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "Conversation",
    "DataError",
    "EncodedSet",
    "KTOExample",
    "LabelledText",
    "Message",
    "PreferencePair",
    "Record",
    "RecordSet",
    "TextExample",
    "collate_causal",
    "detect_format",
    "encode_completion",
    "encode_conversation",
    "encode_records",
    "encode_text",
    "load_records",
    "pack_examples",
    "prompt_ids",
    "render",
    "split_records",
    "truncate",
    "unpair",
]


@dataclass
class RecordSet:
    """Validated records of one source, all of one format."""

    source: str
    format: str
    records: list[Record]

    @property
    def kind(self) -> str:
        """"sft", "preference", "kto" or "classification" (what the records train)."""
        return KINDS[type(self.records[0])]

    def __len__(self) -> int:
        return len(self.records)


def load_records(source: str | os.PathLike | Any, data_format: str = "auto", split: str | None = None) -> RecordSet:
    """Read ``source`` and validate every row into records (see the module docstring).

    ``source``: a data file, a ``save_to_disk`` folder, a ``datasets.Dataset``/``DatasetDict``, or a
    built-in name (``BUILTIN``). ``data_format``: "auto" or a ``FORMATS`` name. ``split``: the
    ``DatasetDict`` split (default "train").
    """
    if isinstance(source, str) and source in BUILTIN:
        records = BUILTIN[source]()
        fmt = {"sft": "messages"}.get(KINDS[type(records[0])], KINDS[type(records[0])])
        if data_format not in ("auto", fmt):
            raise DataError(f"data={source!r} is built in, in the {fmt} format; drop data_format={data_format!r}")
        return RecordSet(source, fmt, records)
    table = read_table(source, split)
    fmt, records = normalise(table, data_format)
    return RecordSet(table.name, fmt, records)
