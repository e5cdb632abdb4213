"""LoRA's part of a mixed-adapter batch (``tuners/rows.py``): each row's adapter term added to the base output.

Two ways, the same sums:

- grouped (under autograd, for a prompt's many tokens, and for a non-linear layer): per adapter, its rows
  gathered, its term s·B A x computed once for them (DoRA: m/||W0 + s·BA|| on their base output too), and
  added back;
- stacked (decoding: one token per row, no autograd, a linear layer): the batch's adapters concatenated once
  (s folded into B), and the terms of all rows computed in two matmuls, each row keeping only its own
  adapter's rank columns::

      A_all [R, in] = [A_1; A_2; ...]     B_all [out, R] = [s_1 B_1, s_2 B_2, ...]     R = r_1 + r_2 + ...
      y += ((x A_allᵀ) ⊙ own) B_allᵀ       own [rows, R]: 1 on the columns of the row's adapter, else 0
                                            (made once per step, shared by the layers holding the same adapters)

  so a decoding step pays a handful of operations per layer instead of a handful per adapter (the wasted
  products, rows x R per layer, are what one token costs; a prompt's many tokens take the grouped way). The
  concatenation holds only the adapters in the batch (a server holding a hundred reads the factors of the few
  its requests name), and it is kept until the batch names other adapters or their tensors change (version
  counters and data pointers, checked each step; the layer's modules are looked up only to rebuild it).
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
    if not torch.is_grad_enabled() and x.numel() == x.shape[0] * x.shape[-1]:  # decoding: one token per row
        held = groups.held(layer.r)
        if held:
            stack = adapter_stack(layer, held)
            if stack.a is not None:
                return add_stacked(layer, stack, x, result, groups)
    in_place = not torch.is_grad_enabled()  # inference: write into the base output, no copy of it per adapter
    for name, index in groups.groups:
        if name not in layer.r:
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
    """The batch's adapters in one linear layer, concatenated: slot order (adapter -> slot), ranks (adapter -> r, the
    columns of each slot in turn), A_all [R, in], B_all [out, R] with each adapter's s folded in, and DoRA's
    m/||W0 + s·BA|| [slots + 1, out] (1 for LoRA slots and the last, adapter-less one; None when no adapter is DoRA).
    ``a`` is None when the layer cannot stack (not a linear layer, a B bias, active dropout). ``key`` and
    ``stamps`` say what it was built from (``adapter_stack``)."""

    order: dict[str, int]
    ranks: dict[str, int]
    a: torch.Tensor | None
    b: torch.Tensor | None
    scale: torch.Tensor | None
    key: tuple
    tensors: tuple[torch.Tensor, ...]
    stamps: tuple[tuple[int, int], ...]

    def fresh(self, layer: nn.Module, names: tuple[str, ...]) -> bool:
        """Still ``names`` as ``layer`` holds them: the same adapters, scales and mode, tensors unchanged in place."""
        return tuple(self.order) == names and self.key == _key(layer) and self.stamps == _stamps(self.tensors)


def _key(layer: nn.Module) -> tuple:
    return tuple(layer.scaling.items()), layer.training


def _stamps(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((t.data_ptr(), t._version) for t in tensors)


def stackable(layer: nn.Module, names: tuple[str, ...]) -> bool:
    """A linear layer (nn.Linear, Conv1D or quantised) whose adapters ``names`` have no B bias and no active
    dropout."""
    return hasattr(layer, "lora_A") and all(
        layer.lora_B[name].bias is None and layer._dropout_p(name) == 0 for name in names
    )


def add_stacked(
    layer: nn.Module, stack: AdapterStack, x: torch.Tensor, result: torch.Tensor, groups: RowGroups
) -> torch.Tensor:
    """The stacked way (module docstring): every row's term from the concatenated factors in two matmuls,
    added into the base output (no autograd here)."""
    rows = x.shape[0]
    own = groups.own_columns(stack.ranks, x.device, stack.a.dtype)
    flat = x.reshape(rows, x.shape[-1]).to(stack.a.dtype)
    picked = (flat @ stack.a.T).mul_(own)  # [rows, R]: each row's own adapter's rank columns
    if stack.scale is None and result.dtype == stack.b.dtype and result.is_contiguous():
        result.view(rows, -1).addmm_(picked, stack.b.T)
        return result
    lora = (picked @ stack.b.T).reshape(result.shape).to(result.dtype)
    if stack.scale is None:
        return result.add_(lora)
    scale = stack.scale[groups.slots(stack.order, x.device)].reshape(result.shape).to(result.dtype)
    return result + (scale - 1) * layer._without_bias(result) + scale * lora


def adapter_stack(layer: nn.Module, names: tuple[str, ...]) -> AdapterStack:
    """The layer's adapters ``names`` concatenated (``AdapterStack``), rebuilt only when the names change, one of
    their tensors changed in place (version counters) or moved (data pointers), or the layer's adapters, their
    scales or the mode changed (``forget_stack`` runs when an adapter is added or deleted)."""
    cached = layer.__dict__.get("_adapter_stack")
    if cached is not None and cached.fresh(layer, names):
        return cached
    order = {name: slot for slot, name in enumerate(names)}
    ranks = {name: layer.r[name] for name in names}
    if not stackable(layer, names):
        stack = AdapterStack(order, ranks, None, None, None, _key(layer), (), ())
        layer.__dict__["_adapter_stack"] = stack
        return stack
    dora = [name for name in names if name in layer.lora_magnitude_vector]
    tensors = [t for name in names for t in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    tensors += [layer.lora_magnitude_vector[name] for name in dora]
    if dora:
        tensors.append(layer.base_weight)
    with torch.no_grad():
        a = torch.cat([layer.lora_A[name].weight for name in names])
        b = torch.cat([layer.lora_B[name].weight * layer.scaling[name] for name in names], dim=1)
        scale = None
        if dora:
            scale = torch.ones(len(names) + 1, b.shape[0], device=a.device)
            for slot, name in enumerate(names):
                if name in dora:
                    scale[slot] = layer.dora_scale(name)
    stack = AdapterStack(order, ranks, a, b, scale, _key(layer), tuple(tensors), _stamps(tuple(tensors)))
    layer.__dict__["_adapter_stack"] = stack
    return stack


def forget_stack(layer: nn.Module) -> None:
    """Drop the layer's kept stack (its adapters were added or deleted)."""
    layer.__dict__.pop("_adapter_stack", None)
