"""A deterministic train/eval split that keeps every record of one prompt on the same side."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from deltatune.data.records import prompt_key

R = TypeVar("R")


def split_records(
    records: Sequence[R], eval_fraction: float = 0.1, seed: int = 0, key: Callable[[R], str] = prompt_key
) -> tuple[list[R], list[R]]:
    """Split records into (train, eval), the same way for the same seed.

    Records are grouped by ``key`` (default: the first user message), so all answers to one
    prompt land in the same split; ``eval_fraction`` is the share of distinct keys sent to eval
    (at least one when it is positive and there are at least two keys). Both splits keep the
    input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    keys = sorted({key(record) for record in records})
    random.Random(seed).shuffle(keys)
    n_eval = round(len(keys) * eval_fraction)
    if eval_fraction > 0 and len(keys) > 1:
        n_eval = max(n_eval, 1)
    eval_keys = set(keys[:n_eval])
    train = [record for record in records if key(record) not in eval_keys]
    evaluation = [record for record in records if key(record) in eval_keys]
    return train, evaluation
