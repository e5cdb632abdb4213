"""GRPO's reward functions: found by name, called with TRL's signature, their answers checked.

``reward_funcs=`` is a comma list; each entry is one of

    path/to/file.py:function     a function in a Python file (run as code: only name files you trust)
    package.module:function      a function in an importable module (TRL's own, e.g. trl.rewards:accuracy_reward)
    accuracy                     1.0 when the answer equals the row's ``solution`` (math-verify), else 0.0;
                                 None when the solution itself cannot be parsed
    regex:PATTERN                1.0 when the completion matches PATTERN (``re.search``, multi-line), else 0.0
    length:N                     −max(0, tokens − N) / N: nothing up to N completion tokens, then a growing penalty
    rm:FOLDER                    the score of a reward model trained with ``stage=rm``

A function is called as ``f(prompts=..., completions=..., completion_ids=..., **columns)`` (each dataset column
by name) and returns one ``float`` or ``None`` ("no opinion") per completion. ``score`` stops with one line
naming the function and the row when one raises, returns the wrong number of values, a NaN or a non-number.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError, DataError

RewardFunction = Callable[..., Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class NamedReward:
    """A reward function and the name the logs show it under."""

    name: str
    function: RewardFunction


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of a chat completion's messages."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion)


def accuracy(completions: Sequence[Any], solution: Sequence[str], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion's answer equals ``solution`` as math-verify reads both, else 0.0; None when the
    solution cannot be parsed (no opinion)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ConfigError(
            "reward_funcs=accuracy needs math-verify: pip install 'deltatune[grpo]' (or math-verify)"
        ) from None
    rewards: list[float | None] = []
    for completion, gold in zip(completions, solution):
        expected = parse(str(gold))
        rewards.append(float(verify(expected, parse(completion_text(completion)))) if expected else None)
    return rewards


def regex(pattern: str) -> RewardFunction:
    """1.0 for a completion that ``pattern`` matches anywhere (lines anchored by ^ and $), else 0.0."""
    try:
        compiled = re.compile(pattern, re.MULTILINE)
    except re.error as error:
        raise ConfigError(f"reward_funcs=regex:{pattern}: not a regular expression ({error})") from None

    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    return reward


def length(limit: str) -> RewardFunction:
    """0 up to ``limit`` completion tokens, then −(tokens − limit) / limit."""
    if not limit.isdigit() or int(limit) < 1:
        raise ConfigError(f"reward_funcs=length:{limit}: the limit must be a positive whole number of tokens")
    tokens = int(limit)

    def reward(completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        return [-max(0, len(ids) - tokens) / tokens for ids in completion_ids]

    return reward


def reward_model(folder: str) -> RewardFunction:
    from deltatune.train.reward_model import load_reward_function

    return load_reward_function(folder)


_WITH_ARGUMENT: dict[str, Callable[[str], RewardFunction]] = {"regex": regex, "length": length, "rm": reward_model}
_BUILT_IN: dict[str, RewardFunction] = {"accuracy": accuracy}


def load_reward_functions(entries: str | Sequence[str]) -> list[NamedReward]:
    """The reward functions ``entries`` (a comma list or a list of entries, module docstring) name."""
    items = [item.strip() for item in entries.split(",")] if isinstance(entries, str) else list(entries)
    if not items or not all(items):
        raise ConfigError("reward_funcs= needs at least one function, e.g. reward_funcs=accuracy or rewards.py:correct")
    return [NamedReward(item, _load(item)) for item in items]


def _load(entry: str) -> RewardFunction:
    if entry in _BUILT_IN:
        return _BUILT_IN[entry]
    kind, _, argument = entry.partition(":")
    if kind in _WITH_ARGUMENT and argument:
        return _WITH_ARGUMENT[kind](argument)
    where, _, name = entry.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(
            f"reward_funcs entry {entry!r} is not FILE.py:FUNCTION, MODULE:FUNCTION or a built-in "
            f"({', '.join([*_BUILT_IN, *(f'{k}:...' for k in _WITH_ARGUMENT)])})"
        )
    module = _module_from_file(where) if where.endswith(".py") else _module(where)
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"reward_funcs entry {entry!r}: {where} has no function {name!r}")
    return function


def _module_from_file(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"reward_funcs: {path} does not exist; give the path of a .py file")
    spec = importlib.util.spec_from_file_location(f"deltatune_rewards_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigError(f"reward_funcs: running {path} failed: {type(error).__name__}: {error}") from None
    return module


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ConfigError(f"reward_funcs: cannot import {name} ({error})") from None


def score(
    functions: Sequence[NamedReward],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence[Any]],
) -> list[list[float]]:
    """[completion][function] rewards, ``nan`` where a function had no opinion (None)."""
    table = [[math.nan] * len(functions) for _ in completions]
    for column, named in enumerate(functions):
        try:
            values = named.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except (ConfigError, DataError):
            raise
        except Exception as error:
            raise DataError(f"reward function {named.name} raised {type(error).__name__}: {error}") from None
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
            raise DataError(f"reward function {named.name} returned {got} for {len(completions)} completions")
        for row, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise DataError(
                    f"reward function {named.name} returned {value!r} for row {row} "
                    f"(prompt {_short(prompts[row])}); return a number or None"
                )
            table[row][column] = float(value)
    return table


def _short(prompt: Any) -> str:
    text = completion_text(prompt) if not isinstance(prompt, str) else prompt
    return repr(text if len(text) <= 60 else text[:57] + "...")
