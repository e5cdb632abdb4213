"""A lean decoder's linear layers as few products as possible, when the generation engine runs it on packed weights
(``compat.transformers.lean_forward``): layers that read the same input (an attention's q, k and v; a gated MLP's
gate and up) as one product, and a mixed batch's LoRA terms added into it::

    [q | k | v] = x [Wq; Wk; Wv]ᵀ                    one oneDNN product over the three weights stacked and packed
    [q | k | v] += (x [Aq; Ak; Av]ᵀ) · B              a mixed batch's LoRA terms: one product by the stacked A's,
                                                     then the B's: one block-diagonal product for one adapter,
                                                     else each B into its own columns (per adapter block)

A group joins when each of its layers is a plain ``nn.Linear`` or a LoRA layer over one, without hooks; otherwise
(another method's layer, a hook, a 4-bit base) its layers run one by one. LoRA layers whose stacks cannot share
the first product (DoRA, other adapters held, a B bias, running without a mixed batch) add their terms one by one
onto their columns. What each group runs is worked out at its first call and kept (``JoinedProjections``): a
decoding step then pays two or three operations a group, not a walk through its modules' adapters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from deltatune.compat.torch import any_hooks
from deltatune.kernels.packed_linear import PackedWeights
from deltatune.tuners.lora.layer import LoraLinear
from deltatune.tuners.lora.rows import adapter_stack, add_terms
from deltatune.tuners.rows import Blocks, RowGroups

Run = Callable[[torch.Tensor], torch.Tensor]


def joinable(modules: tuple[nn.Module, ...]) -> tuple[nn.Linear, ...] | None:
    """The base ``nn.Linear`` of each module when every module is one (or a LoRA layer over one) without hooks;
    else None."""
    bases = tuple(module.base_layer if type(module) is LoraLinear else module for module in modules)
    if any(type(base) is not nn.Linear for base in bases) or any_hooks({*modules, *bases}):
        return None
    return bases


class JoinedProjections:
    """A lean decoder's groups of layers (``compat.transformers.projections``), those that can run as one product
    (``joinable``: checked when the object is made), and their products: ``lean_forward``'s ``project``. ``groups``
    are the base layers to pack together (``PackedWeights.applied``).

    What a group runs (its packed product, its adapters' stacked factors and the batch's row blocks) is found at
    its first call and kept for the object's life: make one per forward, or keep one across forwards only while
    the batch's rows and adapters, the model's weights, modules and hooks all stay the same (the generation
    engine's decoding steps under ``static_weights``)."""

    def __init__(self, groups: Sequence[tuple[nn.Module, ...]], packed: PackedWeights) -> None:
        self.packed = packed
        self._bases = {group: bases for group in groups if (bases := joinable(group)) is not None}
        self.groups = list(self._bases.values())
        self._runs: dict[tuple[nn.Module, ...], Run | None] = {}

    def __call__(self, modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor | None:
        """The outputs of ``modules`` for ``x`` side by side [..., Σ out], from one packed product and their
        adapters' terms; None when they cannot be joined (the caller calls them one by one)."""
        if torch.is_grad_enabled():
            return None
        if modules not in self._runs:
            self._runs[modules] = self._run(modules)
        run = self._runs[modules]
        return None if run is None else run(x)

    def _run(self, modules: tuple[nn.Module, ...]) -> Run | None:
        """What ``modules`` run as one product (with their adapters' terms), or None when they cannot."""
        bases = self._bases.get(modules)
        forward = None if bases is None else self.packed.joined_forward(bases)
        if forward is None:
            return None
        adapted = [(i, module) for i, module in enumerate(modules) if module is not bases[i]]
        if not adapted or all(_adds_nothing(module) for _, module in adapted):
            return forward
        widths = [base.out_features for base in bases]
        joined = _joined_stacks(adapted, widths, bases[0].weight.dtype)
        if joined is None:
            return functools.partial(_terms_one_by_one, forward, adapted, widths)
        return functools.partial(_with_terms, forward, widths, *joined)


def _with_terms(
    forward: Run,
    widths: list[int],
    a: torch.Tensor,
    targets: list[tuple[int | None, torch.Tensor]],
    groups: RowGroups,
    blocks: Blocks,
    x: torch.Tensor,
) -> torch.Tensor:
    """``forward(x)`` with the batch's LoRA terms added in place (``rows.add_terms``): each target's B into the
    columns of the module at its place, or (place None) into every column."""
    groups.check(x)
    out = forward(x)
    whole = out.view(x.shape[0], -1, out.shape[-1])
    columns = whole.split(widths, dim=-1) if any(place is not None for place, _ in targets) else ()
    add_terms(a, [(b, whole if place is None else columns[place]) for place, b in targets], x, blocks)
    return out


def _terms_one_by_one(
    forward: Run, adapted: list[tuple[int, LoraLinear]], widths: list[int], x: torch.Tensor
) -> torch.Tensor:
    """``forward(x)`` with each adapted module's terms added onto its columns by the module itself."""
    out = forward(x)
    columns = out.view(x.shape[0], -1, out.shape[-1]).split(widths, dim=-1)
    for i, module in adapted:
        part = columns[i].view(*out.shape[:-1], -1)
        added = module.add_adapters(x, part)
        if added is not part:  # DoRA, or out of place: write it into its columns
            part.copy_(added)
    return out


def _adds_nothing(layer: LoraLinear) -> bool:
    """Whether ``layer`` adds no term on any row: a mixed batch none of whose adapters it holds."""
    groups = layer.row_groups
    return groups is not None and not layer.disabled and not groups.held(layer.r)


def _joined_stacks(adapted: list[tuple[int, LoraLinear]], widths: list[int], dtype: torch.dtype):
    """(A [slots, Σr, in]: the adapted layers' stacked A's side by side, the B's as ``_with_terms`` takes them, the
    batch's row groups, its blocks of rows) when every adapted layer runs the same adapters of one mixed batch from
    a plain stack (``rows.adapter_stack``); else None. With one adapter in the batch the B's are one block-diagonal
    B [1, Σr, Σ out] over every column of the group (zeros for a module without the adapter): one product. With
    more, each B goes to its own columns: the zero blocks of every adapter would cost more to read than the products
    they save. The stacked factors are kept on the first layer until one of the stacks is rebuilt."""
    layers = [layer for _, layer in adapted]
    groups = layers[0].row_groups
    if groups is None or any(layer.row_groups is not groups or layer.disabled for layer in layers):
        return None
    held = groups.held(layers[0].r)
    if not held or any(groups.held(layer.r) != held for layer in layers[1:]):
        return None
    stacks = [adapter_stack(layer, held, groups.check_weights) for layer in layers]
    if any(stack.a is None or stack.scale is not None or stack.b.dtype != dtype for stack in stacks):
        return None
    kept = layers[0].__dict__.get("_joined_stack")
    if kept is None or len(kept[0]) != len(stacks) or any(s is not t for s, t in zip(kept[0], stacks)):
        a = torch.cat([stack.a for stack in stacks], dim=1)
        if len(held) == 1:
            targets = [(None, _block_diagonal([stack.b for stack in stacks], [i for i, _ in adapted], widths))]
        else:
            targets = [(i, stack.b) for (i, _), stack in zip(adapted, stacks)]
        kept = layers[0].__dict__["_joined_stack"] = (tuple(stacks), a, targets)
    return kept[1], kept[2], groups, groups.blocks(stacks[0].order, kept[1].device)


def _block_diagonal(bs: list[torch.Tensor], places: list[int], widths: list[int]) -> torch.Tensor:
    """One adapter's B's [1, r_i, out_i] (of the modules at ``places`` of a group with output ``widths``) as one
    [1, Σr, Σ out]: each B in its own rows and its module's columns, zeros elsewhere::

        [B_q  0   0 ]
        [ 0   0  B_v]     (k without the adapter: its columns get zeros)

    A module alone (o_proj, down_proj) keeps its own B.
    """
    if len(widths) == 1:
        return bs[0]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    whole = bs[0].new_zeros(1, sum(b.shape[1] for b in bs), sum(widths))
    row = 0
    for b, place in zip(bs, places):
        whole[0, row : row + b.shape[1], starts[place] : starts[place] + widths[place]] = b[0]
        row += b.shape[1]
    return whole
