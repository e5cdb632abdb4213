"""LoRA's part of a mixed-adapter batch (``tuners/rows.py``): each row's adapter term added to the base output.

Two ways, the same sums:

- grouped (under autograd, and for a non-linear layer): per adapter, its rows gathered, its term s·B A x
  computed once for them (DoRA: m/||W0 + s·BA|| on their base output too), and added back;
- batched (no autograd: a prompt's prefill or a decoding step; a linear layer): the batch's adapters stacked once
  (s folded into B, ranks padded with zeros to the largest), the rows gathered into one block per adapter
  (blocks padded with a zero row to the largest block), and every term computed in two batched matmuls::

      rows 0 1 2 3 4 of adapters a b a - b   ->   blocks [x0 x2] [x1 x4]        (row 3: the base alone)
      A [slots, r, in] = [A_a, A_b]          B [slots, r, out] = [s_a B_aᵀ, s_b B_bᵀ]
      y[rows of each block] += (blocks @ Aᵀ) @ B

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
import torch.nn.functional as F
from torch import nn

from deltatune.compat.torch import write_stamps
from deltatune.tuners.rows import Blocks, RowGroups


def add_per_row(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """``result`` (the base output for every row of ``x``) with each row's adapter term added; an adapter the
    layer does not hold adds nothing on its rows (it may target other modules)."""
    groups.check(x)
    if not torch.is_grad_enabled():  # inference: a prompt's tokens or decoding's one token per row
        held = groups.held(layer.r)
        if held:
            stack = adapter_stack(layer, held, groups.check_weights)
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
    """The batch's adapters in one linear layer, stacked: slot order (adapter -> slot), A [slots, r, in] (each
    adapter's A as it holds it, read through a transposed view: faster than Aᵀ at a few rows) and B [slots, r, out]
    (each adapter's s·Bᵀ), ranks padded with zeros to the largest, and DoRA's m/||W0 + s·BA|| [slots + 1, out] (1
    for LoRA slots and the last, adapter-less one; None when no adapter is DoRA).
    ``a`` is None when the layer cannot stack (not a linear layer, a B bias, active dropout). ``key``, ``sources``
    (each adapter's A, B and DoRA magnitude in turn, then the base weight, which DoRA's scale reads), ``spans``
    (adapter, or None for the base weight -> its part of ``sources``) and ``stamps`` (the sources' data pointers and
    version counters) say what it was built from (``adapter_stack``)."""

    order: dict[str, int]
    a: torch.Tensor | None
    b: torch.Tensor | None
    scale: torch.Tensor | None
    key: tuple
    sources: tuple[torch.Tensor, ...]
    spans: dict[str | None, slice]
    stamps: list[tuple[int, int]]

    def fresh(self, layer: nn.Module, names: tuple[str, ...], check_weights: bool = True) -> bool:
        """Still ``names`` as ``layer`` holds them: the same adapters, scales and mode, tensors unchanged in place
        (not read without ``check_weights``)."""
        same = tuple(self.order) == names and self.key == _key(layer)
        return same and (not check_weights or write_stamps(self.sources) == self.stamps)

    def subset(self, layer: nn.Module, names: tuple[str, ...], check_weights: bool = True) -> AdapterStack | None:
        """The stack of ``names`` cut from this one when it holds each of them unchanged (rows of some adapters
        left the batch; read without ``check_weights``): their slots selected, nothing rebuilt; None when it cannot
        be."""
        if self.a is None or self.key != _key(layer) or not self.order.keys() >= set(names):
            return None
        dora = any(name in layer.lora_magnitude_vector for name in names)
        keys = (*names, None) if dora else names
        if check_weights:
            now = write_stamps(self.sources)
            if any(now[self.spans[key]] != self.stamps[self.spans[key]] for key in keys):
                return None
        slots = torch.tensor([self.order[name] for name in names], device=self.a.device)
        rank = max(layer.r[name] for name in names)
        scale = None
        if dora:  # the adapter-less row's 1s stay last
            scale = self.scale.index_select(0, torch.cat([slots, slots.new_tensor([len(self.order)])]))
        a, b = self.a[:, :rank].index_select(0, slots), self.b[:, :rank].index_select(0, slots)
        order = {name: slot for slot, name in enumerate(names)}
        parts = {key: (self.sources[self.spans[key]], self.stamps[self.spans[key]]) for key in keys}
        return _stack(order, a, b, scale, self.key, parts)


def _stack(
    order: dict[str, int],
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    scale: torch.Tensor | None,
    key: tuple,
    parts: dict[str | None, tuple[tuple[torch.Tensor, ...], list[tuple[int, int]]]],
) -> AdapterStack:
    """An ``AdapterStack`` built from ``parts`` (adapter, or None for the base weight -> its source tensors and
    their stamps)."""
    spans, start = {}, 0
    for name, (tensors, _) in parts.items():
        spans[name], start = slice(start, start + len(tensors)), start + len(tensors)
    sources = tuple(tensor for tensors, _ in parts.values() for tensor in tensors)
    stamps = [stamp for _, part in parts.values() for stamp in part]
    return AdapterStack(order, a, b, scale, key, sources, spans, stamps)


def _key(layer: nn.Module) -> tuple:
    return tuple(layer.scaling.items()), layer.training


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
    blocks = groups.blocks(stack.order, x.device)
    if stack.scale is None and result.dtype == stack.b.dtype and result.is_contiguous():
        add_terms(stack.a, [(stack.b, result.view(rows, -1, result.shape[-1]))], x, blocks)
        return result
    lora = stack.b.new_zeros(result.shape)  # the terms apart: DoRA scales them, or another dtype or layout
    add_terms(stack.a, [(stack.b, lora.view(rows, -1, lora.shape[-1]))], x, blocks)
    lora = lora.to(result.dtype)
    if stack.scale is None:
        return result.add_(lora)
    scale = stack.scale[groups.slots(stack.order, x.device)]  # [rows, out], broadcast over each row's tokens
    scale = scale.view(rows, *[1] * (result.dim() - 2), -1).to(result.dtype)
    return result + (scale - 1) * layer._without_bias(result) + scale * lora


def add_terms(a: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, blocks: Blocks):
    """``into += (x Aᵀ)[its ranks] B`` for every (B [slots, r, out], into [rows, T, out]) of ``targets``, each row
    through its adapter's slot (``blocks``), in place: one product by A [slots, Σr, in] for all targets (the
    ranks of each B in turn), one by each B. ``into`` is a view of the output (a joined product's columns)."""
    rows, slots, features = x.shape[0], a.shape[0], x.shape[-1]
    if blocks.sliced:  # the blocks are the batch's first rows: terms added into their slice in place
        tokens = x.reshape(-1, features)  # [rows x T, in], each row's T tokens in turn
        tokens = tokens if tokens.dtype == a.dtype else tokens.to(a.dtype)
        width = slots * blocks.width * (tokens.shape[0] // rows)  # the blocks' tokens: the first ``width``
        every = width == tokens.shape[0]  # every row has an adapter (a decoding step's usual case): no slices
        tokens = tokens if every else tokens[:width]
        if slots == 1:  # one adapter: plain products (a batch of one matmul runs slower)
            low = F.linear(tokens, a[0])
        else:
            low = torch.bmm(tokens.view(slots, width // slots, features), a.transpose(1, 2))
        start = 0
        for b, into in targets:
            part = low if len(targets) == 1 else low[..., start : start + b.shape[1]]
            start += b.shape[1]
            flat = into.view(-1, into.shape[-1])  # a view: the terms land in the output
            flat = flat if every else flat[:width]
            if slots == 1:
                flat.addmm_(part, b[0])
            elif flat.is_contiguous():
                flat.view(slots, width // slots, -1).baddbmm_(part, b)
            else:  # some columns of a joined output: baddbmm_ would go slot by slot
                flat.view(slots, width // slots, -1).add_(torch.bmm(part, b))
        return
    tokens = x.reshape(rows, -1, features).to(a.dtype)  # [rows, T, in]
    if blocks.padded:
        tokens = torch.cat([tokens, tokens.new_zeros(1, *tokens.shape[1:])])  # the row padding gathers
    tokens = tokens.index_select(0, blocks.source).view(slots, -1, features)  # each block's rows in turn
    low, start = torch.bmm(tokens, a.transpose(1, 2)), 0
    for b, into in targets:
        part, start = low[..., start : start + b.shape[1]], start + b.shape[1]
        terms = torch.bmm(part, b).view(len(blocks.target), -1, into.shape[-1])
        into.index_add_(0, blocks.target, terms)  # padding adds its zeros to row 0


def adapter_stack(layer: nn.Module, names: tuple[str, ...], check_weights: bool = True) -> AdapterStack:
    """The layer's adapters ``names`` stacked (``AdapterStack``), kept until the names change, one of their
    tensors changes in place (version counters) or moves (data pointers), or the layer's adapters, their scales or
    the mode change (``forget_stack`` runs when an adapter is added, deleted or merged: no mixed batch runs until
    it is unmerged). Without ``check_weights`` the tensors are not read (``DeltaModel.adapter_rows``: the caller
    vouches they are unchanged since a block that read them; at 16 adapters the reading, its tensors cold in the
    cache, is a tenth of a decoding step).

    The last stack built from the layer's factors is kept too, and a batch naming some of its adapters (rows that
    left, a smaller batch next) is cut from it (``AdapterStack.subset``: one copy of the factors it selects)
    instead of rebuilt (two transposing copies, a dozen operations per adapter)."""
    kept = layer.__dict__.get("_adapter_stack")
    if kept is not None and kept.fresh(layer, names, check_weights):
        return kept
    built = layer.__dict__.get("_adapter_stack_built")
    stack = None
    if built is not None:
        fresh = built.fresh(layer, names, check_weights)
        stack = built if fresh else built.subset(layer, names, check_weights)
    if stack is None:
        stack = layer.__dict__["_adapter_stack_built"] = _build(layer, names)
    layer.__dict__["_adapter_stack"] = stack
    return stack


def _build(layer: nn.Module, names: tuple[str, ...]) -> AdapterStack:
    """``names`` stacked from the layer's own factors (``AdapterStack``)."""
    order = {name: slot for slot, name in enumerate(names)}
    if not stackable(layer, names):
        return _stack(order, None, None, None, _key(layer), {})
    dora = [name for name in names if name in layer.lora_magnitude_vector]
    parts: dict[str | None, tuple[torch.Tensor, ...]] = {
        name: (layer.lora_A[name].weight, layer.lora_B[name].weight)
        + ((layer.lora_magnitude_vector[name],) if name in dora else ())
        for name in names
    }
    if dora:
        parts[None] = (layer.base_weight,)
    with torch.no_grad():
        rank = max(layer.r[name] for name in names)
        a = torch.stack([_padded(parts[name][0], rank) for name in names])  # [slots, rank, in]
        b = torch.stack([_padded(parts[name][1].T, rank) for name in names])  # [slots, rank, out]
        b.mul_(torch.tensor([float(layer.scaling[name]) for name in names], device=b.device).view(-1, 1, 1))
        scale = None
        if dora:
            scale = torch.ones(len(names) + 1, b.shape[2], device=a.device)
            for name in dora:
                scale[order[name]] = layer.dora_scale(name)
    stamped = {name: (tensors, write_stamps(tensors)) for name, tensors in parts.items()}
    return _stack(order, a, b, scale, _key(layer), stamped)


def _padded(factor: torch.Tensor, rank: int) -> torch.Tensor:
    """``factor`` ([r, features]) with rows of zeros after its own up to ``rank`` (itself when it has that rank)."""
    missing = rank - factor.shape[0]
    return F.pad(factor, [0, 0, 0, missing]) if missing else factor


def forget_stack(layer: nn.Module) -> None:
    """Drop the layer's kept stacks (its adapters were added, deleted or merged)."""
    layer.__dict__.pop("_adapter_stack", None)
    layer.__dict__.pop("_adapter_stack_built", None)
    layer.__dict__.pop("_joined_stack", None)
