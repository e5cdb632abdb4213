"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353), LoRA's one variant.

The adapted weight is split into a direction and a trainable magnitude m, one per unit (output row of a
linear, output channel of a convolution, embedding dimension)::

    W' = m ⊙ (W0 + s·BA) / ||W0 + s·BA||        (the norm per unit, a constant for the gradient: paper §4.3)

so with n = ||W0 + s·BA|| the forward adds, on top of the base output y = W0 x + b,

    y' = y + (m/n − 1) ⊙ (y − b) + (m/n) ⊙ s·BA x

m starts at n, so DoRA starts where LoRA does. Merging writes (m/n) ⊙ (W0 + s·BA) into the weight and keeps
m/n as merged, so that unmerging divides it out exactly. ``DoraVariant`` holds all of it for every LoRA
layer type; a layer type says what its units are (``rows``, ``magnitude_shape``, ``_channels``). The fused
training path for linear layers is ``kernels/dora_linear.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.kernels.base_weight import dense


class DoraVariant:
    """DoRA's state and math, mixed into ``LoraLayer``: ``lora_magnitude_vector`` (peft's name and file shape)."""

    def init_dora(self) -> None:
        """adapter -> trainable magnitude m; and m / ||W0 + s·BA|| as each adapter was merged."""
        self.lora_magnitude_vector = nn.ParameterDict()
        self._merged_dora_scales: dict[str, torch.Tensor] = {}

    def add_magnitude(self, name: str, dtype: torch.dtype) -> None:
        """m for adapter ``name`` at ||W0 + s·BA||, so DoRA starts where LoRA does."""
        norm = self.weight_norm(name).to(dtype)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(self.magnitude_shape(norm.numel())))

    def dora_output(self, result: torch.Tensor, lora: torch.Tensor, name: str) -> torch.Tensor:
        """y + (m/n − 1) ⊙ (y − b) + (m/n) ⊙ s·BA x, as peft computes it, for base output ``result`` = y."""
        scale = self._channels(self.dora_scale(name), result)
        return result + (scale - 1) * self._without_bias(result) + scale * lora

    def scale_rows(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``weight`` (laid out like the base weight) with each unit multiplied by ``scale`` [units], in place."""
        self.rows(weight).mul_(scale[:, None].to(weight.dtype))
        return weight

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A 2-D view [units, fan] of a tensor laid out like the base weight; DoRA keeps one magnitude per unit."""
        raise NotImplementedError

    def magnitude_shape(self, units: int) -> tuple[int, ...]:
        """The shape of DoRA's magnitude parameter (peft's file shape): one entry per unit."""
        return (units,)

    def weight_norm(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """||W + s·BA|| per unit [units] for W = ``weight`` or the base weight as it is, in fp32; a constant
        for the gradient (DoRA paper §4.3)."""
        with torch.no_grad():
            weight = self.base_weight if weight is None else weight
            merged = dense(weight, torch.float32) + self.delta_weight(name).float()
            return torch.linalg.vector_norm(self.rows(merged), dim=1)

    def dora_scale(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """m / ||W + s·BA|| per unit [units], in fp32: the factor DoRA puts on the adapted weight's rows."""
        return self.lora_magnitude_vector[name].reshape(-1).float() / self.weight_norm(name, weight)

    def _channels(self, per_unit: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-unit vector shaped to broadcast over ``like`` (an output), in its dtype: units on the last dim."""
        return per_unit.to(like.dtype)

    def _without_bias(self, result: torch.Tensor) -> torch.Tensor:
        """The base output less the base layer's bias: W0 x."""
        bias = getattr(self.base_layer, "bias", None)
        return result if bias is None else result - self._channels(bias, result)
