"""Reward functions for examples/grpo.yaml, with TRL's signature: any TRL reward function works the same way.

Each gets the prompts, the completions (chat prompts: a list with one assistant message each), their token ids and
every other column of the data by name (here ``solution``), and returns one float per completion, or None for "no
opinion".
"""

import re

NUMBER = re.compile(r"-?\d[\d,]*")


def _text(completion):
    return completion if isinstance(completion, str) else completion[0]["content"]


def correct(prompts, completions, completion_ids, solution, **kwargs):
    """1.0 when the last number in the answer is the solution, else 0.0."""
    rewards = []
    for completion, answer in zip(completions, solution):
        numbers = NUMBER.findall(_text(completion))
        rewards.append(float(bool(numbers) and numbers[-1].replace(",", "") == answer))
    return rewards


def number_only(completions, **kwargs):
    """1.0 when the answer is a number and nothing else (what the prompt asks for), else 0.0."""
    return [float(re.fullmatch(r"\s*-?[\d,]+\.?\s*", _text(completion)) is not None) for completion in completions]
