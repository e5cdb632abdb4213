"""Batches for causal-LM training: right padding, padding-free rows, and packing several examples per row.

Packed rows carry ``position_ids`` that restart at 0 for every example and no attention mask;
transformers (>= 5) reads the restarts as sequence boundaries and builds a block-diagonal causal
mask, so packed examples do not attend to each other and each row computes exactly what its
examples would compute alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from deltatune.data.encoding import IGNORE_INDEX, Example

if TYPE_CHECKING:
    import torch


def collate_causal(batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into tensors.

    Padding gets ``pad_token_id`` in input_ids and -100 in labels. Unpacked examples get an
    attention_mask (0 on padding); packed ones (with ``position_ids``) get position ids that start
    a new segment at the padding, so no real token attends to it.
    """
    import torch  # here, so that reading and validating data never loads torch

    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    packed = "position_ids" in batch[0]
    extra = torch.zeros((len(batch), width), dtype=torch.long)  # attention mask, or position ids
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        if packed:
            extra[row, :n] = torch.tensor(example["position_ids"], dtype=torch.long)
            extra[row, n:] = torch.arange(width - n)
        else:
            extra[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids" if packed else "attention_mask": extra}


def collate_padding_free(batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The batch as one row, its examples back to back (longest first), positions restarting per example.

    Nothing is padded, so no compute goes to padding; the layout is a packed row (see the module
    docstring), and each example's first label is dropped as in ``pack_examples`` (the shift would
    otherwise predict it from the previous example; a padded row never predicts position 0 either).
    """
    width = sum(len(example["input_ids"]) for example in batch)
    return collate_causal(pack_examples(batch, width), pad_token_id)


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Pack whole examples into rows of at most ``max_length`` tokens (first-fit decreasing).

    Each example's first label becomes -100 (it would otherwise be predicted from the previous
    example's last token; unpacked, position 0 is never predicted either).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[Example] = []
    for index in order:
        example = examples[index]
        n = len(example["input_ids"])
        if n > max_length:
            raise ValueError(f"an example of {n} tokens does not fit max_length={max_length}; truncate first")
        row = next((r for r in rows if len(r["input_ids"]) + n <= max_length), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += example["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(example["labels"][1:])
        row["position_ids"] += list(range(n))
    return rows
