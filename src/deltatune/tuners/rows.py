"""Which adapter applies to which row of a batch: one forward pass, several adapters (or none) side by side.

A batch's per-row adapter names are grouped once (again only for other names: ``DeltaModel.adapter_rows``); each
adapted layer then computes the base output for the whole batch and, per group, its adapter's rank-r term on that
group's rows only::

    rows:      0   1   2   3   4
    adapter:   a   -   b   a   b        ->   a: rows [0, 3]    b: rows [2, 4]    row 1: the base alone

    y = W0 x  (every row)      y[a rows] += s_a · B_a A_a x[a rows]      y[b rows] += s_b · B_b A_b x[b rows]

so the cost grows with the number of distinct adapters in the batch, not with the number of rows (the idea
of Punica's segmented GEMM, on torch operations). Adapters of different ranks, and DoRA adapters (whose
per-unit scale m/||W0 + s·BA|| applies to their own rows), mix freely. Serving drives this to answer
requests for different adapters in one batch; ``DeltaModel.adapter_rows`` is the entry point, and a method's
layers do the adding (LoRA's: ``tuners/lora/rows.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from deltatune.errors import ConfigError


class Blocks(NamedTuple):
    """Rows gathered into one block per adapter, each ``width`` long: ``source`` [slots x width] the rows to gather
    (the padding of a shorter block: index ``rows``, a zero row), ``target`` where each block row's term is
    added (the padding's: row 0), ``padded`` whether any block was padded, ``sliced`` whether the blocks are
    simply the batch's first rows in order (the generation engine keeps an adapter's rows together)."""

    source: torch.Tensor
    target: torch.Tensor
    width: int
    padded: bool
    sliced: bool  # the blocks are the batch's first rows in order (no padding): a slice, no gather needed


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """Each adapter's rows in the batch: (adapter name, row index tensor) per distinct adapter, in first-seen
    order; rows named ``None`` get no adapter. ``whole`` marks a group that is every row (no gather needed)."""

    groups: tuple[tuple[str, torch.Tensor], ...]
    rows: int
    names: tuple[str | None, ...] = ()
    whole: str | None = None
    check_weights: bool = True  # False: kept stacks are reused without reading their tensors' version counters
    _memo: dict = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )  # slots, held, blocks, for these names

    @classmethod
    def of(
        cls, names: Sequence[str | None], device: torch.device | str = "cpu", check_weights: bool = True
    ) -> RowGroups:
        """Group ``names`` (one adapter name or None per row); ``check_weights`` as ``DeltaModel.adapter_rows``."""
        members: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name is not None:
                members.setdefault(name, []).append(row)
        groups = tuple((name, torch.tensor(rows, dtype=torch.long, device=device)) for name, rows in members.items())
        whole = next(iter(members)) if len(members) == 1 and len(members[next(iter(members))]) == len(names) else None
        return cls(groups, len(names), tuple(names), whole, check_weights)

    def slots(self, order: dict[str, int], device: torch.device) -> torch.Tensor:
        """Each row's slot in a stack of adapters (``order``: adapter -> slot; every other row, the slot after
        the last: no adapter), as a [rows] tensor; made once per order."""
        key = ("slots", tuple(order), device)
        if key not in self._memo:
            empty = len(order)
            self._memo[key] = torch.tensor([order.get(name, empty) for name in self.names], device=device)
        return self._memo[key]

    def held(self, adapters: dict[str, object]) -> tuple[str, ...]:
        """The batch's adapters that a layer holding ``adapters`` holds, in the layer's order (so a batch whose
        rows change but name the same adapters finds the same answer; made once per set of adapters)."""
        key = ("held", tuple(adapters))
        if key not in self._memo:
            named = {name for name, _ in self.groups}
            self._memo[key] = tuple(name for name in adapters if name in named)
        return self._memo[key]

    def blocks(self, order: dict[str, int], device: torch.device) -> Blocks:
        """The rows of each adapter of ``order`` in turn, every block padded to the largest (``Blocks``); made once
        per order for all layers holding the same adapters."""
        key = ("blocks", tuple(order), device)
        if key not in self._memo:
            members = {name: index.tolist() for name, index in self.groups}
            width = max(len(members[name]) for name in order)
            source, target = [], []
            for name in order:
                missing = width - len(members[name])
                source += members[name] + [self.rows] * missing  # row ``rows``: a zero row the caller appends
                target += members[name] + [0] * missing  # the padding's zero terms land on row 0
            padded = len(source) != sum(len(members[name]) for name in order)
            sliced = not padded and source == list(range(len(source)))  # a padded last block ends in row ``rows``
            self._memo[key] = Blocks(
                torch.tensor(source, device=device), torch.tensor(target, device=device), width, padded, sliced
            )
        return self._memo[key]

    def check(self, x: torch.Tensor) -> None:
        """Refuse a batch whose row count is not the number of names given."""
        if x.shape[0] != self.rows:
            raise ConfigError(f"the batch has {x.shape[0]} rows but {self.rows} adapter names were given")


@functools.lru_cache(maxsize=16)
def grouped(names: tuple[str | None, ...], device: torch.device, check_weights: bool = True) -> RowGroups:
    """``RowGroups.of``, kept for the last groupings asked: a server's decoding steps name the same rows step after
    step, and the grouping, with what it worked out (slots, held adapters, blocks), depends on the names alone."""
    return RowGroups.of(names, device, check_weights)
