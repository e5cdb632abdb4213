"""LoRA's part of a mixed-adapter batch (``tuners/rows.py``): each row's adapter term added to the base output.

Two ways, the same sums:

- grouped (under autograd, and for a non-linear layer): per adapter, its rows gathered, its term s·B A x
  computed once for them (DoRA: m/||W0 + s·BA|| on their base output too), and added back;
- batched (no autograd: a prompt's prefill or a decoding step; a linear layer): the batch's adapters stacked once
  (s folded into B, ranks padded with zeros to the largest), the rows gathered into one block per adapter
  (blocks padded with a zero row to the largest block), and every term computed in two batched matmuls::

      rows 0 1 2 3 4 of adapters a b a - b   ->   blocks [x0 x2] [x1 x4]        (row 3: the base alone)
      A [slots, in, r] = [A_aᵀ, A_bᵀ]          B [slots, r, out] = [s_a B_aᵀ, s_b B_bᵀ]
      y[rows of each block] += (blocks @ A) @ B

  so a decoding step pays a handful of operations per layer whatever the number of adapters, and reads each
  adapter's factors once (Punica's batched GEMV, on ``torch.bmm``). When the blocks are the batch's first rows
  in order (one adapter on every row; the generation engine's batches) they are a slice of it, and the terms
  are added into the base output in place. The stack holds only the
  adapters in the batch (a server holding a hundred reads the factors of the few its requests name), and it
  is kept until the batch names other adapters or their tensors change (version counters and data pointers,
  checked each step; the layer's modules are looked up only to rebuild it).
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
    if not torch.is_grad_enabled():  # inference: a prompt's tokens or decoding's one token per row
        held = groups.held(layer.r)
        if held:
            stack = adapter_stack(layer, held)
            if stack.a is not None:
                return add_batched(layer, stack, x, result, groups)
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
    """The batch's adapters in one linear layer, stacked: slot order (adapter -> slot), A [slots, in, r] (each
    adapter's Aᵀ) and B [slots, r, out] (each adapter's s·Bᵀ), ranks padded with zeros to the largest, and DoRA's
    m/||W0 + s·BA|| [slots + 1, out] (1 for LoRA slots and the last, adapter-less one; None when no adapter is DoRA).
    ``a`` is None when the layer cannot stack (not a linear layer, a B bias, active dropout). ``key`` and
    ``stamps`` say what it was built from (``adapter_stack``)."""

    order: dict[str, int]
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


def add_batched(
    layer: nn.Module, stack: AdapterStack, x: torch.Tensor, result: torch.Tensor, groups: RowGroups
) -> torch.Tensor:
    """The batched way (module docstring): every row's term from its adapter's block in two batched matmuls,
    added into the base output (no autograd here). A row's tokens (a prompt's, or decoding's one) travel together."""
    rows = x.shape[0]
    tokens = x.reshape(rows, -1, x.shape[-1]).to(stack.a.dtype)  # [rows, T, in]
    plain = stack.scale is None and result.dtype == stack.b.dtype and result.is_contiguous()
    blocks = groups.blocks(stack.order, x.device)
    if plain and blocks.sliced:  # the blocks are the batch's first rows: terms added into their slice in place
        count, slots = len(blocks.source), len(stack.order)
        inputs = tokens[:count].reshape(slots, -1, tokens.shape[-1])
        into = result.view(rows, -1)[:count].view(slots, inputs.shape[1], -1)
        if slots == 1:  # one adapter: two plain products (a batch of one matmul runs slower)
            into[0].addmm_(inputs[0] @ stack.a[0], stack.b[0])
        else:
            into.baddbmm_(torch.bmm(inputs, stack.a), stack.b)
        return result
    if blocks.padded:
        tokens = torch.cat([tokens, tokens.new_zeros(1, *tokens.shape[1:])])  # the row padding gathers
    gathered = tokens.index_select(0, blocks.source).view(len(stack.order), -1, tokens.shape[-1])
    terms = torch.bmm(torch.bmm(gathered, stack.a), stack.b).view(len(blocks.target), -1)  # [block rows, T x out]
    if plain:
        result.view(rows, -1).index_add_(0, blocks.target, terms)  # padding adds its zeros to row 0
        return result
    lora = terms.new_zeros(rows, terms.shape[1]).index_add_(0, blocks.target, terms)
    lora = lora.reshape(result.shape).to(result.dtype)
    if stack.scale is None:
        return result.add_(lora)
    scale = stack.scale[groups.slots(stack.order, x.device)]  # [rows, out], broadcast over each row's tokens
    scale = scale.view(rows, *[1] * (result.dim() - 2), -1).to(result.dtype)
    return result + (scale - 1) * layer._without_bias(result) + scale * lora


def adapter_stack(layer: nn.Module, names: tuple[str, ...]) -> AdapterStack:
    """The layer's adapters ``names`` stacked (``AdapterStack``), rebuilt only when the names change, one of
    their tensors changed in place (version counters) or moved (data pointers), or the layer's adapters, their
    scales or the mode changed (``forget_stack`` runs when an adapter is added or deleted)."""
    cached = layer.__dict__.get("_adapter_stack")
    if cached is not None and cached.fresh(layer, names):
        return cached
    order = {name: slot for slot, name in enumerate(names)}
    if not stackable(layer, names):
        stack = AdapterStack(order, None, None, None, _key(layer), (), ())
        layer.__dict__["_adapter_stack"] = stack
        return stack
    dora = [name for name in names if name in layer.lora_magnitude_vector]
    tensors = [t for name in names for t in (layer.lora_A[name].weight, layer.lora_B[name].weight)]
    tensors += [layer.lora_magnitude_vector[name] for name in dora]
    if dora:
        tensors.append(layer.base_weight)
    with torch.no_grad():
        first = layer.lora_A[names[0]].weight
        rank = max(layer.r[name] for name in names)
        in_features, out_features = first.shape[1], layer.lora_B[names[0]].weight.shape[0]
        a = first.new_zeros(len(names), in_features, rank)
        b = first.new_zeros(len(names), rank, out_features)
        for slot, name in enumerate(names):
            r = layer.r[name]
            a[slot, :, :r] = layer.lora_A[name].weight.T
            b[slot, :r, :] = (layer.lora_B[name].weight * layer.scaling[name]).T
        scale = None
        if dora:
            scale = torch.ones(len(names) + 1, out_features, device=a.device)
            for slot, name in enumerate(names):
                if name in dora:
                    scale[slot] = layer.dora_scale(name)
    stack = AdapterStack(order, a, b, scale, _key(layer), tuple(tensors), _stamps(tuple(tensors)))
    layer.__dict__["_adapter_stack"] = stack
    return stack


def forget_stack(layer: nn.Module) -> None:
    """Drop the layer's kept stack (its adapters were added or deleted)."""
    layer.__dict__.pop("_adapter_stack", None)
