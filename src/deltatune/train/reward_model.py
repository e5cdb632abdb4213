"""A trained reward model (``deltatune train stage=rm``) in use: a reward function with TRL's signature
``f(prompts, completions, **kwargs) -> list[float]``, and its pairwise accuracy on held-out pairs.

A prompt and its completion are encoded exactly as training encoded a pair's side (the chat template,
``encode_completion``); the score is the one-output head's value on that sequence. A prompt is a string
(one user message) or a list of ``{"role", "content"}`` messages; a completion is a string or a list of
assistant messages, as TRL passes them for plain and conversational data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.data.collate import collate_causal
from deltatune.data.encoding import encode_completion
from deltatune.data.records import Message, Messages, PreferencePair
from deltatune.errors import ConfigError, DataError
from deltatune.saved import load_adapted, tokenizer_for
from deltatune.train.preference_data import PreferenceCollator, encode_preference_pairs

RewardFunction = Callable[..., list[float]]


@dataclass
class PairwiseAccuracy:
    """A reward model on preference pairs: the share scored chosen > rejected, and the mean score gap."""

    pairs: int
    accuracy: float
    mean_margin: float


def load_reward_model(path: str | os.PathLike, model: str | None = None) -> tuple[nn.Module, Any]:
    """(base + adapter + one-output head, in eval mode; its tokenizer) from a reward model's adapter folder."""
    scorer, base_path = load_adapted(path, model)
    if scorer.peft_config[scorer.active_adapter].task_type != "SEQ_CLS" or scorer.base_model.config.num_labels != 1:
        raise ConfigError(f"{path} is not a reward model adapter (one-output SEQ_CLS); train one with stage=rm")
    tokenizer = tokenizer_for(path, base_path)
    if scorer.base_model.config.pad_token_id is None:  # the head reads the last token before the padding
        scorer.base_model.config.pad_token_id = tokenizer.pad_token_id
    return scorer, tokenizer


def load_reward_function(
    path: str | os.PathLike, model: str | None = None, batch_size: int = 8, max_length: int = 1024
) -> RewardFunction:
    """A reward function ``f(prompts, completions, **kwargs) -> list[float]`` scoring with the reward model
    saved in ``path`` (``model``: its base, default the one the adapter names); sequences longer than
    ``max_length`` keep their end (the answer the head scores)."""
    scorer, tokenizer = load_reward_model(path, model)

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise DataError(
                f"{len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion"
            )
        rows = [
            encode_completion(tokenizer, _messages(prompt, "user"), _messages(completion, "assistant"))
            for prompt, completion in zip(prompts, completions)
        ]
        rows = [{key: ids[-max_length:] for key, ids in row.items()} for row in rows]
        return [
            score
            for start in range(0, len(rows), batch_size)
            for score in scores(scorer, collate_causal(rows[start : start + batch_size], tokenizer.pad_token_id))
        ]

    reward.__name__ = f"rm:{os.fspath(path)}"  # TRL logs each reward function under its name
    return reward


def pairwise_accuracy(
    scorer: nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int, batch_size: int = 8
) -> PairwiseAccuracy:
    """How often ``scorer`` scores chosen above rejected on ``pairs`` (encoded and cut as training does)."""
    examples = encode_preference_pairs(tokenizer, pairs, max_length).examples
    if not examples:
        raise DataError(f"no pair is left after truncation to max_length={max_length}; raise max_length")
    collate = PreferenceCollator(tokenizer.pad_token_id)
    right, gaps = 0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = [
            {k: v for k, v in example.items() if k != "margin"} for example in examples[start : start + batch_size]
        ]
        values = scores(scorer, collate(batch))
        chosen, rejected = values[: len(batch)], values[len(batch) :]
        right += sum(c > r for c, r in zip(chosen, rejected))
        gaps += sum(c - r for c, r in zip(chosen, rejected))
    return PairwiseAccuracy(len(examples), right / len(examples), gaps / len(examples))


@torch.no_grad()
def scores(scorer: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[float]:
    """The head's score of each row of a padded batch."""
    device = next(scorer.parameters()).device
    logits = scorer(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return logits.squeeze(-1).float().tolist()


def _messages(value: Any, role: str) -> Messages:
    """A string as one ``role`` message, or a list of ``{"role", "content"}`` dicts as messages."""
    if isinstance(value, str):
        return (Message(role, value),)
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in value):
        return tuple(Message(m["role"], m["content"]) for m in value)
    raise DataError(f"a {role} turn must be a string or a list of {{'role', 'content'}} messages, got {value!r:.80}")
