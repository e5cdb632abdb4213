"""LoRA's part of a mixed-adapter batch (``tuners/rows.py``): each row's adapter term added to the base output.

Two ways, the same sums:

- grouped (under autograd, and for one adapter or a non-linear layer): per adapter, its rows gathered, its
  term s·B A x computed once for them (DoRA: m/||W0 + s·BA|| on their base output too), and added back;
- stacked (decoding: one token per row, no autograd, a linear layer, two adapters or more): every adapter
  the layer holds concatenated once (s folded into B), and the terms of all rows computed in two matmuls,
  each row keeping only its own adapter's rank columns::

      A_all [R, in] = [A_1; A_2; ...]     B_all [out, R] = [s_1 B_1, s_2 B_2, ...]     R = r_1 + r_2 + ...
      y += ((x A_allᵀ) ⊙ own) B_allᵀ       own [rows, R]: 1 on the columns of the row's adapter, else 0

  so a decoding step pays a handful of operations per layer instead of a handful per adapter (the wasted
  products, rows x R per layer, are what one token costs; a prompt's many tokens take the grouped way). The
  concatenation is kept until an adapter's tensors change (their version counters are its key): a copy of
  the layer's adapter factors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from deltatune.tuners.rows import RowGroups


def add_per_row(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """``result`` (the base output for every row of ``x``) with each row's adapter term added; an adapter the
    layer does not hold adds nothing on its rows (it may target other modules)."""
    groups.check(x)
    held = [name for name, _ in groups.groups if name in layer.adapter_names]
    decoding = x.numel() == x.shape[0] * x.shape[-1]
    if len(held) > 1 and decoding and not torch.is_grad_enabled() and stackable(layer):
        return add_stacked(layer, x, result, groups)
    in_place = not torch.is_grad_enabled()  # inference: write into the base output, no copy of it per adapter
    for name, index in groups.groups:
        if name not in held:
            continue
        whole = groups.whole == name
        rows = x if whole else x.index_select(0, index)
        lora = layer.lora_output(rows, name).to(result.dtype)
        if name in layer.lora_magnitude_vector:
            part = layer.dora_output(result if whole else result.index_select(0, index), lora, name)
            if whole:
                result = part
            else:
                result = result.index_copy_(0, index, part) if in_place else result.index_copy(0, index, part)
        elif whole:
            result = result.add_(lora) if in_place else result + lora
        else:
            result = result.index_add_(0, index, lora) if in_place else result.index_add(0, index, lora)
    return result


class AdapterStack(NamedTuple):
    """Every adapter of one linear layer, concatenated: slot order (adapter -> slot), A_all [R, in],
    B_all [out, R] with each adapter's s folded in, each column's slot [R], and DoRA's m/||W0 + s·BA||
    [slots + 1, out] (1 for LoRA slots and the last, adapter-less one; None when no adapter is DoRA)."""

    order: dict[str, int]
    a: torch.Tensor
    b: torch.Tensor
    column_slot: torch.Tensor
    scale: torch.Tensor | None
    key: tuple


def stackable(layer: nn.Module) -> bool:
    """A linear layer (nn.Linear, Conv1D or quantised) whose adapters have no B bias and no active dropout."""
    return hasattr(layer, "lora_A") and all(
        layer.lora_B[name].bias is None and layer._dropout_p(name) == 0 for name in layer.adapter_names
    )


def add_stacked(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """The stacked way (module docstring): every row's term from the concatenated factors in two matmuls."""
    stack = adapter_stack(layer)
    slot = groups.slots(stack.order, x.device)
    rows = x.shape[0]
    own = (stack.column_slot[None, :] == slot[:, None]).to(stack.a.dtype)  # [rows, R]
    flat = x.reshape(rows, x.shape[-1]).to(stack.a.dtype)
    lora = ((flat @ stack.a.T) * own) @ stack.b.T  # [rows, out]
    lora = lora.reshape(result.shape).to(result.dtype)
    if stack.scale is None:
        return result + lora
    scale = stack.scale[slot].reshape(result.shape).to(result.dtype)
    return result + (scale - 1) * layer._without_bias(result) + scale * lora


def adapter_stack(layer: nn.Module) -> AdapterStack:
    """The layer's adapters concatenated (``AdapterStack``), rebuilt only when one of their tensors changed."""
    names = layer.adapter_names
    dora = [name for name in names if name in layer.lora_magnitude_vector]
    tensors = [t for name in names for t in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    tensors += [layer.lora_magnitude_vector[name] for name in dora]
    if dora:
        tensors.append(layer.base_weight)
    key = (tuple(names), *((t.data_ptr(), t._version) for t in tensors))
    cached = getattr(layer, "_adapter_stack", None)
    if cached is not None and cached.key == key:
        return cached
    with torch.no_grad():
        a = torch.cat([layer.lora_A[name].weight for name in names])
        b = torch.cat([layer.lora_B[name].weight * layer.scaling[name] for name in names], dim=1)
        column_slot = torch.cat(
            [torch.full((layer.r[name],), slot, device=a.device) for slot, name in enumerate(names)]
        )
        scale = None
        if dora:
            scale = torch.ones(len(names) + 1, b.shape[0], device=a.device)
            for slot, name in enumerate(names):
                if name in dora:
                    scale[slot] = layer.dora_scale(name)
    stack = AdapterStack({name: slot for slot, name in enumerate(names)}, a, b, column_slot, scale, key)
    layer._adapter_stack = stack
    return stack
