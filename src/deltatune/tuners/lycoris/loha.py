"""LoHa: the update is the Hadamard (elementwise) product of two low-rank products (FedPara, arXiv:2108.06098)::

    ΔW = s · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)        w·_a [out, r], w·_b [r, in · k…], s = alpha / r

A convolution's kernel is folded into the input side (``in / groups · k…`` columns). With
``use_effective_conv2d`` and a kernel larger than 1 each product is instead a Tucker form around a core
t [r, r, k0, k1] (a 1-d kernel as [k, 1])::

    (w·_a, w·_b, t·) → ΔW·[o, i, k, l] = Σ_pq w·_a[p, o] · w·_b[q, i] · t·[p, q, k, l]   (w·_a [r, out], w·_b [r, in])

``hada_w2_b`` starts at zero (``init_weights=True``), so training starts at the base model; the other factors
start as ``nn.Linear`` weights do. peft's file keys: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``,
``hada_t1``, ``hada_t2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.kernels.loha_weight import hadamard_of_products
from deltatune.tuners.lycoris.config import LycorisConfig
from deltatune.tuners.lycoris.layer import LycorisLayer, kaiming


def tucker_kernel(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """The kernel [out, in, k0, k1] of a Tucker form: core [r, r, k0, k1], out_factor [r, out], in_factor [r, in]."""
    return torch.einsum("pqkl,po,qi->oikl", core, out_factor, in_factor)


def kernel_size(base: nn.Module) -> tuple[int, ...]:
    """The base's kernel size; () for a linear layer."""
    return tuple(base.kernel_size) if isinstance(base, (nn.Conv1d, nn.Conv2d)) else ()


def uses_tucker(base: nn.Module, config: LycorisConfig) -> bool:
    """Whether ``use_effective_conv2d`` applies: a convolution whose kernel is larger than 1 (as in peft)."""
    return config.use_effective_conv2d and math.prod(kernel_size(base)) > 1


def tucker_core_shape(rank: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    """peft's core shape: [r, r, k0, k1], a 1-d kernel as [r, r, k, 1]."""
    return (rank, rank, *kernel, *(1,) * (2 - len(kernel)))


class LoHaLayer(LycorisLayer):
    """LoHa on ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""

    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def create(self, name: str, rank: int, config: LycorisConfig) -> None:
        base = self.base_layer
        out_features, in_features = base.weight.shape[:2]  # a convolution's is in / groups
        kernel = kernel_size(base)
        if uses_tucker(base, config):
            for side in ("1", "2"):
                self.new_factor(f"hada_t{side}", name, tucker_core_shape(rank, kernel))
                self.new_factor(f"hada_w{side}_a", name, (rank, out_features))
                self.new_factor(f"hada_w{side}_b", name, (rank, in_features))
        else:
            columns = in_features * math.prod(kernel)
            for side in ("1", "2"):
                self.new_factor(f"hada_w{side}_a", name, (out_features, rank))
                self.new_factor(f"hada_w{side}_b", name, (rank, columns))
        with torch.no_grad():  # peft's order of draws, so a seeded start is peft's
            for container in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
                kaiming(getattr(self, container)[name])
            if config.init_weights:
                nn.init.zeros_(self.hada_w2_b[name])
            else:
                kaiming(self.hada_w2_b[name])
            if name in self.hada_t1:
                kaiming(self.hada_t1[name])
                kaiming(self.hada_t2[name])

    def factor_weight(self, name: str, scale: float) -> torch.Tensor:
        shape = self.base_layer.weight.shape
        if name in self.hada_t1:  # the scale on the first core [r, r, k0, k1]
            first = tucker_kernel(self.hada_t1[name] * scale, self.hada_w1_a[name], self.hada_w1_b[name])
            second = tucker_kernel(self.hada_t2[name], self.hada_w2_a[name], self.hada_w2_b[name])
            return (first * second).reshape(shape)
        # the scale on w1_a [out, r]; the [out, in] products are recomputed in backward (kernels/loha_weight.py)
        factors = (self.hada_w1_a[name] * scale, self.hada_w1_b[name], self.hada_w2_a[name], self.hada_w2_b[name])
        return hadamard_of_products(*factors).reshape(shape)
