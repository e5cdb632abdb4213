"""Reward functions for examples/grpo.yaml, with TRL's signature: any TRL reward function works the same way.

Each gets the prompts, the completions (chat prompts: a list with one assistant message each), their token ids and
every other column of the data by name (here ``solution``), and returns one float per completion, or None for "no
opinion".

A format reward that pays for a wrong answer gets gamed: with ``number_only`` paying for any number alone, a
60-step run learned to repeat the question's quantity ("11" for "How many seconds are in 11 minutes?"), and
its held-out reward rose while its accuracy fell to 0. So here the format counts only on a right answer, and
``close`` gives partial credit by how far the number is from the answer, so that nearly right answers stand out
in a group where none is exactly right.
"""

import math
import re

NUMBER = re.compile(r"-?\d[\d,]*")


def _text(completion):
    return completion if isinstance(completion, str) else completion[0]["content"]


def _last_number(completion):
    numbers = NUMBER.findall(_text(completion))
    return int(numbers[-1].replace(",", "")) if numbers and numbers[-1].replace(",", "").lstrip("-") else None


def correct(prompts, completions, completion_ids, solution, **kwargs):
    """1.0 when the last number in the answer is the solution, else 0.0."""
    return [float(_last_number(c) == int(answer)) for c, answer in zip(completions, solution)]


def close(completions, solution, **kwargs):
    """1 / (1 + |log10(number / solution)|): 1.0 for the solution, 0.5 for ten times off, 0.0 for no number."""
    rewards = []
    for completion, answer in zip(completions, solution):
        number = _last_number(completion)
        ok = number is not None and number > 0
        rewards.append(1 / (1 + abs(math.log10(number / int(answer)))) if ok else 0.0)
    return rewards


def number_only(completions, solution, **kwargs):
    """1.0 when the answer is the right number and nothing else (what the prompt asks for), else 0.0."""
    return [
        float(re.fullmatch(r"\s*-?[\d,]+\.?\s*", _text(c)) is not None and _last_number(c) == int(answer))
        for c, answer in zip(completions, solution)
    ]
