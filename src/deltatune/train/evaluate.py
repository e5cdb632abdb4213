"""Held-out loss and sample answers: the two numbers a fine-tuning run is judged by."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    examples: Sequence[Mapping[str, Sequence[int]]],
    collate: Callable[[Sequence[Mapping[str, Sequence[int]]]], dict[str, torch.Tensor]],
    batch_size: int = 8,
    desc: str = "eval",
) -> float:
    """Mean cross-entropy per labelled token over ``examples`` (labels -100 are ignored)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += int((labels != -100).sum())
    model.train(was_training)
    return total_loss / max(total_tokens, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def answer(model: nn.Module, tokenizer, question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer of a chat model to one user question."""
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    prompt = {k: v.to(device) for k, v in prompt.items()}
    output = model.generate(
        **prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
    )
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
