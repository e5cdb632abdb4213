"""Mixing several data sources with weights (``data=a.jsonl,b.jsonl data_weights=3,1``).

The rule: the mixed set keeps the total size N (the rows of every source together) and gives source
i ``round(N * w_i / sum(w))`` rows. A source with fewer rows than that is repeated (whole passes,
then a seeded sample of its rows for the rest); one with more gives a seeded sample. Without weights
every row is used once. Records keep their source order; the trainer shuffles.

    a: 100 rows, b: 300 rows, weights 1,1  ->  a 200 (100 repeated), b 200 (100 unused)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from deltatune.data.records import Record
from deltatune.errors import DataError


@dataclass
class Mixed:
    """The mixed records and, per source, (rows it has, rows it gives)."""

    records: list[Record]
    counts: dict[str, tuple[int, int]]

    def summary(self) -> list[str]:
        """One line per source: its rows, and how many were repeated or left unused."""
        lines = []
        for source, (have, give) in self.counts.items():
            change = "" if give == have else f" ({give - have} repeated)" if give > have else f" ({have - give} unused)"
            lines.append(f"{source}: {have} rows -> {give}{change}")
        return lines


def parse_weights(text: str, n_sources: int) -> list[float] | None:
    """``"3,1"`` -> [3.0, 1.0], checked against the number of sources; "" -> None (no weights)."""
    if not str(text).strip():
        return None
    try:
        weights = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise DataError(f"data_weights={text!r} must be comma-separated numbers, e.g. data_weights=3,1") from None
    if len(weights) != n_sources:
        raise DataError(
            f"data_weights={text!r} has {len(weights)} weights for {n_sources} data sources; give one per "
            f"source in data="
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise DataError(f"data_weights={text!r} must be finite, 0 or more, and not all 0")
    return weights


def mix(records: Sequence[Record], sources: Sequence[str], weights: Sequence[float] | None, seed: int = 0) -> Mixed:
    """Records grouped by their ``origin.source`` (in ``sources`` order), resized by ``weights`` (module docstring)."""
    groups: dict[str, list[Record]] = {source: [] for source in sources}
    for record in records:
        groups[record.origin.source].append(record)
    if weights is None:
        return Mixed([r for group in groups.values() for r in group], {s: (len(g), len(g)) for s, g in groups.items()})
    total, rng = sum(len(group) for group in groups.values()), random.Random(seed)
    mixed, counts = [], {}
    for (source, group), weight in zip(groups.items(), weights):
        want = round(total * weight / sum(weights))
        if want and not group:
            raise DataError(
                f"{source}: data_weights gives it {want} rows but it has none left after the held-out split"
            )
        passes, rest = divmod(want, len(group)) if group else (0, 0)
        picked = sorted(rng.sample(range(len(group)), rest))
        mixed += group * passes + [group[i] for i in picked]
        counts[source] = (len(group), want)
    return Mixed(mixed, counts)
