"""OFT layers: ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` with named rotations (``rotation.py``).

Where each layer type rotates, and what merging writes into its weight::

    Linear     y = (x R) W0ᵀ: the input x [..., in] is rotated         merge: W [out, in] ← W Rᵀ
    Conv2d     each input patch [in · k · k] is rotated                merge: W [out, in·k·k] ← W Rᵀ
    Embedding  y = E[x] R: the looked-up rows [..., dim] are rotated    merge: E [vocab, dim] ← E R

Several active adapters rotate in turn (x R_1 R_2 …); merging them together folds them in the order that
computes the same. Unmerging solves with each R (``rotation.unrotate``) rather than taking Rᵀ, since the
Neumann series' R is only nearly orthogonal.

A Conv2d runs as the convolution with the rotated kernel W Rᵀ. peft 0.21.2 instead unfolds the input into
stride-1 patches, rotates them and folds them back (summing where patches overlap) before the convolution:
the two agree where patches do not overlap (a 1x1 kernel, or an input the size of the kernel, as in peft's
test rows); elsewhere peft's unmerged output is not its merged one (it changes the output even at R = I),
and deltatune's equals peft's merged output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from deltatune.tuners.base import DeltaLayer, master_dtype, write_weight
from deltatune.tuners.oft.config import OFTConfig
from deltatune.tuners.oft.rotation import OFTRotation, rotate, unrotate


class OFTLayer(DeltaLayer):
    """A base layer plus named rotations of ``features`` wide vectors; subclasses say which vectors."""

    container = "oft_R"  # peft's attribute for the rotations, hence the file key
    input_side = True  # the rotation acts on the input (merged as W Rᵀ); False: on the output rows (E R)

    def __init__(self, base_layer: nn.Module, features: int) -> None:
        super().__init__(base_layer)
        self.features = features
        setattr(self, self.container, nn.ModuleDict())

    @property
    def rotations(self) -> nn.ModuleDict:
        return getattr(self, self.container)

    def add(self, name: str, block_size: int, config: OFTConfig) -> None:
        """Create adapter ``name``: a rotation of ``features`` in blocks of ``block_size``, initialised per
        ``config`` (R = I, or a random rotation with ``init_weights=False``)."""
        weight = self.base_layer.weight
        self.rotations[name] = OFTRotation(self.features, block_size, config, weight.device, master_dtype(weight.dtype))

    def delete(self, name: str) -> None:
        self.forget(name)
        if name in self.rotations:
            del self.rotations[name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.rotations.keys())

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of adapter ``name``: peft's ``oft_R.<name>.weight``."""
        if name in self.rotations:
            yield f"{self.container}.{name}.weight", self.rotations[name].weight

    # -- merging ------------------------------------------------------------------------
    def fold_order(self, names: list[str]) -> list[str]:
        """The order that folds x R_1 R_2 … into the weight: W (R_1 R_2)ᵀ = W R_2ᵀ R_1ᵀ, or E R_1 R_2."""
        return list(reversed(names)) if self.input_side else list(names)

    def folded(self, weight: torch.Tensor, names: list[str], dropout: bool = False) -> torch.Tensor:
        """``weight`` with adapters ``names`` folded in, in the adapters' dtype (differentiable)."""
        matrix = weight.reshape(weight.shape[0], -1)  # [out, in] / [out, in·k·k] / [vocab, dim]
        for name in self.fold_order(names):
            rotation = self.rotations[name]
            blocks = rotation.matrices(dropout=dropout and rotation.training)
            matrix = rotate(matrix.to(blocks.dtype), blocks, transpose=self.input_side)
        return matrix.view(weight.shape)

    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight with the unmerged adapters of ``names`` folded in, as a new tensor."""
        weight = self.base_layer.weight
        with torch.no_grad():
            return self.folded(weight.detach(), self.unmerged(names)).to(weight.dtype)

    def merge(self, names: list[str]) -> None:
        """W ← W Rᵀ (E ← E R) for each adapter of ``names`` not merged yet."""
        pending = self.unmerged(names)
        if pending:
            write_weight(self.base_layer.weight, self.merged_weight(pending))
            self.merged_adapters.extend(self.fold_order(pending))

    def unmerge(self) -> None:
        """Undo every merged rotation, newest first: W ← W R⁻ᵀ (E ← E R⁻¹)."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            with torch.no_grad():
                blocks = self.rotations[name].matrices()
                matrix = weight.detach().reshape(weight.shape[0], -1).to(blocks.dtype)
                write_weight(weight, unrotate(matrix, blocks, transpose=self.input_side).view(weight.shape))
            self.merged_adapters.pop()

    def extra_repr(self) -> str:
        return ", ".join(
            f"{name}: {rotation.blocks} blocks of {rotation.block_size}" for name, rotation in self.rotations.items()
        )


class OFTLinear(OFTLayer):
    """OFT on ``nn.Linear``: y = base(x R), R block-diagonal over the ``in_features``."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer, base_layer.in_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rotated = x
        for name in self.unmerged_active():
            rotated = self.rotations[name](rotated)
        return self.base_layer(rotated.to(x.dtype), *args, **kwargs)


class OFTConv2d(OFTLayer):
    """OFT on ``nn.Conv2d`` (square kernel, groups 1): the convolution with the kernel W Rᵀ, R block-diagonal
    over each patch's in · k · k values."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer, base_layer.weight[0].numel())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight = self.base_layer.weight
        rotated = self.folded(weight, names, dropout=True).to(weight.dtype)
        return functional_call(self.base_layer, {"weight": rotated}, (x, *args), kwargs)


class OFTEmbedding(OFTLayer):
    """OFT on ``nn.Embedding``: y = E[x] R, R block-diagonal over the ``embedding_dim``; peft's
    ``oft_embedding_R``."""

    container = "oft_embedding_R"
    input_side = False

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.embedding_dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        rotated = result
        for name in self.unmerged_active():
            rotated = self.rotations[name](rotated)
        return rotated.to(result.dtype)
