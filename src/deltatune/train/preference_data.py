"""Preference records -> tokenised examples -> batches, for the pair trainers (DPO, ORPO, SimPO, reward
model) and KTO.

Tokenised examples (lists of ids; labels are -100 on the prompt, so only the completion scores)::

    DPO: {"chosen_input_ids": prompt + chosen,     "chosen_labels": [-100] * len(prompt) + chosen,
          "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected}
    KTO: {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion, "label": True}

A DPO batch stacks the chosen rows over the rejected rows (``input_ids``, ``attention_mask``,
``labels``: [2 * batch, seq]), so one forward pass scores both. A KTO batch holds ``input_ids``,
``attention_mask``, ``labels``, ``desirable`` (bool), and the same three keys prefixed ``kl_`` for
the mismatched pairs its KL term is estimated from: row i's prompt with row i−1's completion
(cyclically, as TRL does).

Too-long rows keep the end of the prompt and the start of the answer (``fit``), so a long prompt
costs its beginning, not the row; every cut and drop is counted by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from deltatune.data.collate import collate_causal
from deltatune.data.encoding import (
    IGNORE_INDEX,
    EncodedSet,
    Example,
    encode_completion,
    has_target,
)
from deltatune.data.records import KTOExample, PreferencePair
from deltatune.errors import DataError


def encode_preference_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    max_length: int,
    max_prompt_length: int | None = None,
) -> EncodedSet:
    """Tokenise pairs with the chat template (with the pair's ``margin``, when it has one); a pair longer than
    ``max_length`` is cut by ``fit``."""
    examples, reasons, n_truncated = [], Counter(), 0
    for pair in pairs:
        sides = {
            "chosen": encode_completion(tokenizer, pair.prompt, pair.chosen, tools=pair.tools),
            "rejected": encode_completion(tokenizer, pair.prompt, pair.rejected, tools=pair.tools),
        }
        n_truncated += max(len(side["input_ids"]) for side in sides.values()) > max_length
        sides = fit(sides, max_length, max_prompt_length, reasons)
        if sides is not None:
            example = {f"{name}_{key}": ids for name, side in sides.items() for key, ids in side.items()}
            examples.append(example if pair.margin is None else {**example, "margin": pair.margin})
    return EncodedSet(examples, n_truncated, sum(n for r, n in reasons.items() if r.startswith("dropped")), reasons)


def encode_kto_examples(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[KTOExample],
    max_length: int,
    max_prompt_length: int | None = None,
) -> EncodedSet:
    """Tokenise KTO examples with the chat template; one longer than ``max_length`` is cut by ``fit``."""
    examples, reasons, n_truncated = [], Counter(), 0
    for record in records:
        example = encode_completion(tokenizer, record.prompt, record.completion, tools=record.tools)
        n_truncated += len(example["input_ids"]) > max_length
        fitted = fit({"completion": example}, max_length, max_prompt_length, reasons)
        if fitted is not None:
            examples.append({**fitted["completion"], "label": bool(record.label)})
    return EncodedSet(examples, n_truncated, sum(n for r, n in reasons.items() if r.startswith("dropped")), reasons)


def fit(
    sides: dict[str, Example], max_length: int, max_prompt_length: int | None, reasons: Counter
) -> dict[str, Example] | None:
    """Cut examples that share a prompt (the tokens before the first label) to ``max_length``::

        prompt kept = min(prompt, max(max_prompt_length, max_length - longest answer))   # cut from the left
        answer kept = max_length - prompt kept                                          # cut from the right

    ``max_prompt_length`` defaults to half of ``max_length``. Counts each cut in ``reasons``; None
    (counted as dropped) when no answer token would be left to score.
    """
    longest = max(len(side["input_ids"]) for side in sides.values())
    if longest <= max_length:
        return sides
    start = _first_label(next(iter(sides.values())))
    limit = max_length // 2 if max_prompt_length is None else max_prompt_length
    kept = min(start, max(limit, max_length - (longest - start)))
    cut = {
        name: {key: ids[start - kept : start - kept + max_length] for key, ids in side.items()}
        for name, side in sides.items()
    }
    if not all(has_target(side) for side in cut.values()):
        reasons["dropped, no answer token fits after the prompt"] += 1
        return None
    if kept < start:
        reasons["prompt cut from the left"] += 1
    if longest - start > max_length - kept:
        reasons["answer cut from the right"] += 1
    return cut


def _first_label(example: Example) -> int:
    return next((i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX), len(example["labels"]))


@dataclass
class PreferenceCollator:
    """Right-pads tokenised pairs into one batch: the chosen rows, then the rejected rows; plus ``margin``
    [pairs] when the examples carry one (a reward model's margin column)."""

    pad_token_id: int

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [
            {"input_ids": example[f"{side}_input_ids"], "labels": example[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for example in examples
        ]
        batch = collate_causal(rows, self.pad_token_id)
        margins = [example.get("margin") for example in examples]
        if any(margin is not None for margin in margins):
            if None in margins:
                raise DataError("some pairs have a margin and some do not; give every row a margin, or none")
            batch["margin"] = torch.tensor(margins, dtype=torch.float32)
        return batch


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
