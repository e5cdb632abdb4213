"""Preference records -> tokenised examples -> batches, for the DPO and KTO trainers.

Tokenised examples (lists of ids; labels are -100 on the prompt, so only the completion scores)::

    DPO: {"chosen_input_ids": prompt + chosen,     "chosen_labels": [-100] * len(prompt) + chosen,
          "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected}
    KTO: {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion, "label": True}

A DPO batch stacks the chosen rows over the rejected rows (``input_ids``, ``attention_mask``,
``labels``: [2 * batch, seq]), so one forward pass scores both. A KTO batch holds ``input_ids``,
``attention_mask``, ``labels``, ``desirable`` (bool), and the same three keys prefixed ``kl_`` for
the mismatched pairs its KL term is estimated from: row i's prompt with row i−1's completion
(cyclically, as TRL does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..data.collate import collate_causal
from ..data.encoding import IGNORE_INDEX, EncodedSet, Example, encode_completion, truncate
from ..data.records import KTOExample, PreferencePair
from ..errors import DataError


def encode_preference_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], max_length: int
) -> EncodedSet:
    """Tokenise DPO pairs with the chat template; a pair longer than ``max_length`` is cut, and dropped
    when either side is left without a completion token."""
    examples, n_truncated, n_dropped = [], 0, 0
    for pair in pairs:
        sides = {
            "chosen": encode_completion(tokenizer, pair.prompt, pair.chosen),
            "rejected": encode_completion(tokenizer, pair.prompt, pair.rejected),
        }
        if any(len(side["input_ids"]) > max_length for side in sides.values()):
            n_truncated += 1
            sides = {name: truncate(side, max_length) for name, side in sides.items()}
            if not all(_has_target(side) for side in sides.values()):
                n_dropped += 1
                continue
        examples.append({f"{name}_{key}": ids for name, side in sides.items() for key, ids in side.items()})
    return EncodedSet(examples, n_truncated, n_dropped)


def encode_kto_examples(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[KTOExample], max_length: int
) -> EncodedSet:
    """Tokenise KTO examples with the chat template; cut to ``max_length``, dropped when no completion token is left."""
    examples, n_truncated, n_dropped = [], 0, 0
    for record in records:
        example = encode_completion(tokenizer, record.prompt, record.completion)
        if len(example["input_ids"]) > max_length:
            n_truncated += 1
            example = truncate(example, max_length)
            if not _has_target(example):
                n_dropped += 1
                continue
        examples.append({**example, "label": bool(record.label)})
    return EncodedSet(examples, n_truncated, n_dropped)


def _has_target(example: Example) -> bool:
    """Whether a label is left to score (position 0 is never predicted)."""
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


@dataclass
class PreferenceCollator:
    """Right-pads tokenised DPO examples into one batch: the chosen rows, then the rejected rows."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        rows = [
            {"input_ids": example[f"{side}_input_ids"], "labels": example[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for example in examples
        ]
        return collate_causal(rows, self.pad_token_id)


def split_completion(example: Mapping[str, Sequence[int]]) -> tuple[list[int], Example]:
    """(prompt ids, completion ``{"input_ids", "labels"}``) of a tokenised example: the completion starts
    at the first labelled token."""
    labels = example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None:
        raise DataError("a KTO example has no completion tokens (every label is -100); drop it or shorten its prompt")
    ids = list(example["input_ids"])
    return ids[:start], {"input_ids": ids[start:], "labels": list(labels[start:])}


@dataclass
class KTOCollator:
    """Right-pads tokenised KTO examples and adds the mismatched prompt/completion pairs (cut to ``max_length``)."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_causal(examples, self.pad_token_id)
        parts = [split_completion(example) for example in examples]
        shifted = parts[-1:] + parts[:-1]
        mismatched = [
            {
                "input_ids": (prompt + completion["input_ids"])[: self.max_length],
                "labels": ([IGNORE_INDEX] * len(prompt) + completion["labels"])[: self.max_length],
            }
            for (prompt, _), (_, completion) in zip(parts, shifted)
        ]
        batch.update({f"kl_{key}": value for key, value in collate_causal(mismatched, self.pad_token_id).items()})
        batch["desirable"] = torch.tensor([bool(example["label"]) for example in examples])
        return batch
