"""Layers that read the same input (an attention's q, k and v; a gated MLP's gate and up) as one product, when the
generation engine runs a lean decoder on packed weights (``compat.transformers.lean_forward``)::

    [q | k | v] = x [Wq; Wk; Wv]ᵀ                    one oneDNN product over the three weights stacked and packed
    [q | k | v] += (x [Aq; Ak; Av]ᵀ) · (Bq, Bk, Bv)   a mixed batch's LoRA terms: one product by the stacked A's,
                                                     then each B into its own columns (per adapter block)

Fewer, larger products and fewer Python calls: a 16-row SmolLM2 decoding step with one LoRA adapter on every
linear layer went from 7 products (plus 14 for LoRA) per layer to 4 (plus 11). A group joins when each of its
layers is a plain ``nn.Linear`` or a LoRA layer over one, without hooks; otherwise (another method's layer, a
hook, a 4-bit base) its layers run one by one. LoRA layers whose stacks cannot share the first product (DoRA,
other adapters held, a B bias, running without a mixed batch) add their terms one by one onto their columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deltatune.compat.torch import any_hooks
from deltatune.kernels.packed_linear import PackedWeights
from deltatune.tuners.lora.layer import LoraLinear
from deltatune.tuners.lora.rows import adapter_stack, add_terms


def joinable(modules: tuple[nn.Module, ...]) -> tuple[nn.Linear, ...] | None:
    """The base ``nn.Linear`` of each module when every module is one (or a LoRA layer over one) without hooks;
    else None."""
    bases = tuple(module.base_layer if type(module) is LoraLinear else module for module in modules)
    if any(type(base) is not nn.Linear for base in bases) or any_hooks({*modules, *bases}):
        return None
    return bases


class JoinedProjections:
    """A lean decoder's groups of layers that read the same input (``compat.transformers.shared_inputs``), those
    that can run as one product now (``joinable``: checked once, when a forward starts), and their products:
    ``lean_forward``'s ``project``. ``groups`` are the base layers to pack together (``PackedWeights.applied``)."""

    def __init__(self, groups: Sequence[tuple[nn.Module, ...]], packed: PackedWeights) -> None:
        self.packed = packed
        self._bases = {group: bases for group in groups if (bases := joinable(group)) is not None}
        self.groups = list(self._bases.values())

    def __call__(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor | None:
        """The outputs of ``modules`` for ``x`` side by side [..., Σ out], from one packed product and their
        adapters' terms; None when they cannot be joined (the caller calls them one by one)."""
        bases = self._bases.get(modules)
        forward = None if bases is None or torch.is_grad_enabled() else self.packed.joined_forward(bases)
        if forward is None:
            return None
        out = forward(x)
        adapted = [(i, module) for i, module in enumerate(modules) if module is not bases[i]]
        if not adapted:
            return out
        columns = out.view(x.shape[0], -1, out.shape[-1]).split([base.out_features for base in bases], dim=-1)
        joined = _joined_stacks([module for _, module in adapted], out)
        if joined is not None:
            a, stacks, groups = joined
            groups.check(x)
            targets = [(stack.b, columns[i]) for stack, (i, _) in zip(stacks, adapted)]
            add_terms(a, targets, x, groups.blocks(stacks[0].order, x.device))
            return out
        for i, module in adapted:
            part = columns[i].view(*out.shape[:-1], -1)
            added = module.add_adapters(x, part)
            if added is not part:  # DoRA, or out of place: write it into its columns
                part.copy_(added)
        return out


def _joined_stacks(layers: list[LoraLinear], out: torch.Tensor):
    """(A [slots, Σr, in]: the layers' stacked A's side by side, their stacks, the batch's row groups) when every
    layer runs the same adapters of one mixed batch from a plain stack (``rows.adapter_stack``); else None. The
    stacked A's are kept on the first layer until one of the stacks is rebuilt."""
    groups = layers[0].row_groups
    if groups is None or any(layer.row_groups is not groups or layer.disabled for layer in layers):
        return None
    held = groups.held(layers[0].r)
    if not held or any(groups.held(layer.r) != held for layer in layers[1:]):
        return None
    stacks = [adapter_stack(layer, held, groups.check_weights) for layer in layers]
    if any(stack.a is None or stack.scale is not None or stack.b.dtype != out.dtype for stack in stacks):
        return None
    kept = layers[0].__dict__.get("_joined_stack")
    if kept is None or len(kept[0]) != len(stacks) or any(s is not t for s, t in zip(kept[0], stacks)):
        kept = layers[0].__dict__["_joined_stack"] = (tuple(stacks), torch.cat([stack.a for stack in stacks], dim=1))
    return kept[1], stacks, groups
