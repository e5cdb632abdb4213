"""A causal LM's head taken out of its forward pass, so that losses run it only where they need logits.

While ``head_input`` holds, a stand-in replaces the output embeddings: it keeps the hidden states the head
would have seen and returns no logits. The caller then runs the head itself, a chunk of ``head_rows`` rows at
a time, on the positions it scores (``lm_loss``: labelled tokens; ``completion_logps``: sampled completions).
That is only right when the head's output is the logits (``answer_only_supported``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from deltatune.kernels.linear_cross_entropy import chunk_rows

# config attributes of models whose logits are not the head's output as it stands
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def answer_only_supported(model: nn.Module) -> bool:
    """True when the head's output is the logits (no soft-capping or scaling after it)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    transformed = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    return head is not None and not transformed


def head_rows(head: nn.Module) -> int:
    """Rows per chunk for ``head``: ``chunk_rows`` of its vocabulary (256 for a head without a weight)."""
    return chunk_rows(head.weight.shape[0]) if isinstance(getattr(head, "weight", None), torch.Tensor) else 256


class _HeadInput(nn.Module):
    """Stands in for the head during a forward pass: keeps the hidden states, returns no logits."""

    def __init__(self, captured: list[torch.Tensor]) -> None:
        super().__init__()
        self.captured = captured

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.captured.append(hidden)
        return hidden[..., :0]


@contextlib.contextmanager
def head_input(model: nn.Module) -> Iterator[tuple[nn.Module, list[torch.Tensor]]]:
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
