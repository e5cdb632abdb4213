"""Held-out loss and sample answers: the two numbers a fine-tuning run is judged by."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from deltatune.data.encoding import prompt_ids
from deltatune.data.records import Message
from deltatune.train.lm_loss import causal_lm_loss


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    examples: Sequence[Mapping[str, Sequence[int]]],
    collate: Callable[[Sequence[Mapping[str, Sequence[int]]]], dict[str, torch.Tensor]],
    batch_size: int = 8,
    desc: str = "eval",
) -> float:
    """Mean cross-entropy per labelled token over ``examples`` (labels -100 are ignored), through the
    training loss path (``lm_loss.causal_lm_loss``)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        loss = causal_lm_loss(model, batch)
        total_loss += loss.total.item()
        total_tokens += loss.tokens
    model.train(was_training)
    return total_loss / max(total_tokens, 1)


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run still prints a number."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def answer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    max_new_tokens: int = 48,
    **sampling,
) -> str:
    """The model's next assistant message after ``messages`` (greedy unless ``sampling`` says otherwise)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=bool(sampling),
        pad_token_id=pad,
        **sampling,
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
