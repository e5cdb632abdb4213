"""Training data: files and datasets -> validated records -> token ids and labels.

The layer has three steps, each usable on its own:

1. **Read and validate** (no model, no tokenizer)::

       data = load_records("train.jsonl")              # or .json .csv .tsv .parquet, a save_to_disk
                                                       # folder ("folder#test" picks a split), a
                                                       # datasets.Dataset, or a built-in name
       data.format, data.kind, len(data)               # "messages", "sft", 1234
       data.records[0]                                 # Conversation(messages=(Message(...), ...))

   ``data_format="auto"`` detects the format from the columns (see ``formats``): TRL ``messages``
   (with tool calls), ``prompt``/``completion``, ``text``, Alpaca, ShareGPT (with
   ``function_call``/``observation`` turns), preference (``chosen``/``rejected`` with a prompt, a
   TRL conversation or a sharegpt one), KTO (a ``label`` or ``kto_tag`` with prompt/completion, TRL
   messages or sharegpt), ``text``/``label`` classification. ``columns=`` maps other column names
   (``mapping``), ``"dataset_info.json#name"`` reads a LLaMA-Factory entry (``dataset_info``), and a
   column no format step reads is an error unless ``ignore_columns`` lists it. Every row is
   checked; the first bad one raises ``DataError`` naming the source, the 1-based row and the
   problem, e.g. ``train.jsonl: row 7: column 'completion' is an empty completion``.
   ``load_sources("a.jsonl,b.jsonl")`` reads several; ``mix(records, sources, weights)`` resizes
   them by ``data_weights`` (``mixing``). Every record keeps its ``origin`` (source, row).

2. **Records** (``records``), frozen dataclasses with message tuples:

   - ``Conversation(messages, tools)``: SFT; every assistant message (tool calls included) is a
     target (kind "sft").
   - ``TextExample(text)``: SFT on raw text, every token a target (kind "sft").
   - ``PreferencePair(prompt, chosen, rejected)``: DPO (kind "preference").
   - ``KTOExample(prompt, completion, label)``: KTO, ``label`` True = desirable (kind "kto").
   - ``LabelledText(text, label)``: sequence classification (kind "classification").
   - ``PromptOnly(prompt, text, columns)``: GRPO's prompts, with every other column of the row (kind "prompt").

   A ``Message(role, content, tool_calls)`` has role "system", "user", "assistant" or "tool";
   ``prompt`` fields end with a non-assistant message and completions are assistant messages. ``unpair(pairs)`` turns
   preference pairs into KTO examples. ``split_records(records, eval_fraction, seed)`` splits
   deterministically, keeping every record of one prompt on one side.

3. **Encode** (``encoding``, ``collate``) with the model's chat template (``PLAIN_TEMPLATE`` when
   the tokenizer has none):

   - ``encode_conversation(tokenizer, conversation, train_on_prompt=False)`` and
     ``encode_completion(tokenizer, prompt, completion)`` return ``{"input_ids", "labels"}`` lists,
     labels -100 outside the targets; ``encode_completion`` labels only ``completion`` (DPO/KTO:
     encode ``prompt`` + ``chosen`` and ``prompt`` + ``rejected``).
   - ``encode_records(tokenizer, records, max_length, train_on_prompt, truncation_side)`` ->
     ``EncodedSet`` with the examples and the counts of cut / dropped ones by reason;
     ``truncate(example, max_length, side)``. Tools render through the template's own tool
     support, else a plain ``<tools>``/``<tool_call>``/``<tool_response>`` layout (``encoding``).
   - ``prompt_ids(tokenizer, messages)`` and ``render(...)`` for generation.
   - ``collate_causal(batch, pad_token_id)`` pads; ``pack_examples(examples, max_length)`` packs.

Built-in sources (``chatterbot``): "chatterbot" (SFT), "chatterbot-topics" (classification), and the
SYNTHETIC "chatterbot-preference-synthetic" and "chatterbot-kto-synthetic" (rejected answers are
other questions' answers).
"""

from __future__ import annotations

from deltatune.data.chatterbot import BUILTIN, unpair
from deltatune.data.collate import collate_causal, pack_examples
from deltatune.data.encoding import (
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
from deltatune.data.formats import FORMATS, detect_format
from deltatune.data.mapping import ColumnMap
from deltatune.data.mixing import Mixed, mix, parse_weights
from deltatune.data.records import (
    Conversation,
    KTOExample,
    LabelledText,
    Message,
    PreferencePair,
    PromptOnly,
    Record,
    TextExample,
    ToolCall,
)
from deltatune.data.sources import (
    RecordSet,
    check_sources,
    load_records,
    load_sources,
    split_sources,
)
from deltatune.data.split import split_records
from deltatune.errors import DataError

__all__ = [
    "BUILTIN",
    "FORMATS",
    "ColumnMap",
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "Conversation",
    "DataError",
    "EncodedSet",
    "KTOExample",
    "LabelledText",
    "Message",
    "Mixed",
    "PreferencePair",
    "PromptOnly",
    "Record",
    "RecordSet",
    "TextExample",
    "ToolCall",
    "check_sources",
    "collate_causal",
    "detect_format",
    "encode_completion",
    "encode_conversation",
    "encode_records",
    "encode_text",
    "load_records",
    "load_sources",
    "mix",
    "pack_examples",
    "parse_weights",
    "prompt_ids",
    "render",
    "split_records",
    "split_sources",
    "truncate",
    "unpair",
]
