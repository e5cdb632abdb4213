"""A model's linear layers run on weights packed once for oneDNN, while decoding on a CPU.

A decoding step multiplies a few rows (one token per sequence) by every weight of the model. At such small
row counts torch's default fp32 GEMM on CPU is far from the memory bandwidth, while oneDNN's inner product
over a weight reordered once into its blocked layout is 2-3x faster (AMD EPYC, 2 cores, 16 rows:
SmolLM2-135M's 49k-word head 21 -> 6.6 ms, its 210 layer weights 44 -> 23 ms). Packing every weight takes
about 0.2 s, several such steps, so it pays for batches that decode many steps: a server's life, a GRPO
rollout, a command's answers, not one short answer::

    packed = PackedWeights(model)            # nothing is packed yet
    with packed.applied():                   # every fp32/bf16 nn.Linear on the CPU, for this block:
        model(...)                           #   forward = oneDNN on its packed weight (packed now, or kept)

Layers that read the same input (an attention's q, k and v) can be packed as one weight instead:
``applied(joined=[(q, k, v), ...])`` leaves their own forwards alone and ``joined_forward((q, k, v))`` gives their
outputs side by side from one product (fewer, larger products: ``tuners/lora/joined.py`` runs them so while the
generation engine runs a lean decoder). Either way each weight is packed once.

Outside the block the layers are untouched (training, saving and merging see plain ``nn.Linear``). Inside
it a layer's forward is patched, so a LoRA layer over it takes its plain path (base output plus the rank-r
terms) rather than its fused function, whose base product reads the weight directly. The layers of a joined
group are not patched: called one by one (their group not joined at that call), they run torch's product.
A pack is remade when its weight changes (a merge writes into it, a reload replaces it), checked each time
``applied`` walks the layers; a caller that keeps ``patches()`` across forwards vouches the weights did not
change (the generation engine's ``static_weights``). The packs are freed with the object. The packed copy
holds as many bytes as the weight: packing doubles the memory of the base's linear weights. With
``huge_pages=True`` (a server's, which keeps its packs) a block that packed anything ends by moving the process's
filled memory onto 2 MiB pages (``runtime/huge_pages.py``: fewer page-table walks as a step reads the weights).

A weight is packed in pieces of at most 32 MiB (row blocks; their outputs are concatenated). glibc serves a
larger block by mapping fresh memory, counted on top of the heap memory the process keeps after freeing it;
pieces fit in that heap memory instead. GRPO packs for each rollout, after a training step freed its
activations: SmolLM2's 113 MiB head in one block raised the run's peak by 160 MiB, in pieces by 30 MiB.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.compat.torch import (
    has_hooks,
    onednn_linear,
    onednn_pack,
    onednn_packing_available,
    onednn_packs,
    write_stamps,
)
from deltatune.runtime.huge_pages import collapse as collapse_to_huge_pages

PACKED_DTYPES = (torch.float32, torch.bfloat16)
Patch = tuple[nn.Linear, Callable[[torch.Tensor], torch.Tensor]]  # a layer and its forward on its packed weight
PIECE_BYTES = 32 << 20  # the largest block glibc serves from its heap (M_MMAP_THRESHOLD's ceiling, 64-bit)


class PackedWeights:
    """oneDNN-packed copies of ``model``'s ``nn.Linear`` weights, made on first use (see the module)."""

    def __init__(self, model: nn.Module, huge_pages: bool = False) -> None:
        self.model = model
        self.huge_pages = huge_pages  # after a block that packed: the memory onto huge pages (``runtime.huge_pages``)
        self._packs: dict = {}  # a layer, or a joined group's tuple of layers -> (weight stamps, packed forward)
        self._available = onednn_packing_available()
        self._fresh = False  # packed since the last collapse

    @contextlib.contextmanager
    def applied(
        self, joined: Sequence[tuple[nn.Linear, ...]] = (), patches: Sequence[Patch] | None = None
    ) -> Iterator[None]:
        """Run every packable layer on its packed weight inside the block (under ``torch.no_grad``). The layers of
        each group in ``joined`` (layers that read the same input) are packed together instead, as one weight for
        ``joined_forward``, and their own forwards stay as they are: one copy of each weight, not two. ``patches``:
        what ``patches(joined)`` gave before, kept by a caller that vouches nothing changed since (the weights,
        the modules, their hooks), so the model's layers are not walked again."""
        patched = []
        try:
            if not torch.is_grad_enabled():
                for layer, forward in self.patches(joined) if patches is None else patches:
                    layer.__dict__["forward"] = forward  # not nn.Module.__setattr__: ~1 ms a forward
                    patched.append(layer)
            yield
        finally:
            for layer in patched:
                layer.__dict__.pop("forward", None)
            if self._fresh and self.huge_pages:
                collapse_to_huge_pages()
            self._fresh = False

    def patches(self, joined: Sequence[tuple[nn.Linear, ...]] = ()) -> list[Patch]:
        """Each packable layer outside the groups of ``joined`` with its forward on its packed weight (what
        ``applied`` sets); packs no longer run that way are dropped."""
        if not self._available:
            return []
        members = {layer for group in joined for layer in group}
        layers = [layer for layer in self.packable_layers() if layer not in members]
        for gone in self._packs.keys() - {*layers, *joined}:  # no longer run this way (or a group's now)
            del self._packs[gone]
        return [(layer, self._packed(layer)) for layer in layers]

    def packable_layers(self) -> list[nn.Linear]:
        """The model's own linear layers (not an adapter's factors: below a tuner layer only its base layer is
        walked): exactly ``nn.Linear``, hook-free, with an fp32/bf16 weight on the CPU. Trainable ones too: the
        block runs under ``no_grad``, and a weight an optimizer stepped since is packed again."""
        return [layer for layer in _base_linears(self.model) if _packable(layer.weight) and not has_hooks(layer)]

    def joined_forward(self, layers: tuple[nn.Linear, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The outputs of ``layers`` (``nn.Linear`` layers reading the same input) side by side, ``[..., Σ out]``,
        from one product over their weights stacked and packed (kept until one of them changes); None when they
        cannot share one (another dtype or device, different input sizes, or no packing here)."""
        weights = [layer.weight for layer in layers]
        if not all(map(_packable, weights)) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
            self._packs.pop(layers, None)  # a pack made before the weights moved or changed dtype
            return None
        stamp = write_stamps(t for layer in layers for t in (layer.weight, layer.bias) if t is not None)
        kept = self._packs.get(layers)
        if kept is None or kept[0] != stamp:
            with torch.no_grad():
                rows, pieces = self._pieces(torch.cat(weights))
                bias, biases = None, [layer.bias for layer in layers]
                if any(b is not None for b in biases):
                    bias = torch.cat([w.new_zeros(len(w)) if b is None else b for w, b in zip(weights, biases)])
            kept = self._packs[layers] = (stamp, functools.partial(_joined_forward, layers, bias, rows, pieces))
        return kept[1]

    def _packed(self, layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        """``layer``'s forward on its packed weight, kept until the weight changes in place or is replaced."""
        stamp = write_stamps((layer.weight,))
        kept = self._packs.get(layer)
        if kept is None or kept[0] != stamp:
            rows, pieces = self._pieces(layer.weight)
            kept = self._packs[layer] = (stamp, functools.partial(_packed_forward, layer, rows, pieces))
        return kept[1]

    def _pieces(self, weight: torch.Tensor) -> tuple[int, tuple[torch.Tensor, ...]]:
        """``weight`` [out, in] packed in pieces of at most ``PIECE_BYTES``: (rows a piece, the packed pieces)."""
        self._fresh = True
        rows = max(1, PIECE_BYTES // (weight.shape[1] * weight.element_size()))
        return rows, tuple(onednn_pack(part) for part in weight.split(rows))


def _base_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers under ``model``, in order; below a tuner layer only its base layer (a loop over
    each module's children, not nested generators: this runs at every decoding step)."""
    found, pending = [], [model]
    while pending:
        module = pending.pop()
        if type(module) is nn.Linear:
            found.append(module)
        elif getattr(type(module), "is_delta_layer", False):
            pending.append(module.base_layer)
        else:
            pending.extend(child for child in reversed(module._modules.values()) if child is not None)
    return found


def _packable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and onednn_packs(weight.dtype)


def _packed_forward(layer: nn.Linear, rows: int, pieces: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through its packed weight; anything the pack cannot take runs ``nn.Linear``'s own product."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != layer.weight.dtype:
        return F.linear(x, layer.weight, layer.bias)
    return _through(pieces, rows, layer.bias, x)


def _joined_forward(
    layers: tuple[nn.Linear, ...],
    bias: torch.Tensor | None,
    rows: int,
    pieces: tuple[torch.Tensor, ...],
    x: torch.Tensor,
) -> torch.Tensor:
    """``[layer(x) for layer in layers]`` side by side through their packed stacked weight (``bias``: their biases
    stacked); anything the pack cannot take runs each layer's own product."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != layers[0].weight.dtype:
        return torch.cat([F.linear(x, layer.weight, layer.bias) for layer in layers], dim=-1)
    return _through(pieces, rows, bias, x)


def _through(pieces: tuple[torch.Tensor, ...], rows: int, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b`` for W packed in ``pieces`` of ``rows`` rows."""
    if len(pieces) == 1:
        return onednn_linear(x, pieces[0], bias)
    biases = [None] * len(pieces) if bias is None else bias.split(rows)
    return torch.cat([onednn_linear(x, piece, part) for piece, part in zip(pieces, biases)], dim=-1)
