"""LoHa's weight update as one autograd function that keeps only its four factors for backward.

    ΔW = (a1 @ b1) ⊙ (a2 @ b2)                       a· [out, r], b· [r, in]
    dΔW → g1 = dΔW ⊙ (a2 @ b2):  da1 = g1 @ b1ᵀ,  db1 = a1ᵀ @ g1
          g2 = dΔW ⊙ (a1 @ b1):  da2 = g2 @ b2ᵀ,  db2 = a2ᵀ @ g2

Plain autograd keeps both [out, in] products for the backward of the elementwise product; recomputing them
there (two rank-r matmuls) keeps the factors only: two [out, in] tensors fewer per layer between forward and
backward.
"""

from __future__ import annotations

import torch


class _HadamardOfProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a1, b1, a2, b2)
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a1, b1, a2, b2 = ctx.saved_tensors
        first = grad * (a2 @ b2)
        second = grad * (a1 @ b1)
        return first @ b1.T, a1.T @ first, second @ b2.T, a2.T @ second


def hadamard_of_products(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """(a1 @ b1) ⊙ (a2 @ b2), saving only the factors for backward (module docstring)."""
    return _HadamardOfProducts.apply(a1, b1, a2, b2)
