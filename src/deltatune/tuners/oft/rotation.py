"""OFT's rotation: packed skew-symmetric parameters -> orthogonal blocks -> a block-diagonal product.

One adapter on one layer holds a parameter ``weight`` [D, b(b-1)/2]: the upper-triangle entries of D
skew-symmetric b x b matrices S (D = 1 with ``block_share``, reused for every block). Each S becomes an
orthogonal block by the Cayley transform, and the layer's features (a multiple of b) are rotated block by
block::

    x [..., blocks · b] ──► view [..., blocks, b] ──► x_r · R_r for each block r ──► [..., blocks · b]

The numbers follow peft 0.21.2 exactly, including its two conventions: the exact transform is
Q = (I - S)(I + S)⁻¹, while the Neumann series approximates (I + S)(I - S)⁻¹ = Qᵀ (the same family of
rotations, read with S negated); a saved file means what peft means by it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.tuners.oft.config import OFTConfig


def skew_symmetric(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """[D, b(b-1)/2] upper-triangle entries (row by row) -> [D, b, b] S = U - Uᵀ."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], block_size, block_size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(-2, -1)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """The exact Cayley transform, batched over blocks: Q = (I - S)(I + S)⁻¹, orthogonal for skew-symmetric S."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """(I + S)(I - S)⁻¹ with (I - S)⁻¹ = I + S + S² + … cut short, as peft 0.18+ sums it.

    terms = 1: I; 2: I + 2S; n >= 3: I + 2S + 2S² + … + 2S^(m-1) + S^m with m = max(n - 1, 3)
    (so 3 and 4 terms give the same matrix, as in peft); nearly orthogonal while ||S|| is small.
    """
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
    if terms == 1:
        return eye.repeat(skew.shape[0], 1, 1)
    result = torch.add(eye, skew, alpha=2)  # then summed in place: one autograd node per term, as peft's
    if terms > 2:
        power = torch.bmm(skew, skew)
        result.add_(power, alpha=2)
        for _ in range(3, terms - 1):
            power = torch.bmm(power, skew)
            result.add_(power, alpha=2)
        result.add_(torch.bmm(power, skew))
    return result


def constrained(packed: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT's projection: each block's S scaled back to Frobenius norm eps / sqrt(D) when it is larger."""
    skew = skew_symmetric(packed, block_size)
    radius = eps / math.sqrt(packed.shape[0])
    norm = torch.linalg.matrix_norm(skew).view(-1, 1, 1)
    skew = torch.where(norm <= radius, skew, radius * (skew / norm))
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=packed.device)
    return skew[:, rows, cols]


def drop_blocks(rotations: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p · D)`` of the D blocks, chosen at random, replaced by the identity."""
    count = rotations.shape[0]
    dropped = torch.zeros(count, 1, 1, device=rotations.device, dtype=rotations.dtype)
    dropped[torch.randperm(count, device=rotations.device)[: int(p * count)]] = 1
    eye = torch.eye(rotations.shape[-1], device=rotations.device, dtype=rotations.dtype)
    return (1 - dropped) * rotations + dropped * eye


def rotate(features: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``features`` [..., D·b] times block-diag(R_1 … R_D) (or its transpose), block by block."""
    blocks = features.unflatten(-1, (rotations.shape[0], rotations.shape[-1]))
    equation = "...rk,rck->...rc" if transpose else "...rk,rkc->...rc"
    return torch.einsum(equation, blocks, rotations).flatten(-2)


def unrotate(features: torch.Tensor, rotations: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """X with ``rotate(X, rotations, transpose) == features`` for a 2-d ``features``: solved per block, so it is
    exact for the Neumann series' R too, which is only nearly orthogonal (Rᵀ would not undo it)."""
    blocks = features.unflatten(-1, (rotations.shape[0], rotations.shape[-1])).transpose(0, 1)  # [D, rows, b]
    matrices = rotations.transpose(-2, -1) if transpose else rotations
    return torch.linalg.solve(matrices, blocks, left=False).transpose(0, 1).flatten(-2)


class OFTRotation(nn.Module):
    """One adapter's rotation of a layer's ``features`` (= blocks x block_size); peft's ``oft_R.<name>``."""

    def __init__(
        self, features: int, block_size: int, config: OFTConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.blocks = features // block_size
        self.shared = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.dropout = config.module_dropout
        packed = torch.empty(
            1 if self.shared else self.blocks, block_size * (block_size - 1) // 2, device=device, dtype=dtype
        )
        self.weight = nn.Parameter(packed)
        if config.init_weights:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, mean=0.0, std=0.1)

    def matrices(self, dropout: bool = False) -> torch.Tensor:
        """[blocks, b, b]: the orthogonal blocks (COFT projects ``weight`` in place first, as peft does); with
        ``dropout`` (the forward pass while training), ``module_dropout`` turns some of them into the identity
        (not with ``block_share``, as in peft)."""
        if self.coft:
            with torch.no_grad():
                self.weight.copy_(constrained(self.weight, self.block_size, self.eps))
        skew = skew_symmetric(self.weight, self.block_size)
        blocks = cayley(skew) if self.neumann_terms is None else cayley_neumann(skew, self.neumann_terms)
        if dropout and self.dropout > 0 and not self.shared:
            blocks = drop_blocks(blocks, self.dropout)
        return blocks.expand(self.blocks, -1, -1) if self.shared else blocks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [..., blocks · b] rotated block by block (x_r R_r), in this adapter's dtype."""
        return rotate(features.to(self.weight.dtype), self.matrices(dropout=self.training))

    def extra_repr(self) -> str:
        kind = "exact" if self.neumann_terms is None else f"neumann({self.neumann_terms})"
        shared = ", shared" if self.shared else ""
        return f"{self.blocks} blocks of {self.block_size}, cayley={kind}{shared}{', coft' if self.coft else ''}"
