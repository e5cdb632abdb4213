"""Which adapter applies to which row of a batch: one forward pass, several adapters (or none) side by side.

A batch's per-row adapter names are grouped once per forward; each adapted layer then computes the base
output for the whole batch and, per group, its adapter's rank-r term on that group's rows only::

    rows:      0   1   2   3   4
    adapter:   a   -   b   a   b        ->   a: rows [0, 3]    b: rows [2, 4]    row 1: the base alone

    y = W0 x  (every row)      y[a rows] += s_a · B_a A_a x[a rows]      y[b rows] += s_b · B_b A_b x[b rows]

so the cost grows with the number of distinct adapters in the batch, not with the number of rows (the idea
of Punica's segmented GEMM, on torch operations). Adapters of different ranks, and DoRA adapters (whose
per-unit scale m/||W0 + s·BA|| applies to their own rows), mix freely. Serving drives this to answer
requests for different adapters in one batch; ``DeltaModel.adapter_rows`` is the entry point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from deltatune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RowGroups:
    """Each adapter's rows in the batch: (adapter name, row index tensor) per distinct adapter, in first-seen
    order; rows named ``None`` get no adapter. ``whole`` marks a group that is every row (no gather needed)."""

    groups: tuple[tuple[str, torch.Tensor], ...]
    rows: int
    whole: str | None = None

    @classmethod
    def of(cls, names: Sequence[str | None], device: torch.device | str = "cpu") -> RowGroups:
        """Group ``names`` (one adapter name or None per row)."""
        members: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name is not None:
                members.setdefault(name, []).append(row)
        groups = tuple((name, torch.tensor(rows, dtype=torch.long, device=device)) for name, rows in members.items())
        whole = next(iter(members)) if len(members) == 1 and len(members[next(iter(members))]) == len(names) else None
        return cls(groups, len(names), whole)


def add_per_row(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """``result`` (the base output for every row of ``x``) with each group's adapter added on its own rows.

    ``layer`` is a LoRA layer (``lora_output``, ``dora_output``, ``lora_magnitude_vector``); an adapter it does
    not hold adds nothing (another adapter may target other modules).
    """
    if x.shape[0] != groups.rows:
        raise ConfigError(f"the batch has {x.shape[0]} rows but {groups.rows} adapter names were given")
    for name, index in groups.groups:
        if name not in layer.adapter_names:
            continue
        whole = groups.whole == name
        rows = x if whole else x.index_select(0, index)
        lora = layer.lora_output(rows, name).to(result.dtype)
        if name in layer.lora_magnitude_vector:
            part = layer.dora_output(result if whole else result.index_select(0, index), lora, name)
            result = part if whole else result.index_copy(0, index, part)
        else:
            result = result + lora if whole else result.index_add(0, index, lora)
    return result
