"""Question/answer pairs (e.g. the embedded chatterbot corpus) as causal-LM training examples."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class _Pair(Protocol):
    """Anything with a question and an answer, such as ``deltatune.assets.QAPair``."""

    @property
    def question(self) -> str: ...

    @property
    def answer(self) -> str: ...


P = TypeVar("P", bound=_Pair)


def split_pairs(
    pairs: Sequence[P], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[P], list[P]]:
    """Split pairs into (train, eval), deterministically for a given seed.

    Pairs are grouped by question, so all answers to one question land in the same split;
    ``eval_fraction`` is the share of distinct questions sent to eval (at least one when
    it is positive and there are at least two questions). Both splits keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    questions = sorted({pair.question for pair in pairs})
    random.Random(seed).shuffle(questions)
    n_eval = round(len(questions) * eval_fraction)
    if eval_fraction > 0 and len(questions) > 1:
        n_eval = max(n_eval, 1)
    eval_questions = set(questions[:n_eval])
    train = [pair for pair in pairs if pair.question not in eval_questions]
    evaluation = [pair for pair in pairs if pair.question in eval_questions]
    return train, evaluation


def encode_chat_pair(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    max_length: int = 256,
    system: str | None = None,
) -> dict[str, list[int]]:
    """Tokenise one question/answer pair; only the answer is labelled.

    With a chat template, the conversation is (optional system message,) user question,
    assistant answer; the labels cover the answer and the end-of-turn token (the
    tokenizer's eos), and whatever the template appends after it (SmolLM2: a newline) is
    dropped. With ``system=None`` the template's default system prompt, if any, applies.
    Without a chat template the text is ``"Question: ...\\nAnswer: ..."`` plus eos.
    Prompt tokens get label -100. Both lists are cut to ``max_length`` tokens (from the
    right, so an over-long prompt leaves no labelled token).
    """
    if tokenizer.chat_template:
        prompt, full = _chat_texts(tokenizer, question, answer, system)
    else:
        if system is not None:
            raise ValueError("a system message needs a tokenizer with a chat template")
        if tokenizer.eos_token is None:
            raise ValueError("the plain Question/Answer format needs a tokenizer with an eos token")
        prompt = f"Question: {question}\nAnswer:"
        full = f"{prompt} {answer}{tokenizer.eos_token}"
    prompt_ids = _tokenize(tokenizer, prompt)
    full_ids = _tokenize(tokenizer, full)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the tokenised prompt is not a prefix of the tokenised prompt+answer; "
            "cannot tell where the answer starts"
        )
    completion = _through_last(full_ids[len(prompt_ids) :], tokenizer.eos_token_id)
    input_ids = (prompt_ids + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _chat_texts(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, system: str | None
) -> tuple[str, str]:
    """Render (prompt with generation prompt, full conversation) with the chat template."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": question})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": answer})
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt, full


def _through_last(ids: list[int], token_id: int | None) -> list[int]:
    """Cut ``ids`` after the last occurrence of ``token_id`` (unchanged if it is absent)."""
    if token_id not in ids:
        return ids
    return ids[: len(ids) - ids[::-1].index(token_id)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenise text, adding the tokenizer's special tokens only for plain (untemplated) text."""
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def collate_causal(
    batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into tensors: input_ids, attention_mask and labels.

    Padding positions get ``pad_token_id`` in input_ids, 0 in attention_mask and -100 in
    labels.
    """
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
