"""The causal-LM loss on labelled tokens only: the one loss path of SFT training and evaluation.

A model's own loss runs its head on every position and keeps [batch, length, vocab] fp32 logits
(SmolLM2: 49k words, a fifth of the model's FLOPs; an 8B model at 4x1024 tokens: 2 GiB of logits
before their gradient). Only the positions whose next token has a label need them::

    hidden  [B, T, H] ──(positions t with labels[t+1] ≠ -100)──▶ [N, H] ──head, chunked CE──▶ Σ loss

The head is taken out of the forward pass for the duration (``train.head``: a stand-in keeps its
input), so no logits are formed for prompts and padding, and the cross-entropy runs a chunk of rows
at a time (``kernels.linear_cross_entropy``). Models that transform their logits after the head
(soft-capping, scaling) keep the model's own loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from deltatune.data.encoding import IGNORE_INDEX
from deltatune.kernels.linear_cross_entropy import linear_cross_entropy, module_cross_entropy
from deltatune.train.head import answer_only_supported, head_input, head_rows


class LossSum(NamedTuple):
    """Σ cross-entropy over the labelled tokens of a batch (fp32 scalar) and how many there were."""

    total: torch.Tensor
    tokens: int


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], unwrapped: nn.Module | None = None) -> LossSum:
    """Σ CE(logits[:, t], labels[:, t+1]) over positions with a label, and their count.

    ``batch`` holds input_ids, labels and an attention_mask or position_ids (``data.collate``).
    Prompt-learning models put virtual tokens in front: the last ``labels.shape[1]`` positions are
    the real ones. ``unwrapped``: the model inside ``model`` when a wrapper (DDP) runs it.
    """
    owner = model if unwrapped is None else unwrapped
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if "position_ids" in inputs:  # with a KV cache, transformers would not read restarting position ids as
        inputs["use_cache"] = False  # example boundaries: padding-free and packed rows would attend across them
    labels = batch["labels"]
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    if not answer_only_supported(owner):
        logits = model(**inputs).logits[:, -labels.shape[1] : -1]
        loss = nn.functional.cross_entropy(logits[where].float(), targets[where], reduction="sum")
        return LossSum(loss, int(where.sum()))
    with head_input(owner) as (head, captured):
        model(**inputs)
    hidden = captured[0][:, -labels.shape[1] : -1]
    if labels.device.type == "meta":  # shapes only (memory accounting): every position counts as labelled
        return LossSum(_head_loss(head, hidden.flatten(0, 1), targets.flatten()), targets.numel())
    return LossSum(_head_loss(head, hidden[where], targets[where]), int(where.sum()))


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    rows = head_rows(head)
    if type(head) is nn.Linear:
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, rows)
    return module_cross_entropy(head, hidden, targets, rows)
