"""The causal-LM loss on labelled tokens only: the one loss path of SFT training and evaluation.

A model's own loss runs its head on every position and keeps [batch, length, vocab] fp32 logits
(SmolLM2: 49k words, a fifth of the model's FLOPs; an 8B model at 4x1024 tokens: 2 GiB of logits
before their gradient). Only the positions whose next token has a label need them::

    hidden  [B, T, H] ──(positions t with labels[t+1] ≠ -100)──▶ [N, H] ──head, chunked CE──▶ Σ loss

The head is taken out of the forward pass for the duration (``_HeadInput`` stands in for it and
keeps its input), so no logits are formed for prompts and padding, and the cross-entropy runs a
chunk of rows at a time (``kernels.linear_cross_entropy``). Models that transform their logits
after the head (soft-capping, scaling) keep the model's own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import torch
from torch import nn

from deltatune.data.encoding import IGNORE_INDEX
from deltatune.kernels.linear_cross_entropy import (
    chunk_rows,
    linear_cross_entropy,
    module_cross_entropy,
)

# config attributes of models whose logits are not the head's output as it stands
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LossSum(NamedTuple):
    """Σ cross-entropy over the labelled tokens of a batch (fp32 scalar) and how many there were."""

    total: torch.Tensor
    tokens: int


def answer_only_supported(model: nn.Module) -> bool:
    """True when the head's output is the logits (no soft-capping or scaling after it)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    transformed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    return head is not None and not transformed


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
    with _head_input(owner) as (head, captured):
        model(**inputs)
    hidden = captured[0][:, -labels.shape[1] : -1]
    if labels.device.type == "meta":  # shapes only (memory accounting): every position counts as labelled
        return LossSum(_head_loss(head, hidden.flatten(0, 1), targets.flatten()), targets.numel())
    return LossSum(_head_loss(head, hidden[where], targets[where]), int(where.sum()))


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    rows = chunk_rows(head.weight.shape[0]) if isinstance(getattr(head, "weight", None), torch.Tensor) else 256
    if type(head) is nn.Linear:
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, rows)
    return module_cross_entropy(head, hidden, targets, rows)


class _HeadInput(nn.Module):
    """Stands in for the head during a forward pass: keeps the hidden states, returns no logits."""

    def __init__(self, captured: list[torch.Tensor]) -> None:
        super().__init__()
        self.captured = captured

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.captured.append(hidden)
        return hidden[..., :0]


@contextlib.contextmanager
def _head_input(model: nn.Module) -> Iterator[tuple[nn.Module, list[torch.Tensor]]]:
    """(the head, the list its stand-in fills) while the head is swapped out of ``model``."""
    head = model.get_output_embeddings()
    parent, name = _owner(model, head)
    captured: list[torch.Tensor] = []
    setattr(parent, name, _HeadInput(captured))
    try:
        yield head, captured
    finally:
        setattr(parent, name, head)
    if len(captured) != 1:
        raise RuntimeError(f"the head ran {len(captured)} times in one forward pass; expected once")


def _owner(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is module:
                return parent, name
    raise RuntimeError("the model's output embeddings are not one of its modules")
